"""Where one adapted 4096×4096 bf16 layer's time goes on a GPU (forward + backward, b = 128, LoRA r = 32).

Per method, ms per call timed three ways: one call between CUDA events with a synchronisation (as `c3a bench`
times the operator), 20 calls back to back (the host's kernel launches overlap the GPU's work, as in a training
step), and the sum of the call's CUDA kernels (torch.profiler) — the GPU work alone; then the kernel count and,
for C³A's DFT path, the top kernels. A gap between the first and the last column is host (launch) overhead.
"""

import statistics
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from c3a.experiments.bench import lora_layer
from c3a.functional import add_block_circular_conv

D, B, RANK = 4096, 128, 32


def timings(step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    single = []
    for _ in range(10):
        start.record()
        step()
        end.record()
        end.synchronize()
        single.append(start.elapsed_time(end))
    start.record()
    for _ in range(20):
        step()
    end.record()
    end.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time for e in kernels) / 5 / 1e3
    return statistics.median(single), start.elapsed_time(end) / 20, kernel_ms, len(kernels) / 5, prof


def main():
    # one profiling cycle per call is intended: its events are all this reads
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
    torch.manual_seed(0)
    base = torch.nn.Linear(D, D).cuda().bfloat16().requires_grad_(False)
    kernel = (torch.randn(D // B, D // B, B, device="cuda") / D).requires_grad_()
    lora, lora_bf16 = lora_layer(base, RANK, torch.float32), lora_layer(base, RANK, torch.bfloat16)
    for tokens in (8192, 16384):
        x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
        methods = {
            "frozen": lambda: base(x), "lora": lambda: lora(x), "lora_bf16": lambda: lora_bf16(x),
            "c3a_dft": lambda: add_block_circular_conv(base(x), x, [kernel], path="dft", inplace=True),
            "c3a_fft": lambda: add_block_circular_conv(base(x), x, [kernel], path="fft", inplace=True),
        }
        print(f"\n{tokens} tokens, ms per forward + backward:\n")
        print("| method | one call, synced | 20 back to back | CUDA kernels | kernels per call |")
        print("|---|---:|---:|---:|---:|")
        for name, forward in methods.items():
            single, pipelined, kernel_ms, count, prof = timings(lambda: forward().backward(grad))
            print(f"| {name} | {single:.2f} | {pipelined:.2f} | {kernel_ms:.2f} | {count:.0f} |")
            if name == "c3a_dft" and tokens == 8192:
                top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    print("\nC³A DFT path, 8192 tokens, top kernels over 5 calls:\n")
    print(top)


if __name__ == "__main__":
    main()
