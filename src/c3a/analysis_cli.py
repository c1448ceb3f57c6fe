"""``c3a rank``, ``c3a params`` and ``c3a export-lora``: argument parsing and printing around :mod:`c3a.rank`,
:mod:`c3a.export` and :mod:`c3a.experiments.params`.

A command-line module, not part of the library: it may import the experiments (``c3a params`` counts any method of
the registry), and nothing in the library imports it (docs/design.md). Torch and PEFT are imported when a command
runs, not when its options are declared (``c3a rank --help`` answers at once)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from .argtypes import block_size, positive_int
from .experiments.params import counted_methods
from .io import check_outputs_apart, check_writable

if TYPE_CHECKING:
    from .rank import LayerRank


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


# -- c3a rank ---------------------------------------------------------------------------------------------


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", nargs="+",
                   help="adapter folder(s) (written by save_pretrained) or hub id(s): C3A, or PEFT LoRA for comparison; "
                        "with several, each one's table and then the share of full-rank layers over all of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="also draw each layer's singular-value spectrum")


def plot_spectra(layers: list[LayerRank], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in layers:
        values = layer.singular_values[layer.singular_values > 0]
        ax.semilogy(range(1, len(values) + 1), values.numpy(), alpha=0.7 if len(layers) > 10 else 1.0,
                    label=f"{layer.name} (rank {layer.rank})")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of ΔW")
    ax.set_title("Singular values of each layer's ΔW")
    if len(layers) <= 10:
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _structure(layer: LayerRank) -> str:
    return f"LoRA r={layer.lora_rank}" if layer.lora_rank is not None else str(layer.block_size)


def _rank_summary(layers: list[LayerRank]) -> str:
    full = sum(layer.full_rank for layer in layers)
    return f"full rank: {full} of {len(layers)} layers ({100 * full / len(layers):.1f}%)"


def run_rank(args: argparse.Namespace) -> int:
    from .rank import adapter_ranks

    check_outputs_apart({"--plot": args.plot}, {f"ADAPTER {source}": source for source in args.adapter})
    check_writable("--plot", args.plot, folder=False)
    per_adapter = {source: adapter_ranks(source) for source in args.adapter}
    layers = [layer for found in per_adapter.values() for layer in found]
    fraction = sum(layer.full_rank for layer in layers) / len(layers)
    if args.plot:
        several = len(per_adapter) > 1
        plot_spectra([dataclasses.replace(layer, name=f"{source}: {layer.name}") if several else layer
                      for source, found in per_adapter.items() for layer in found], args.plot)  # fmt: skip
    ranks = dict(sorted(Counter((layer.rank, min(layer.shape)) for layer in layers).items()))
    if args.json:
        if len(per_adapter) == 1:
            report = {"layers": [layer.to_dict() for layer in layers], "full_rank_fraction": fraction}
        else:
            report = {"adapters": {source: {"layers": [layer.to_dict() for layer in found],
                                            "full_rank_fraction": sum(x.full_rank for x in found) / len(found)}
                                   for source, found in per_adapter.items()},
                      "full_rank_fraction": fraction,
                      "rank_counts": [{"rank": r, "max": m, "layers": n} for (r, m), n in ranks.items()]}  # fmt: skip
        print(json.dumps(report, indent=2))
        return 0
    for source, found in per_adapter.items():
        if len(per_adapter) > 1:
            print(f"## {source}\n")
        rows = [[layer.name, f"{layer.shape[0]}×{layer.shape[1]}", _structure(layer), layer.rank,
                 "yes" if layer.full_rank else f"no (max {min(layer.shape)})"] for layer in found]  # fmt: skip
        print(_table(["layer", "d_out×d_in", "block size", "rank of ΔW", "full rank"], rows))
        print(f"\n{_rank_summary(found)}\n")
    if len(per_adapter) > 1:
        counts = ", ".join(f"rank {r} of {m}: {n}" for (r, m), n in ranks.items())
        print(f"all {len(per_adapter)} adapters: {_rank_summary(layers)}; {counts}")
    if args.plot:
        print(f"spectra: {args.plot}")
    return 0


# -- c3a params -------------------------------------------------------------------------------------------


def add_params_arguments(p: argparse.ArgumentParser) -> None:
    from .paper_models import MODEL_SHORTCUTS, PAPER_MODELS

    p.add_argument("--model", required=True,
                   help=f"{', '.join([*PAPER_MODELS, *MODEL_SHORTCUTS])}, or any hub id / folder with a config.json "
                        "(config only)")
    p.add_argument("--method", required=True, choices=counted_methods(), help="the method to count")
    p.add_argument("--block-size", type=block_size, default="auto",
                   help='C³A block size, or "auto" (the default): per layer, within LoRA rank --rank\'s parameters')
    p.add_argument("--rank", type=positive_int, default=8,
                   help="LoRA/VeRA rank; with --block-size auto the LoRA rank to match (default: 8)")
    p.add_argument("--targets", help="comma-separated module names (default: the paper's, PEFT's defaults)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_params(args: argparse.Namespace) -> int:
    from .experiments.params import count_parameters

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    report = count_parameters(args.model, args.method, block_size=args.block_size, rank=args.rank, targets=targets)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    settings = ", ".join(f"{k}={v}" for k, v in report.options.items() if k != "targets")
    print(f"{report.model} · {report.method}" + (f" ({settings})" if settings else "")
          + f" · targets {', '.join(report.options['targets'])}")
    print(f"trainable parameters: {report.trainable_params:,} (heads excluded; {report.counted})")
    c = report.complexity
    print(f"per adapted d1×d2 layer (d1 = out, d2 = in; {c.source}):")
    print(f"  extra time per token  {c.time}\n  space (trainable)     {c.space}\n")
    # Layers of one kind and shape share every number: one row per group.
    groups: dict[tuple, list[str]] = defaultdict(list)
    for layer in report.layers:
        key = (layer["name"].rsplit(".", 1)[-1], layer["d1"], layer["d2"], layer.get("block_size"),
               layer["params"], layer["time"], layer["space"])
        groups[key].append(layer["name"])
    header = ["layers", "d1×d2"] + (["b"] if report.method == "c3a" else []) + ["params/layer", "time", "space"]
    rows = []
    for (short, d1, d2, b, params, time, space), names in groups.items():
        rows.append([f"{short} ×{len(names)}", f"{d1}×{d2}"] + ([b] if report.method == "c3a" else [])
                    + [f"{params:,}", _number(time), _number(space)])
    print(_table(header, rows))
    if report.block_size_choices:
        print(f"\nblock_size=auto, matching LoRA r={args.rank} per layer:")
        seen = set()
        for name, choice in report.block_size_choices.items():
            shape = next((layer["d1"], layer["d2"]) for layer in report.layers if layer["name"] == name)
            if shape not in seen:
                seen.add(shape)
                print(f"  {shape[0]}×{shape[1]}: b={choice.block_size} — {choice.reason}")
    return 0


# -- c3a export-lora --------------------------------------------------------------------------------------


def add_export_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="C³A adapter folder (ours or PEFT's), or a hub id")
    p.add_argument("--rank", type=positive_int, required=True, help="LoRA rank R")
    p.add_argument("--out", required=True, help="folder for the PEFT LoRA adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--json", action="store_true", help="print the per-layer report as JSON")


def run_export_lora(args: argparse.Namespace) -> int:
    from peft.utils import CONFIG_NAME

    from .export import to_lora

    check_outputs_apart({"--out": args.out}, {"ADAPTER": args.adapter})
    check_writable("--out", args.out)
    if os.path.isfile(os.path.join(args.out, CONFIG_NAME)) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already holds an adapter ({CONFIG_NAME}); pass --overwrite to replace it")
    export = to_lora(args.adapter, args.rank, progress=True)
    export.save_pretrained(args.out)
    if args.json:
        print(json.dumps({"out": args.out, "rank": args.rank, "layers": export.layers}, indent=2))
        return 0
    rows = [[layer["name"], f"{layer['shape'][0]}×{layer['shape'][1]}", layer["rank"],
             f"{layer['relative_error']:.3e}", "yes" if layer["exact"] else "no"] for layer in export.layers]
    print(_table(["layer", "d_out×d_in", "rank of ΔW", "‖ΔW − BA‖/‖ΔW‖", "exact"], rows))
    print(f"\nwrote a PEFT LoRA adapter (r = lora_alpha = {args.rank}) to {args.out}")
    return 0
