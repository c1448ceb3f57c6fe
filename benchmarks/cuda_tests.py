"""pytest plugin: run the CPU-written operator and layer tests on a CUDA device.

    PYTHONPATH=benchmarks pytest -p cuda_tests tests/test_functional.py tests/test_functional_half.py tests/test_layer.py

It makes CUDA the default device and maps the tests' CPU generators and `autocast("cpu")` to CUDA. Expected
failures, by design: the meta-device error messages name the kernels' device (cuda:0, the tests say cpu), and
`test_dispatch`'s "too large for the DFT path" block size (2 × the CPU limit) is within CUDA's limit.
"""

import torch
import torch.distributed.tensor  # noqa: F401  (these modules annotate with torch.Generator: import before patching)
import transformers  # noqa: F401
from transformers import AutoModel  # noqa: F401

import c3a  # noqa: F401

torch.set_default_device("cuda")
_generator, _autocast = torch.Generator, torch.autocast
torch.Generator = lambda device=None: _generator(device=device or "cuda")
torch.autocast = lambda device_type, *args, **kwargs: _autocast(
    "cuda" if device_type == "cpu" else device_type, *args, **kwargs)
