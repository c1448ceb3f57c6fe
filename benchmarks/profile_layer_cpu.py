"""Where one adapted layer's time goes on a CPU: SmolLM2's q_proj (576×576) and v_proj (576→192), forward + backward
under bf16 autocast with fp32 weights, 640 tokens (batch 8 × 80), C³A b = 48 through the layer (the dispatch picks
the path) against PEFT's LoRA r = 8.

Per layer: ms per call (median of 40, no profiler), then the profiler's top ops by self CPU time (per call; the
profiler adds its own overhead to every op, so read the split, not the sum). Run on an otherwise idle machine:

    python benchmarks/profile_layer_cpu.py
"""

import statistics
import time

import c3a  # first: it quiets bitsandbytes' import notice before PEFT imports bitsandbytes
import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile

TOKENS, BLOCK, RANK, CALLS = 640, 48, 8, 20


class _One(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _model(kind: str, d_in: int, d_out: int):
    torch.manual_seed(0)
    if kind == "lora":
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"])
    else:
        config = c3a.C3AConfig(block_size=BLOCK, init_weights="gaussian", target_modules=["proj"])
    model = get_peft_model(_One(d_in, d_out), config)
    if kind == "lora":  # B not zero: the backward of a trained adapter
        torch.nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.02)
    return model


def main():
    torch.set_num_threads(2)
    for d_in, d_out in ((576, 576), (576, 192)):
        x = torch.randn(TOKENS, d_in, requires_grad=True)
        grad = torch.randn(TOKENS, d_out, dtype=torch.bfloat16)
        print(f"\n## {d_in}→{d_out}, {TOKENS} tokens, forward + backward under bf16 autocast")
        for kind in ("lora", "c3a"):
            model = _model(kind, d_in, d_out)

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                y.backward(grad)

            for _ in range(5):
                step()
            times = []
            for _ in range(40):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(CALLS):
                    step()
            rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
            label = f"PEFT LoRA r={RANK}" if kind == "lora" else f"C³A b={BLOCK}"
            print(f"\n{label}: {1e3 * statistics.median(times):.2f} ms per call; top ops, self CPU µs per call:\n")
            print("| op | µs | calls | input shapes |\n|---|---:|---:|---|")
            for event in rows[:14]:
                shapes = str(event.input_shapes)[:70].replace("|", "/")
                print(f"| {event.key[:40]} | {event.self_cpu_time_total / CALLS:.0f} | {event.count // CALLS} | {shapes} |")


if __name__ == "__main__":
    main()
