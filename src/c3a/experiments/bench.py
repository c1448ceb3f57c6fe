"""`c3a bench`: training-step time and peak memory of C³A against the baselines, side by side.

Every method runs in its own worker process (so each one's peak memory is its own), all workers are
alive at once, and the parent interleaves them: round after round, each worker runs one timed step
while the others wait. Machine noise thus hits all methods alike; ratios to LoRA are taken per round
(paired) and their median reported. Models are built from configs with random weights (no download).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from c3a.io import atomic_path, atomic_write_text

DEFAULT_METHODS = "frozen,lora:8,c3a:128,c3a:768,peft-c3a:128,vera:256,boft,ia3,bitfit,full"


@dataclass(frozen=True)
class Spec:
    """``name[:value]``: the value is the block size for C³A methods, the rank for LoRA/VeRA."""

    name: str
    value: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "Spec":
        name, _, value = text.partition(":")
        return cls(name, int(value) if value else None)

    @property
    def label(self) -> str:
        key = "b" if "c3a" in self.name else "r"
        return self.name if self.value is None else f"{self.name} ({key}={self.value})"


def build_model(model: str, spec: Spec, layers: Optional[int], dtype: torch.dtype, device: str):
    """``model`` is a built-in paper architecture, a hub id or a folder with a config; random weights."""
    from transformers import AutoModel

    from c3a.paper_models import model_config

    from .methods import MethodOptions, build_method

    config = model_config(model)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    net = AutoModel.from_config(config).to(device=device, dtype=dtype)
    if spec.name == "frozen":  # the floor: backprop through every layer, no parameter to update
        for p in net.parameters():
            p.requires_grad_(False)
        net.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return net
    options = MethodOptions()
    if spec.value is not None:
        options.block_size = options.rank = spec.value
    return build_method(net, spec.name, options)


def _peak_memory(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def _worker(conn, model, spec, layers, batch, seq, dtype, device, threads):
    """Build one method's model, then run a training step whenever the parent asks."""
    try:
        if threads:
            torch.set_num_threads(threads)
        net = build_model(model, spec, layers, getattr(torch, dtype), device)
        params = [p for p in net.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        vocab = net.config.vocab_size if hasattr(net, "config") else 1000
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

        def step() -> float:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            hidden = net(input_ids=ids).last_hidden_state
            hidden.float().pow(2).mean().backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        conn.send(("ready", trainable))
        while conn.recv() == "step":
            conn.send(("time", step()))
        conn.send(("memory", _peak_memory(device)))
    except Exception as e:  # report, so the parent can name the failing method
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def time_methods(model, specs, layers, batch, seq, dtype, device, threads, warmup, rounds) -> list[dict]:
    ctx = mp.get_context("spawn")
    workers = []
    for spec in specs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, model, spec, layers, batch, seq, dtype, device, threads), daemon=True)
        proc.start()
        workers.append((spec, parent, proc))
    rows = []
    try:
        for spec, conn, _ in tqdm(workers, desc="building models", leave=False):
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"{spec.label}: {value}")
            rows.append({"method": spec.name, "label": spec.label, "value": spec.value, "trainable_params": value, "step_seconds": []})
        for r in tqdm(range(warmup + rounds), desc="interleaved steps"):
            for row, (spec, conn, _) in zip(rows, workers):
                conn.send("step")
                kind, value = conn.recv()
                if kind == "error":
                    raise RuntimeError(f"{spec.label}: {value}")
                if r >= warmup:
                    row["step_seconds"].append(value)
        for row, (spec, conn, proc) in zip(rows, workers):
            conn.send("stop")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"{spec.label}: {value}")
            row["peak_memory_bytes"], row["memory_kind"] = value
            proc.join()
    finally:
        for _, _, proc in workers:
            if proc.is_alive():
                proc.kill()
    _add_ratios(rows, "step_seconds")
    return rows


def _add_ratios(rows: list[dict], key: str) -> None:
    """Median, spread and the median of per-round ratios to LoRA (paired: same round, same noise)."""
    lora = next((r for r in rows if r["method"] == "lora"), None)
    for row in rows:
        times = row[key]
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        row["median_ms"], row["p25_ms"], row["p75_ms"] = 1e3 * statistics.median(times), 1e3 * q[0], 1e3 * q[2]
        if lora is not None:
            ratios = [t / ref for t, ref in zip(times, lora[key])]
            row["ratio_to_lora"] = statistics.median(ratios)
            rq = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row["ratio_to_lora_iqr"] = [rq[0], rq[2]]
        if lora is not None and "peak_memory_bytes" in row:
            row["memory_ratio_to_lora"] = row["peak_memory_bytes"] / lora["peak_memory_bytes"]


