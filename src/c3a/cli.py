"""The `c3a` command. Thin: it picks the command's module, lets it declare its arguments, and calls it.

A command ``name`` lives in ``MODULE`` as ``add_<name>_arguments(parser)`` and ``run_<name>(args)``
(dashes become underscores). Only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "demo": ("c3a.experiments.synthetic", "synthetic expressiveness experiment (paper Fig. 3): dense vs rank-1 vs C³A"),
    "rank": ("c3a.analysis_cli", "exact rank of each adapted layer's ΔW, from the kernels alone"),
    "params": ("c3a.analysis_cli", "trainable parameters and time/space terms of a method on a model (no download)"),
    "export-lora": ("c3a.analysis_cli", "convert a C³A adapter to the best rank-R PEFT LoRA adapter"),
    "glue": ("c3a.experiments.glue", "fine-tune one method on one GLUE task (paper Table 2)"),
    "bench": ("c3a.experiments.bench", "training-step time and peak memory of C³A vs the baselines, side by side"),
    "glue-suite": ("c3a.experiments.glue", "run a GLUE grid of methods x tasks x seeds, write table.md and a chart"),
    "sft": ("c3a.experiments.instruct", "instruction-tune a causal LM on GSM8K/MetaMathQA/ViGGO/SQL/Alpaca data, score by generation (paper Table 3)"),
    "vit": ("c3a.experiments.vision", "fine-tune an image classifier (ViT) on a hub dataset or image folders (paper Table 4)"),
}


def _function(name: str, prefix: str):
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, f"{prefix}_{name.replace('-', '_')}" + ("_arguments" if prefix == "add" else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="c3a", description="C³A: circular convolution adaptation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _function(name, "add")(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result = _function(args.command, "run")(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
