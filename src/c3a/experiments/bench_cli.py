"""The `c3a bench` command's options (declared without importing torch, so that `--help` answers at once); the
benchmarks themselves are :mod:`c3a.experiments.bench`."""

from __future__ import annotations

import argparse

from c3a.argtypes import nonnegative_int, positive_int

DEFAULT_METHODS = "frozen,lora:8,c3a:128,c3a:768,peft-c3a:128,vera:256,boft,ia3,bitfit,full"


def add_bench_arguments(p) -> None:
    p.add_argument("--model", default="roberta-base",
                   help="a built-in paper architecture (roberta-base, roberta-large, llama2-7b, llama3-8b, ...), "
                        "a shortcut (minilm), a hub id or a folder with config.json; weights are random")
    p.add_argument("--layers", type=positive_int, default=None, help="number of layers (default: the model's; e.g. 2 for LLaMA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated name[:b or r]; a name ending in -bf16 keeps that method's trainable weights "
                        f"in bf16 (e.g. lora-bf16:32); empty: operator grid only (default: {DEFAULT_METHODS})")
    p.add_argument("--batch", type=positive_int, default=8, help="rows per training step")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per row (random ids)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed rounds first (allocations, caches, compiling)")
    p.add_argument("--rounds", type=positive_int, default=10, help="timed rounds, every method once per round")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--autocast", action="store_true", help="run forward passes under torch.autocast(bfloat16)")
    p.add_argument("--compile", action="store_true",
                   help="also time every method torch.compile'd (default mode), interleaved with the eager steps; "
                        "compiled rows are compared with compiled LoRA (the warm-up steps compile: at least 2)")
    p.add_argument("--serve", default=None, metavar="N,N,...",
                   help="instead of training steps: serve mixed batches with N adapters loaded (e.g. 1,8,64), forward "
                        "and (causal LMs) generate, per --serve-methods")
    p.add_argument("--serve-methods", default="frozen,lora:8,lora:32,c3a:64",
                   help="with --serve: frozen, lora:RANK and c3a:BLOCK_SIZE, comma-separated")
    p.add_argument("--serve-batch", type=positive_int, default=64, help="with --serve: rows per batch")
    p.add_argument("--operator", action="store_true", help="also run the operator micro-benchmark")
    p.add_argument("--op-shapes", default="768x768,1024x1024,4096x4096", help="operator grid: layer shapes IN_xOUT, comma-separated")
    p.add_argument("--op-blocks", default="64,128,256", help="operator grid: block sizes (those dividing a shape)")
    p.add_argument("--op-tokens", default="64,256,1024,4096", help="operator grid: tokens per call")
    p.add_argument("--op-reps", type=positive_int, default=10, help="interleaved timed rounds per grid point")
    p.add_argument("--op-lora-rank", type=positive_int, default=None,
                   help="LoRA rank in the operator grid (default: the rank with C³A's parameter count)")
    p.add_argument("--out", default="c3a-bench", help="folder for results.json, table.md and the charts")


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)
