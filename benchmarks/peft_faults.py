"""What PEFT itself still does wrong that c3a cannot fix from outside: each probe runs PEFT's own LoRA (not c3a's
layers) on a tiny random model and prints what happened. c3a's layers pass the same probes (tests/test_threads.py,
tests/test_tuner.py, tests/test_faults.py). Usage: python benchmarks/peft_faults.py  (CPU, about a minute)."""

import re
import subprocess
import sys
import threading

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))


def lora_model(adapters=("p", "q", "s")):
    model = get_peft_model(mlp(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False),
                           adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    return model.eval()


def threads_with_mixed_batches():
    """Two threads, one model, each forward with its own adapter_names (a serving thread pool)."""
    model = lora_model()
    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randn(n, 16, generator=g), [("p", "q", "s")[(i + j) % 3] for j in range(n)])
            for i, n in enumerate([2, 3] * 25)]
    with torch.no_grad():
        serial = [model(x, adapter_names=names) for x, names in jobs]
    results, errors = [None] * len(jobs), []

    def run(indices):
        for i in indices:
            try:
                with torch.no_grad():
                    results[i] = model(jobs[i][0], adapter_names=jobs[i][1])
            except Exception as e:  # noqa: BLE001 - the probe reports whatever PEFT raises
                errors.append(f"{type(e).__name__}: {e}")

    workers = [threading.Thread(target=run, args=(range(k, len(jobs), 2),)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wrong = sum(r is not None and not torch.equal(r, s) for r, s in zip(results, serial))
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    return f"{wrong} of {len(jobs)} results differ from the serial run; {len(errors)} errors" + (
        f" (e.g. {errors[0][:90]})" if errors else "") + f"; forward pre-hooks left on modules: {hooks}"


def set_adapter_unknown_name():
    model = lora_model()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        try:
            model.base_model.set_adapter("nope")
            outcome = "no error"
        except Exception as e:  # noqa: BLE001
            outcome = f"{type(e).__name__}"
        after = model(x)
    return f"base_model.set_adapter('nope'): {outcome}; outputs changed: {not torch.equal(before, after)}"


def exception_inside_disable_adapter_while_merged():
    model = lora_model(("p",))
    model.merge_adapter()
    try:
        with model.disable_adapter(), torch.no_grad():
            model(torch.randn(2, 16))  # the base model's output: the merged weights are unmerged for it
            raise RuntimeError("user code fails")
    except RuntimeError:
        pass
    layers = [m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    return f"merged before: True; merged after the exception: {all(m.merged for m in layers)}"


def catastrophic_target_modules_regex():
    """PEFT matches a string target_modules with re.fullmatch against every module name: a pattern with nested
    quantifiers backtracks exponentially on a name that almost matches. Run in a child process with a timeout."""
    code = (
        "import torch; from torch import nn; from peft import LoraConfig, get_peft_model\n"
        "m = nn.Sequential(); m.add_module('a' * 32 + 'b', nn.Linear(4, 4))\n"
        "get_peft_model(m, LoraConfig(r=1, target_modules=r'(a+)+c'))\n"
    )
    pattern_alone = re.compile(r"(a+)+c")
    try:
        subprocess.run([sys.executable, "-c", code], timeout=20, capture_output=True)
        return "finished within 20 s"
    except subprocess.TimeoutExpired:
        return (f"get_peft_model still matching after 20 s (the pattern {pattern_alone.pattern!r} against a 33-character "
                "module name); c3a cannot bound PEFT's matcher")


def main():
    import peft

    print(f"PEFT {peft.__version__}, torch {torch.__version__}")
    for probe in (threads_with_mixed_batches, set_adapter_unknown_name, exception_inside_disable_adapter_while_merged,
                  catastrophic_target_modules_regex):
        print(f"- {probe.__name__}: {probe()}", flush=True)


if __name__ == "__main__":
    main()
