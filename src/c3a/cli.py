"""The `c3a` command. Thin: it picks the command's module, lets it declare its arguments, and calls it.

A command ``name`` lives in ``MODULE`` as ``add_<name>_arguments(parser)`` and ``run_<name>(args)``
(dashes become underscores). Only the chosen command's module is imported.

Errors: on the command line a user error (bad argument, missing folder, bad data — :data:`USER_ERRORS`) prints
one line ``c3a <command>: error: ...`` and exits 2; ``c3a --debug <command> ...`` shows the traceback instead.
Any other exception is a bug and keeps its traceback. ``main([...])`` called from Python (tests, scripts) raises
the exception itself, unless ``one_line_errors=True``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Exceptions that report a problem with the user's input, not a bug in c3a: printed as one line (exit 2).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
    ConnectionError,  # the hub out of reach (c3a.hub names what needed it)
)

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "demo": ("c3a.experiments.demo", "synthetic expressiveness experiment (paper Fig. 3): dense vs rank-1 vs C³A"),
    "rank": ("c3a.analysis_cli", "exact rank of each adapted layer's ΔW, from the kernels alone"),
    "params": ("c3a.analysis_cli", "trainable parameters and time/space terms of a method on a model (no download)"),
    "export-lora": ("c3a.analysis_cli", "convert a C³A adapter to the best rank-R PEFT LoRA adapter"),
    "glue": ("c3a.experiments.glue", "fine-tune one method on one GLUE task (paper Table 2)"),
    "bench": ("c3a.experiments.bench_cli", "training-step time and peak memory of C³A vs the baselines, side by side"),
    "glue-suite": ("c3a.experiments.glue", "run a GLUE grid of methods x tasks x seeds, write table.md and a chart"),
    "sft": ("c3a.experiments.instruct", "instruction-tune a causal LM on GSM8K/MetaMathQA/ViGGO/SQL/Alpaca data, score by generation (paper Table 3)"),
    "sft-suite": ("c3a.experiments.instruct", "run an instruction-tuning grid of methods x formats x seeds, write table.md and a chart"),
    "vit": ("c3a.experiments.vision", "fine-tune an image classifier (ViT) on a hub dataset or image folders (paper Table 4)"),
}


def quiet_third_parties() -> None:
    """Silence a notice that tells a c3a user nothing they can act on: transformers' deprecation of the
    ``is_gradient_checkpointing`` property, which PEFT reads whenever it wraps a model (bitsandbytes' import notice
    is quieted by ``c3a`` itself, which imports PEFT before any command runs)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _Help(argparse.HelpFormatter):
    """argparse's ``ArgumentDefaultsHelpFormatter``, less the noise: an option's default is shown unless its help
    already states one, and not when there is none (``None``, an unset flag)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if not action.option_strings or default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # the help text is %-formatted next


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem (and where to find the usage), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _function(name: str, prefix: str):
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, f"{prefix}_{name.replace('-', '_')}" + ("_arguments" if prefix == "add" else ""))


def main(argv: list[str] | None = None, *, one_line_errors: bool | None = None) -> int:
    """Run ``c3a`` with ``argv`` (default: the command line). ``one_line_errors`` (default: only when ``argv`` is
    ``None``, i.e. as the ``c3a`` program) turns user errors into one line on stderr and exit status 2."""
    if one_line_errors is None:
        one_line_errors = argv is None
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_parties()
    parser = _Parser(prog="c3a", description="C³A: circular convolution adaptation", formatter_class=_Help)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        if name == chosen:
            _function(name, "add")(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = _function(args.command, "run")(args)
    except USER_ERRORS as e:
        if args.debug or not one_line_errors:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"c3a {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug or not one_line_errors:
            raise
        print(f"c3a {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
