"""pytest plugin: run the CPU-written operator and layer tests on a CUDA device.

    PYTHONPATH=benchmarks pytest -p cuda_tests tests/test_functional.py tests/test_functional_half.py tests/test_layer.py

It makes CUDA the default device and maps the tests' CPU generators and `autocast("cpu")` to CUDA. Expected
failures, by design (4 of the 6 in docs/runs/bench-gpu-h200/cuda-tests.log; the other 2, a test since fixed): the
meta-device error messages name the kernels' device (cuda:0, the tests say cpu), and the dispatch tests expect the
CPU's choices (the dense-delta path for narrow layers is picked on the CPU only; a block size twice the CPU's DFT
limit is within CUDA's).
"""

import torch
import torch.distributed.tensor  # noqa: F401  (these modules annotate with torch.Generator: import before patching)
import transformers  # noqa: F401
from transformers import AutoModel  # noqa: F401

import c3a  # noqa: F401

torch.set_default_device("cuda")
_generator, _autocast = torch.Generator, torch.autocast
class _CudaGenerator(_generator):  # a class, so annotations like `torch.Generator | None` still work
    def __new__(cls, device=None):
        return _generator(device=device or "cuda")


torch.Generator = _CudaGenerator
torch.autocast = lambda device_type, *args, **kwargs: _autocast(
    "cuda" if device_type == "cpu" else device_type, *args, **kwargs)