# -- operator micro-benchmark --------------------------------------------------------------------------------
def _median_time(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Measured device memory bandwidth (bytes/s) of a large copy: the yardstick for the operator."""
    x = torch.empty(64 * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    seconds = _median_time(lambda: x.clone(), device, 10)
    return 2 * x.numel() * x.element_size() / seconds


def operator_grid(device: str, dtype: torch.dtype, shapes, block_sizes, token_counts, reps: int) -> list[dict]:
    """Forward+backward of one adapted layer: our C³A layer (auto path), its FFT path, PEFT's C3A and
    LoRA with the same parameter budget, over (d_in, d_out, b, tokens)."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    from c3a import layer as layer_mod
    from c3a.layer import C3ALinear

    rows = []
    bandwidth = copy_bandwidth(device, dtype)
    grid = [(s, b, t) for s in shapes for b in block_sizes for t in token_counts if s[0] % b == 0 and s[1] % b == 0]
    for (d_in, d_out), b, tokens in tqdm(grid, desc="operator grid"):
        torch.manual_seed(0)
        base = torch.nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
        layer = C3ALinear(base)
        layer.add_adapter("a", b)
        layer.active_adapters = ["a"]
        kernel = layer.c3a_kernel["a"]
        rank = max(1, round(d_in * d_out / b / (d_in + d_out)))  # LoRA rank with the same budget
        lora_a = torch.randn(rank, d_in, device=device, dtype=dtype, requires_grad=True)
        lora_b = torch.zeros(d_out, rank, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

        def ours():
            layer(x).backward(grad)

        def ours_fft():
            fold, layer_mod.FOLD_RATIO = layer_mod.FOLD_RATIO, 0
            try:
                layer(x).backward(grad)
            finally:
                layer_mod.FOLD_RATIO = fold

        def peft():
            y = base(x) + BlockCircularConvolution.apply(x.float(), kernel).to(dtype) / d_in
            y.backward(grad)

        def lora():
            (base(x) + (x @ lora_a.T) @ lora_b.T).backward(grad)

        def frozen():
            base(x).backward(grad)

        times = {name: _median_time(fn, device, reps) for name, fn in
                 [("frozen", frozen), ("lora", lora), ("c3a", ours), ("c3a_fft", ours_fft), ("peft_c3a", peft)]}
        # Minimal traffic of the adapter alone: read x, write its output, read both back in backward.
        io_bytes = 2 * tokens * (d_in + d_out) * x.element_size()
        rows.append({
            "d_in": d_in, "d_out": d_out, "block_size": b, "tokens": tokens, "lora_rank": rank,
            "ms": {k: 1e3 * v for k, v in times.items()},
            "adapter_ms": {k: 1e3 * (v - times["frozen"]) for k, v in times.items() if k != "frozen"},
            "c3a_fft_bandwidth_fraction": io_bytes / max(times["c3a_fft"] - times["frozen"], 1e-9) / bandwidth,
        })
    return rows


# -- outputs ---------------------------------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def step_table(result: dict) -> str:
    lines = [
        f"Training step, {result['model']} ({result['layers'] or 'all'} layers), batch {result['batch']}×{result['seq']}, "
        f"{result['dtype']}, {result['device_name']}, {result['threads']} threads; "
        f"{result['rounds']} interleaved rounds. Memory: {result['memory_kind']}.",
        "",
        "| method | trainable params | step ms (median [p25, p75]) | × LoRA (median of paired ratios [IQR]) | peak memory | memory × LoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["methods"]:
        ratio = f"{r['ratio_to_lora']:.3f} [{r['ratio_to_lora_iqr'][0]:.3f}, {r['ratio_to_lora_iqr'][1]:.3f}]" if "ratio_to_lora" in r else "–"
        mem_ratio = f"{r['memory_ratio_to_lora']:.3f}" if "memory_ratio_to_lora" in r else "–"
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['median_ms']:.1f} [{r['p25_ms']:.1f}, {r['p75_ms']:.1f}] | "
            f"{ratio} | {_fmt_bytes(r['peak_memory_bytes'])} | {mem_ratio} |"
        )
    return "\n".join(lines) + "\n"


def operator_table(rows: list[dict]) -> str:
    lines = [
        "Adapter cost of one layer, forward + backward, ms above the frozen layer (median):",
        "",
        "| d_in×d_out | b | tokens | LoRA r (same params) | LoRA | C³A (auto) | C³A FFT path | PEFT C3A | FFT path, fraction of copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r["adapter_ms"]
        lines.append(
            f"| {r['d_in']}×{r['d_out']} | {r['block_size']} | {r['tokens']} | {r['lora_rank']} | {a['lora']:.2f} | "
            f"{a['c3a']:.2f} | {a['c3a_fft']:.2f} | {a['peft_c3a']:.2f} | {r['c3a_fft_bandwidth_fraction']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + bool(result.get("operator"))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    methods = result["methods"]
    labels = [m["label"] for m in methods]
    colors = ["tab:red" if "c3a" in m["method"] else "tab:gray" for m in methods]
    axes[0].barh(labels, [m["median_ms"] for m in methods], color=colors,
                 xerr=[[m["median_ms"] - m["p25_ms"] for m in methods], [m["p75_ms"] - m["median_ms"] for m in methods]])
    for i, m in enumerate(methods):
        if "ratio_to_lora" in m:
            axes[0].annotate(f"×{m['ratio_to_lora']:.2f}", (m["median_ms"], i), xytext=(4, -10),
                             textcoords="offset points", fontsize=8)
    axes[0].set_xlabel("training step (ms, median and IQR; × LoRA, paired)")
    axes[0].invert_yaxis()
    axes[1].barh(labels, [m["peak_memory_bytes"] / 2**30 for m in methods], color=colors)
    axes[1].set_xlabel(f"peak memory (GiB, {result['memory_kind']})")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    if result.get("operator"):
        ax = axes[2]
        rows = result["operator"]
        shape = (rows[0]["d_in"], rows[0]["d_out"])
        for b in sorted({r["block_size"] for r in rows}):
            sel = [r for r in rows if (r["d_in"], r["d_out"]) == shape and r["block_size"] == b]
            ax.plot([r["tokens"] for r in sel], [r["adapter_ms"]["c3a"] for r in sel], "o-", label=f"C³A b={b}")
        sel = [r for r in rows if (r["d_in"], r["d_out"]) == shape and r["block_size"] == rows[0]["block_size"]]
        ax.plot([r["tokens"] for r in sel], [r["adapter_ms"]["lora"] for r in sel], "k--", label=f"LoRA r={sel[0]['lora_rank']}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="adapter ms (fwd+bwd)", title=f"one {shape[0]}×{shape[1]} layer")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, batch {result['batch']}×{result['seq']}, {result['device_name']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


# -- command ---------------------------------------------------------------------------------------------------
def add_bench_arguments(p) -> None:
    p.add_argument("--model", default="roberta-base",
                   help="a built-in paper architecture (roberta-base, roberta-large, llama2-7b, llama3-8b, ...), "
                        "a hub id or a folder with config.json; weights are random")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the model's; e.g. 2 for LLaMA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated name[:b or r] (default: {DEFAULT_METHODS})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--operator", action="store_true", help="also run the operator micro-benchmark")
    p.add_argument("--op-shapes", default="768x768,1024x1024,4096x4096")
    p.add_argument("--op-blocks", default="64,128,256")
    p.add_argument("--op-tokens", default="64,256,1024,4096")
    p.add_argument("--op-reps", type=int, default=10)
    p.add_argument("--out", default="c3a-bench")


def run_bench(args) -> int:
    specs = [Spec.parse(s) for s in args.methods.split(",") if s]
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rows = time_methods(args.model, specs, args.layers, args.batch, args.seq, dtype, args.device, args.threads, args.warmup, args.rounds)
    result = {
        "experiment": "bench", "model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "dtype": dtype, "device": args.device, "device_name": _device_name(args.device),
        "threads": args.threads or torch.get_num_threads(), "rounds": args.rounds,
        "memory_kind": rows[0]["memory_kind"], "methods": rows,
    }
    if args.operator:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.op_shapes.split(",")]
        result["operator"] = operator_grid(
            args.device, getattr(torch, dtype), shapes, [int(b) for b in args.op_blocks.split(",")],
            [int(t) for t in args.op_tokens.split(",")], args.op_reps,
        )
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=2))
    table = step_table(result) + ("\n" + operator_table(result["operator"]) if args.operator else "")
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    plot(result, os.path.join(args.out, "bench.png"))
    print(table)
    print(f"wrote {args.out}/results.json, table.md, bench.png")
    return 0
