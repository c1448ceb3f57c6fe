"""Two CPU processes (gloo) equal one process on the same global batch: DDP through the shared trainer, and FSDP2
(``fully_shard``) with the adapter saved once from the gathered full state."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*command: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine: no oversubscription
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_ddp_kernel_gradients_are_synchronised_and_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run(str(WORKER), str(single), "4")
    _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(WORKER), str(multi), "2")  # fmt: skip
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(multi / f"rank{r}.pt") for r in range(2)]
    assert one["world_size"] == 1 and ranks[0]["world_size"] == 2
    kernels = [n for n in one["trained"] if "c3a_kernel" in n]
    assert len(kernels) == 4 and len(one["gradients"]) == 3  # query+value of 2 layers; 3 optimizer steps
    # What DDP guarantees: every rank applies the same all-reduced gradient, equal to one process's gradient on
    # the global batch up to float summation order. First-order bound: each gradient entry sums 48 token terms
    # through ~10 chained ops of width <= 64, so reordering moves it by at most ~eps·(48 + 10·64) ≈ 8e-5 of the
    # largest entry (fp32 eps 1.2e-7) when all errors align; 1e-3 is above that, while a wrong reduction (a sum
    # instead of a mean, a missing rank) is off by 50 % or more. The trained weights are not compared with the
    # single process: Adam divides by sqrt(v), so entries whose gradient is near zero turn reduction noise into
    # O(lr) differences that say nothing about DDP.
    for step, expected in enumerate(one["gradients"]):
        for name, g in expected.items():
            assert torch.equal(ranks[0]["gradients"][step][name], ranks[1]["gradients"][step][name]), (step, name)
            err = (ranks[0]["gradients"][step][name] - g).abs().max()
            assert err <= 1e-3 * g.abs().max(), (step, name, err.item(), g.abs().max().item())
    for name, p in one["trained"].items():
        assert torch.equal(ranks[0]["trained"][name], ranks[1]["trained"][name]), name
    for name in kernels:  # the kernels did train in both runs: the comparisons above are not between untouched tensors
        assert (one["trained"][name] - one["initial"][name]).abs().max() > 0.05
        assert (ranks[0]["trained"][name] - ranks[0]["initial"][name]).abs().max() > 0.05


def test_fsdp2_training_matches_one_process_and_saves_the_adapter_once(tmp_path):
    from peft import PeftModel

    sys.path.insert(0, str(FSDP_WORKER.parent))
    from fsdp_worker import base

    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    _run(str(FSDP_WORKER), str(single))
    _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(FSDP_WORKER), str(multi))  # fmt: skip
    one, zero, other = (torch.load(f) for f in (single / "rank0.pt", multi / "rank0.pt", multi / "rank1.pt"))
    assert one["world_size"] == 1 and zero["world_size"] == 2
    assert len(one["trained"]) == 4 and zero["trained"].keys() == one["trained"].keys()  # q+v of 2 layers, full shape
    assert other["trained"] == {}  # the gathered state goes to rank 0 only
    # Plain SGD: the trained kernels differ from one process's only by the gradients' summation order (the
    # reduce-scatter's mean over ranks vs one mean over the global batch), ~eps·(tokens + depth·width) ≈ 1e-4 of a
    # step, as in the DDP test; a wrong reduction (a sum, one rank's gradient) is off by 50 % of the displacement.
    moved = max((one["trained"][n] - one["initial"][n]).abs().max() for n in one["trained"])
    assert moved > 0.02
    for name, expected in one["trained"].items():
        assert (zero["trained"][name] - expected).abs().max() <= 1e-3 * moved, name
    saved = sorted(p.name for p in (multi / "adapter").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(base(), multi / "adapter")
    kernels = {n: p for n, p in reloaded.named_parameters() if "c3a_kernel" in n}
    assert kernels.keys() == zero["trained"].keys()
    assert all(torch.equal(kernels[n], zero["trained"][n]) for n in kernels)
