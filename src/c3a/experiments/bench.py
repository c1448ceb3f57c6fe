"""`c3a bench`: training-step time and peak memory of C³A against the baselines, side by side.

Every method runs in its own worker process (so each one's peak memory is its own), all workers are
alive at once, and the parent interleaves them: round after round, each worker runs one timed step
while the others wait. Machine noise thus hits all methods alike; ratios to LoRA are taken per round
(paired) and their median reported. Models are built from configs with random weights (no download).

The operator grid times one adapted layer's forward + backward through the public functional entry points
(``base(x)`` then :func:`c3a.functional.add_block_circular_conv`, each path forced in turn) against PEFT's LoRA
and C3A layers, interleaved round by round, with CUDA events on GPU; each C³A path is first checked against a
float64 dense reference.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from c3a.functional import add_block_circular_conv, block_circulant_linear, circulant_matrix
from c3a.io import atomic_path, atomic_write_text, check_writable

HALF_ADAPTER_SUFFIX = "-bf16"  # e.g. "lora-bf16:32": PEFT's LoRA with its adapter weights kept in bf16


@dataclass(frozen=True)
class Spec:
    """``name[:value]``: the value is the block size for C³A methods, the rank for LoRA/VeRA. A name ending in
    ``-bf16`` is the registry's method with its trainable weights cast to bf16 (PEFT's default keeps adapter
    weights in fp32 on a bf16 model)."""

    name: str
    value: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "Spec":
        from .methods import METHODS

        name, _, value = text.partition(":")
        if name != "frozen" and name.removesuffix("-bf16") not in METHODS:
            raise ValueError(f"--methods: unknown method {name!r}; choose from frozen, {', '.join(METHODS)} (or NAME-bf16)")
        if value and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"--methods: {text!r}: the value after ':' must be a positive integer")
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
    net = AutoModel.from_config(config, dtype=dtype).to(device)  # built in dtype: no fp32 copy in the peak
    if spec.name == "frozen":  # the floor: backprop through every layer, no parameter to update
        for p in net.parameters():
            p.requires_grad_(False)
        net.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return net
    options = MethodOptions()
    if spec.value is not None:
        options.block_size = options.rank = spec.value
    name = spec.name.removesuffix(HALF_ADAPTER_SUFFIX)
    net = build_method(net, name, options)
    if name != spec.name:
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return net


def _peak_memory(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def _autocast(device: str, enabled: bool):
    """bf16 autocast on ``device`` (a no-op context when not ``enabled``)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def _worker(conn, model, spec, layers, batch, seq, dtype, device, threads, autocast=False, compiled=False):
    """Build one method's model (``torch.compile``'d, default mode, when ``compiled``: the first steps compile),
    then run a training step whenever the parent asks."""
    try:
        if threads:
            torch.set_num_threads(threads)
        net = build_model(model, spec, layers, getattr(torch, dtype), device)
        forward = torch.compile(net) if compiled else net
        params = [p for p in net.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        vocab = net.config.vocab_size if hasattr(net, "config") else 1000
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

        def step() -> float:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with _autocast(device, autocast):
                hidden = forward(input_ids=ids).last_hidden_state
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
        conn.send(("error", (isinstance(e, ValueError), f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


@contextlib.contextmanager
def _spawned(target, argument_tuples):
    """One spawned worker process per argument tuple, ``target(conn, *args)``, each with its end of a pipe; those
    still alive on the way out (an error, an interrupt) are killed."""
    ctx = mp.get_context("spawn")
    workers = []
    try:
        for args in argument_tuples:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_quietly, args=(target, child, *args), daemon=True)
            proc.start()
            workers.append((parent, proc))
        yield workers
    finally:
        for _, proc in workers:
            if proc.is_alive():
                proc.kill()


def _quietly(target, *args) -> None:
    """A spawned worker starts with default warning filters: quiet what the command quiets in its own process."""
    from c3a.cli import quiet_third_parties

    quiet_third_parties()
    target(*args)


def _ask(conn, where: str, request: Optional[str] = None):
    """Send ``request`` (if any) and return the worker's answer. A failure it reports is raised here, naming
    ``where``: a ``ValueError`` there (a block size that fits no layer, a method that cannot build on this model) is
    the user's input, one line; anything else is a bug."""
    if request is not None:
        conn.send(request)
    kind, value = conn.recv()
    if kind == "error":
        user_error, message = value
        raise (ValueError if user_error else RuntimeError)(f"{where}: {message}")
    return value


def _finish(conn, proc, where: str):
    """Stop a worker: its peak memory report, then the process joined."""
    memory = _ask(conn, where, "stop")
    proc.join()
    return memory


def time_methods(model, specs, layers, batch, seq, dtype, device, threads, warmup, rounds, autocast=False,
                 compiled=False) -> list[dict]:
    """One worker per method, steps interleaved round by round; with ``compiled``, each method twice, eager and
    ``torch.compile``'d, each compared with LoRA run the same way."""
    runs = [(spec, mode) for mode in ((False, True) if compiled else (False,)) for spec in specs]
    rows = []
    with _spawned(_worker, [(model, spec, layers, batch, seq, dtype, device, threads, autocast, mode)
                            for spec, mode in runs]) as workers:
        for (spec, mode), (conn, _) in tqdm(list(zip(runs, workers)), desc="building models", leave=False):
            rows.append({"method": spec.name, "label": spec.label + (", compiled" if mode else ""), "value": spec.value,
                         "compiled": mode, "trainable_params": _ask(conn, spec.label), "step_seconds": []})
        for r in tqdm(range(warmup + rounds), desc="interleaved steps"):
            for row, (spec, _), (conn, _) in zip(rows, runs, workers):
                seconds = _ask(conn, spec.label, "step")
                if r >= warmup:
                    row["step_seconds"].append(seconds)
        for row, (spec, _), (conn, proc) in zip(rows, runs, workers):
            row["peak_memory_bytes"], row["memory_kind"] = _finish(conn, proc, spec.label)
    _add_ratios(rows, "step_seconds")
    return rows


def _add_ratios(rows: list[dict], key: str) -> None:
    """Median, spread and the median of per-round ratios to LoRA run the same way, eager or compiled (paired: same
    round, same noise)."""
    for row in rows:
        lora = next((r for r in rows if r["method"] == "lora" and r.get("compiled") == row.get("compiled")), None)
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


# -- serving many adapters ------------------------------------------------------------------------------------
SERVE_PROMPT, SERVE_NEW_TOKENS = 16, 16


def build_served_model(model: str, spec: Spec, adapters: int, layers: Optional[int], dtype: torch.dtype, device: str):
    """``model`` (random weights; a causal LM when its config is one, so that it can generate) with ``adapters``
    adapters ``a0, a1, ...`` of one method (c3a: block size ``spec.value``; lora: rank), every one non-zero and
    different, or the bare model for ``frozen``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    from c3a import C3AConfig
    from c3a.paper_models import model_config, query_value_targets

    config = model_config(model)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    net = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype).to(device).eval()
    if spec.name == "frozen":
        return net, causal
    targets = query_value_targets(net)
    if spec.name == "c3a":
        adapter = C3AConfig(block_size=spec.value or 64, target_modules=targets, init_weights="xavier_uniform")
    elif spec.name == "lora":
        rank = spec.value or 8
        adapter = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    else:
        raise ValueError(f"--serve: {spec.label} cannot route rows to adapters; use c3a, lora and frozen")
    net = get_peft_model(net, adapter, adapter_name="a0")
    for i in range(1, adapters):
        net.add_adapter(f"a{i}", adapter)  # a fresh random initialisation each
    return net.to(device).eval(), causal


def _serve_worker(conn, model, spec, adapters, layers, batch, seq, dtype, device, threads):
    """Build one served model, then time a mixed-batch forward or ``generate`` whenever the parent asks."""
    try:
        if threads:
            torch.set_num_threads(threads)
        net, causal = build_served_model(model, spec, adapters, layers, getattr(torch, dtype), device)
        vocab = net.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
        prompt = torch.randint(1, vocab, (batch, SERVE_PROMPT), generator=g).to(device)
        routed = {} if spec.name == "frozen" else {"adapter_names": [f"a{i % adapters}" for i in range(batch)]}
        adapter_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                            if "c3a_kernel" in n or "lora_" in n)

        def timed(fn):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start

        calls = {"forward": lambda: net(input_ids=ids, **routed)}
        if causal:
            calls["generate"] = lambda: net.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SERVE_NEW_TOKENS,
                min_new_tokens=SERVE_NEW_TOKENS, do_sample=False, pad_token_id=0, **routed,
            )
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        conn.send(("ready", {"adapter_bytes": adapter_bytes, "calls": list(calls)}))
        while (request := conn.recv()) != "stop":
            conn.send(("time", timed(calls[request])))
        conn.send(("memory", _peak_memory(device)))
    except Exception as e:  # report, so the parent can name the failing method
        conn.send(("error", (isinstance(e, ValueError), f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def serve_methods(model, specs, counts, layers, batch, seq, dtype, device, threads, warmup, rounds) -> list[dict]:
    """For each adapter count N: one worker per method, a batch whose row i names adapter ``a{i mod N}``, forward
    and (causal LMs) ``generate`` timed in interleaved rounds; ratios to the first LoRA row with the same N."""
    rows = []
    for n in tqdm(counts, desc="adapter counts"):
        group = []
        arguments = [(model, spec, n, layers, batch, seq, dtype, device, threads) for spec in specs]
        with _spawned(_serve_worker, arguments) as workers:
            for spec, (conn, _) in zip(specs, workers):
                ready = _ask(conn, f"{spec.label}, {n} adapters")
                group.append({"method": spec.name, "label": spec.label, "value": spec.value,
                              "adapters": 0 if spec.name == "frozen" else n,
                              "distinct_in_batch": 0 if spec.name == "frozen" else min(n, batch),
                              "adapter_bytes": ready["adapter_bytes"], **{f"{c}_seconds": [] for c in ready["calls"]}})
            for r in range(warmup + rounds):
                for call in ("forward", "generate"):
                    for row, spec, (conn, _) in zip(group, specs, workers):
                        if f"{call}_seconds" not in row:
                            continue
                        seconds = _ask(conn, f"{spec.label}, {n} adapters, {call}", call)
                        if r >= warmup:
                            row[f"{call}_seconds"].append(seconds)
            for row, spec, (conn, proc) in zip(group, specs, workers):
                row["peak_memory_bytes"], row["memory_kind"] = _finish(conn, proc, f"{spec.label}, {n} adapters")
        lora = next((row for row in group if row["method"] == "lora"), None)
        for row in group:
            for call in ("forward", "generate"):
                times = row.get(f"{call}_seconds")
                if not times:
                    continue
                row[f"{call}_ms"] = 1e3 * statistics.median(times)
                if lora is not None:
                    row[f"{call}_ratio_to_lora"] = _paired_ratio(times, lora[f"{call}_seconds"])
            if row.get("generate_seconds"):
                row["generate_tokens_per_s"] = batch * SERVE_NEW_TOKENS / statistics.median(row["generate_seconds"])
        rows += group
    return rows


def serve_table(result: dict) -> str:
    rows = result["serve"]
    lines = [
        f"Serving mixed batches, {result['model']} ({result['layers'] or 'all'} layers), {result['serve_batch']} rows "
        f"(row i → adapter i mod N), forward over {result['seq']} tokens"
        + (f", generate {SERVE_PROMPT}+{SERVE_NEW_TOKENS} tokens (greedy)" if any("generate_ms" in r for r in rows) else "")
        + f", {result['dtype']}, {result['device_name']}, {result['rounds']} interleaved rounds; × LoRA: median of "
          "paired ratios to the first LoRA row with the same N. Memory: " + str(rows[0]["memory_kind"]) + ".",
        "",
        "| method | adapters N | distinct in batch | adapter weights | forward ms | × LoRA | generate ms | × LoRA | "
        "generate tokens/s | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "–"

    for r in rows:
        lines.append(
            f"| {r['label']} | {r['adapters']} | {r['distinct_in_batch']} | {r['adapter_bytes'] / 2**20:.2f} MiB | "
            f"{cell(r, 'forward_ms', '.1f')} | {cell(r, 'forward_ratio_to_lora', '.3f')} | {cell(r, 'generate_ms', '.1f')} | "
            f"{cell(r, 'generate_ratio_to_lora', '.3f')} | {cell(r, 'generate_tokens_per_s', '.0f')} | "
            f"{_fmt_bytes(r['peak_memory_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_serve(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["serve"] if r["method"] != "frozen"]
    calls = [c for c in ("forward", "generate") if any(f"{c}_ms" in r for r in rows)]
    fig, axes = plt.subplots(1, len(calls), figsize=(5.5 * len(calls), 4.2), squeeze=False)
    for ax, call in zip(axes[0], calls):
        for label in dict.fromkeys(r["label"] for r in rows):
            sel = [r for r in rows if r["label"] == label and f"{call}_ms" in r]
            ax.plot([r["adapters"] for r in sel], [r[f"{call}_ms"] for r in sel], "o-", label=label,
                    color="tab:red" if "c3a" in label else None)
        frozen = [r for r in result["serve"] if r["method"] == "frozen" and f"{call}_ms" in r]
        if frozen:
            ax.axhline(statistics.median(r[f"{call}_ms"] for r in frozen), color="k", ls="--", label="frozen model")
        ax.set(xscale="log", xlabel="adapters N in the batch", ylabel=f"{call} ms (median)", title=call)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['serve_batch']} rows, {result['device_name']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# -- operator micro-benchmark --------------------------------------------------------------------------------
def _timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of ``fn`` takes: CUDA events around it on GPU (device time, no host jitter), else a
    monotonic clock."""
    if device.startswith("cuda"):
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def _median_time(fn, device: str, reps: int) -> float:
    timer = _timer(device)
    fn()
    return statistics.median(timer(fn) for _ in range(reps))


def copy_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Measured device memory bandwidth (bytes/s) of a large copy: the yardstick for the operator."""
    x = torch.empty(64 * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    seconds = _median_time(lambda: x.clone(), device, 10)
    return 2 * x.numel() * x.element_size() / seconds


def _peak_extra_bytes(fn, device: str) -> Optional[int]:
    """Peak device memory one call allocates beyond what is already held (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_against_float64(x, kernel, grad, paths, autocast: bool) -> dict[str, float]:
    """Normwise relative error (forward delta, input and kernel gradient; the worst of the three) of each C³A
    path against the float64 dense ``x @ C(k)ᵀ``, on the given (few) tokens. A wrong path errs by O(1)."""
    x64 = x.detach().double().requires_grad_()
    k64 = kernel.detach().double().requires_grad_()
    ref = x64 @ circulant_matrix(k64).T
    ref.backward(grad.double())
    errors = {}
    for path in paths:
        xp, kp = x.detach().requires_grad_(), kernel.detach().requires_grad_()
        with _autocast(x.device.type, autocast):
            y = add_block_circular_conv(torch.zeros_like(grad), xp, [kp], path=path)
        y.backward(grad)
        errors[path] = max(
            ((a.double() - b).norm() / b.norm()).item() for a, b in [(y, ref), (xp.grad, x64.grad), (kp.grad, k64.grad)]
        )
    return errors


def lora_layer(base, rank: int, dtype: torch.dtype):
    """PEFT's LoRA layer of ``rank`` (alpha 2·rank) over ``base``, adapter weights in ``dtype``, B not zero so that
    backward does the work of a trained adapter."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=2 * rank)
    layer = LoraLinear(base, "default", config, r=rank, lora_alpha=2 * rank)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # not zero: the real backward shapes
    for module in (layer.lora_A, layer.lora_B):
        module.to(dtype)
    return layer


def _peft_c3a_layer(base, block_size: int):
    from peft import C3AConfig as PeftC3AConfig
    from peft.tuners.c3a import C3ALinear as PeftC3ALinear

    config = PeftC3AConfig(block_size=block_size, init_weights="xavier_uniform")
    return PeftC3ALinear(base, "default", config, block_size=block_size)


def _paired_ratio(values: list[float], lora: list[float]) -> float:
    """Median of per-round ratios to LoRA's time above the frozen layer; rounds where noise left LoRA's at or
    below zero give no ratio (NaN when none is left)."""
    if values is lora:
        return 1.0
    ratios = [a / lo for a, lo in zip(values, lora) if lo > 0]
    return statistics.median(ratios) if ratios else float("nan")


def operator_grid(device: str, dtype: torch.dtype, shapes, block_sizes, token_counts, reps: int,
                  warmup: int = 2, lora_rank: Optional[int] = None, autocast: bool = False) -> list[dict]:
    """Forward + backward of one adapted layer over (d_in, d_out, b, tokens), every method once per round,
    rounds interleaved. Methods: the frozen layer alone; PEFT's LoRA (rank ``lora_rank``, default the rank with
    C³A's parameter count) with fp32 adapter weights (PEFT's default) and with adapters in ``dtype``; PEFT's
    C3A layer; ours through :func:`add_block_circular_conv` — its own choice ("c3a") and each path forced
    ("c3a_dft" and "c3a_dense" in half precision, "c3a_fft", and for fp32 weights without autocast the layer's
    folded GEMM, "c3a_fold"). ``adapter_ms`` is the median over rounds of (method − frozen) in the same round."""
    half = dtype in (torch.float16, torch.bfloat16) or autocast
    rows = []
    bandwidth = copy_bandwidth(device, dtype)
    grid = [(s, b, t) for s in shapes for b in block_sizes for t in token_counts if s[0] % b == 0 and s[1] % b == 0]
    timer = _timer(device)
    for (d_in, d_out), b, tokens in tqdm(grid, desc="operator grid"):
        torch.manual_seed(0)
        base = torch.nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
        rank = lora_rank or max(1, round(d_in * d_out / b / (d_in + d_out)))
        bound = (6 / (d_in + d_out)) ** 0.5  # xavier, as the layer initialises kernels
        kernel = torch.empty(d_out // b, d_in // b, b, device=device).uniform_(-bound, bound).requires_grad_()
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        paths = (["dft"] if half and b % 2 == 0 else []) + (["dense"] if half else []) + ["fft"]
        few = min(tokens, 256)
        check = check_against_float64(x[:few], kernel / d_in, grad[:few], paths, autocast)
        if max(check.values()) > 0.1:
            raise RuntimeError(f"C³A path disagrees with the float64 reference at {(d_in, d_out, b)}: {check}")
        lora = lora_layer(base, rank, torch.float32)
        lora_half = lora_layer(base, rank, dtype) if dtype != torch.float32 else None
        peft_c3a = _peft_c3a_layer(base, b)

        def step(forward):
            def run():
                x.grad = kernel.grad = None
                with _autocast(device, autocast):
                    y = forward()
                y.backward(grad)
            return run

        def ours(path=None):
            return lambda: add_block_circular_conv(base(x), x, [kernel / d_in], path=path, inplace=True)  # as the layer

        methods = {"frozen": step(lambda: base(x)), "lora": step(lambda: lora(x))}
        if lora_half is not None:
            methods["lora_half"] = step(lambda: lora_half(x))
        methods["peft_c3a"] = step(lambda: peft_c3a(x))
        methods["c3a"] = step(ours())
        for path in paths:
            methods[f"c3a_{path}"] = step(ours(path))
        if not half:
            methods["c3a_fold"] = step(lambda: block_circulant_linear(x, base.weight, base.bias, [kernel / d_in]))
        peak = {name: _peak_extra_bytes(fn, device) for name, fn in methods.items()}
        times = {name: [] for name in methods}
        for r in range(warmup + reps):
            for name, fn in methods.items():
                t = timer(fn)
                if r >= warmup:
                    times[name].append(t)
        above = {k: [t - f for t, f in zip(v, times["frozen"])] for k, v in times.items() if k != "frozen"}
        # Minimal traffic of the adapter alone: read x, write its output, read both back in backward.
        io_bytes = 2 * tokens * (d_in + d_out) * x.element_size()
        rows.append({
            "d_in": d_in, "d_out": d_out, "block_size": b, "tokens": tokens, "lora_rank": rank,
            "dtype": str(dtype).removeprefix("torch."), "autocast": autocast,
            "check_rel_err": check,
            "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "adapter_ms": {k: 1e3 * statistics.median(v) for k, v in above.items()},
            "adapter_ratio_to_lora": {k: _paired_ratio(v, above["lora"]) for k, v in above.items()},
            "peak_extra_mib": {k: None if v is None else v / 2**20 for k, v in peak.items()},
            "c3a_bandwidth_fraction": io_bytes / max(statistics.median(above["c3a"]), 1e-9) / bandwidth,
        })
    return rows


# -- outputs ---------------------------------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def step_table(result: dict) -> str:
    lines = [
        f"Training step, {result['model']} ({result['layers'] or 'all'} layers), batch {result['batch']}×{result['seq']}, "
        f"{result['dtype']}{' under bf16 autocast' if result.get('autocast') else ''}"
        f"{', eager and torch.compile (default mode)' if result.get('compile') else ''}, {result['device_name']}, "
        f"{result['threads']} threads; "
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


OPERATOR_LABELS = {
    "lora": "LoRA (fp32 adapters)", "lora_half": "LoRA (adapters in the layer's dtype)", "peft_c3a": "PEFT C3A",
    "c3a": "C³A (auto)", "c3a_dft": "C³A DFT-GEMM", "c3a_dense": "C³A dense", "c3a_fft": "C³A FFT",
    "c3a_fold": "C³A folded",
}


def operator_table(rows: list[dict]) -> str:
    """One line per (shape, b, tokens): the frozen layer's ms, then each method's ms above it and, in brackets,
    its paired ratio to LoRA's; peak memory beyond the inputs where measured (GPU); the check against float64."""
    methods = [m for m in OPERATOR_LABELS if any(m in r["adapter_ms"] for r in rows)]
    r0 = rows[0]
    lines = [
        f"One layer, forward + backward, {r0['dtype']}{' under bf16 autocast' if r0['autocast'] else ''}: "
        "ms above the frozen layer (median of paired differences) [× LoRA's, median of paired ratios]:",
        "",
        "| d_in×d_out | b | tokens | LoRA r | frozen ms | " + " | ".join(OPERATOR_LABELS[m] for m in methods) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for r in rows:
        cells = [f"{r['adapter_ms'][m]:.2f} [{r['adapter_ratio_to_lora'][m]:.2f}]" if m in r["adapter_ms"] else "–"
                 for m in methods]
        lines.append(f"| {r['d_in']}×{r['d_out']} | {r['block_size']} | {r['tokens']} | {r['lora_rank']} | "
                     f"{r['ms']['frozen']:.1f} | " + " | ".join(cells) + " |")
    if r0["peak_extra_mib"]["frozen"] is not None:
        lines += ["", "Peak memory of one forward + backward beyond the inputs (MiB):", "",
                  "| d_in×d_out | b | tokens | frozen | " + " | ".join(OPERATOR_LABELS[m] for m in methods) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(methods)]
        for r in rows:
            cells = [f"{r['peak_extra_mib'][m]:.0f}" if m in r["peak_extra_mib"] else "–" for m in ["frozen", *methods]]
            lines.append(f"| {r['d_in']}×{r['d_out']} | {r['block_size']} | {r['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "Checked first against float64 (`x @ C(k)ᵀ`, forward and both gradients, worst normwise relative "
              "error): " + "; ".join(
                  f"{r['d_in']}×{r['d_out']} b={r['block_size']}: " + ", ".join(f"{p} {e:.1e}" for p, e in r["check_rel_err"].items())
                  for r in rows if r["tokens"] == rows[0]["tokens"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, rows = result["methods"], result.get("operator")
    panels = 2 * bool(methods) + bool(rows)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if methods:
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
    if rows:
        ax = axes[-1]
        shape = (rows[0]["d_in"], rows[0]["d_out"])
        for b in sorted({r["block_size"] for r in rows}):
            sel = [r for r in rows if (r["d_in"], r["d_out"]) == shape and r["block_size"] == b]
            ax.plot([r["tokens"] for r in sel], [r["adapter_ms"]["c3a"] for r in sel], "o-", label=f"C³A b={b}")
        sel = [r for r in rows if (r["d_in"], r["d_out"]) == shape and r["block_size"] == rows[0]["block_size"]]
        ax.plot([r["tokens"] for r in sel], [r["adapter_ms"]["lora"] for r in sel], "k--", label=f"LoRA r={sel[0]['lora_rank']}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="adapter ms (fwd+bwd)", title=f"one {shape[0]}×{shape[1]} layer")
        ax.legend(fontsize=8)
    title = f"{result['model']}, batch {result['batch']}×{result['seq']}, " if methods else ""
    fig.suptitle(f"{title}{result['device_name']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


# -- command ---------------------------------------------------------------------------------------------------
def _positive_ints(option: str, text: str, sep: str = ",") -> list[int]:
    values = [v.strip() for v in text.split(sep)]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise ValueError(f"{option}: {text!r} must be positive integers separated by {sep!r}")
    return [int(v) for v in values]


def run(args) -> int:
    """``c3a bench`` (options: :mod:`c3a.experiments.bench_cli`): every input checked before any worker starts."""
    check_writable("--out", args.out)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = [Spec.parse(s) for s in args.methods.split(",") if s] if not args.serve else []
    serve_specs, counts = [], []
    if args.serve:
        counts = _positive_ints("--serve", args.serve)
        serve_specs = [Spec.parse(s) for s in args.serve_methods.split(",") if s]
        unsupported = [s.label for s in serve_specs if s.name not in ("frozen", "lora", "c3a")]
        if unsupported or not serve_specs:
            raise ValueError(f"--serve-methods: {', '.join(unsupported) or 'nothing given'}: choose from frozen, "
                             "lora:RANK, c3a:BLOCK_SIZE (methods that route rows to adapters)")
        if args.compile:
            raise ValueError("--compile times training steps; it does not combine with --serve")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not specs and not serve_specs and not args.operator:
        raise ValueError("nothing to run: give --methods, --serve or --operator")
    if args.compile and not specs:
        raise ValueError("--compile times the methods' training steps: give --methods")
    if args.compile and args.warmup < 2:
        raise ValueError(f"--compile needs --warmup of at least 2 (the first steps compile), got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    if specs or serve_specs:  # a bad --model fails here, in one line, not inside every worker
        from c3a.paper_models import model_config

        model_config(args.model)
    if args.operator:  # every list is checked before any worker starts
        shapes = [tuple(_positive_ints("--op-shapes", s, "x")) for s in args.op_shapes.split(",")]
        if any(len(shape) != 2 for shape in shapes):
            raise ValueError(f"--op-shapes: {args.op_shapes!r} must be IN_xOUT pairs such as 768x768,4096x1024")
        blocks, tokens = _positive_ints("--op-blocks", args.op_blocks), _positive_ints("--op-tokens", args.op_tokens)
        if not any(d_in % b == 0 and d_out % b == 0 for d_in, d_out in shapes for b in blocks):
            raise ValueError(f"--op-blocks {args.op_blocks}: no block size divides both sides of any --op-shapes "
                             f"{args.op_shapes}")
    rows = time_methods(args.model, specs, args.layers, args.batch, args.seq, dtype, args.device, args.threads,
                        args.warmup, args.rounds, args.autocast, args.compile) if specs else []
    if args.threads:  # the operator grid runs in this process
        torch.set_num_threads(args.threads)
    result = {
        "experiment": "bench", "model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "dtype": dtype, "autocast": args.autocast, "device": args.device, "device_name": _device_name(args.device),
        "threads": args.threads or torch.get_num_threads(), "rounds": args.rounds, "compile": args.compile,
        "memory_kind": rows[0]["memory_kind"] if rows else None, "methods": rows,
    }
    if serve_specs:
        result["serve_batch"] = args.serve_batch
        result["serve"] = serve_methods(args.model, serve_specs, counts, args.layers, args.serve_batch, args.seq, dtype,
                                        args.device, args.threads, args.warmup, args.rounds)
    if args.operator:
        result["operator"] = operator_grid(
            args.device, getattr(torch, dtype), shapes, blocks, tokens, args.op_reps, lora_rank=args.op_lora_rank,
            autocast=args.autocast,
        )
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(result, indent=2))
    table = "\n".join(([step_table(result)] if rows else []) + ([serve_table(result)] if serve_specs else [])
                      + ([operator_table(result["operator"])] if args.operator else []))
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    charts = []
    if rows or args.operator:
        plot(result, os.path.join(args.out, "bench.png"))
        charts.append("bench.png")
    if serve_specs:
        plot_serve(result, os.path.join(args.out, "serve.png"))
        charts.append("serve.png")
    print(table)
    print(f"wrote {args.out}/results.json, table.md, {', '.join(charts)}")
    return 0
