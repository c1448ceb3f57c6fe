"""The `c3a` command as a user meets it: quiet, one line per error."""

import argparse
import importlib
import subprocess
import sys
import warnings

import pytest

from c3a import cli


def test_help_prints_no_third_party_notice():
    """Importing c3a imports PEFT, which imports bitsandbytes, whose CPU backend warns about an optional kernel
    package: that notice must not reach a user of the command."""
    done = subprocess.run([sys.executable, "-m", "c3a.cli", "sft", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--generation-batch-size" in done.stdout
    assert done.stderr == ""


def test_peft_s_deprecated_property_read_is_quiet():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.quiet_third_parties()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def _heavy_imports(argv: list[str]) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after ``c3a ARGV`` (which exits)."""
    code = (
        "import sys\nfrom c3a.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return eval(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_imports_no_heavy_library(command):
    """`c3a --help` and every `c3a COMMAND --help` answer without torch, transformers, PEFT, bitsandbytes or
    datasets: those cost seconds (bitsandbytes alone ~3 s) before anything is printed."""
    argv = ["--help"] if command is None else [command, "--help"]
    assert _heavy_imports(argv) == []


def test_a_bad_argument_imports_no_heavy_library():
    assert _heavy_imports(["glue", "--task", "sst2", "--method", "lora", "--model", "m", "--epochs", "0"]) == []


def _help_blocks(name: str) -> dict[str, str]:
    """``c3a NAME --help`` as ``{first option string: its help text, on one line}``."""
    done = subprocess.run([sys.executable, "-m", "c3a.cli", name, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    blocks, current = {}, None
    for line in done.stdout.splitlines():
        if line.startswith("  -"):
            option, _, rest = line.strip().partition("  ")
            current = option.split(",")[0].split()[0]
            blocks[current] = rest.strip()
        elif current and line.startswith("        "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = argparse.ArgumentParser()
    getattr(importlib.import_module(cli.COMMANDS[name][0]), f"add_{name.replace('-', '_')}_arguments")(parser)
    blocks = _help_blocks(name)
    for action in parser._actions:
        if not action.option_strings or action.option_strings[0] == "-h":
            continue
        text = blocks[action.option_strings[0]]
        assert text, f"{action.option_strings[0]} has no help"
        if action.default not in (None, False, []):
            assert "default" in text, (action.option_strings[0], text)
    if name in ("glue", "sft", "vit"):
        assert blocks["--epochs"] == f"passes over the training data (default: {parser.get_default('epochs')})"
        assert blocks["--warmup-ratio"].endswith("(default: 0.06)")


def test_help_formatter_states_each_default_once():
    parser = argparse.ArgumentParser(formatter_class=cli._Help)
    parser.add_argument("--a", type=int, default=3, help="a number")
    parser.add_argument("--b", default="x", help="a letter (default: x)")
    parser.add_argument("--c", nargs="+", default=["0", "1"], help="a list")
    parser.add_argument("--d", help="nothing by default")
    parser.add_argument("--e", action="store_true", help="a flag")
    parser.add_argument("--f", default="10%", help="a share")
    text = " ".join(parser.format_help().split())
    assert "a number (default: 3)" in text and "a list (default: 0 1)" in text and "a share (default: 10%)" in text
    assert text.count("default") == 5  # b's own, d's word, and a, c, f: none for d or e


def test_init_choices_match_the_config():
    from c3a.config import INIT_CHOICES
    from c3a.experiments.options import INIT_WEIGHTS

    assert INIT_WEIGHTS == (*INIT_CHOICES, "zeros")


@pytest.mark.parametrize("name, setting", [("glue", "classification"), ("sft", "causal-lm")])
def test_method_option_help_states_the_registry_defaults_of_the_command(name, setting):
    """`c3a sft` trains with the registry's causal-LM defaults (LoRA r=32, dropout 0.05, C³A kernels from zero):
    its help says those, not the classification ones."""
    from c3a.experiments.methods import METHODS, MethodOptions

    base = MethodOptions()
    lora, c3a = (dict(METHODS[m].defaults(setting).options) for m in ("lora", "c3a"))
    blocks = _help_blocks(name)
    assert f"(default {lora.get('dropout', base.dropout):g})" in blocks["--dropout"]
    assert f"(default {c3a.get('init_weights', base.init_weights)};" in blocks["--init-weights"]
    rank = blocks["--rank"]
    if setting == "causal-lm":
        assert f"LoRA {lora['rank']}" in rank and f"C³A {c3a['rank']}" in rank, rank
    else:
        assert rank.endswith(f"(default {base.rank})"), rank
    alpha = f"{lora['alpha']:g}" if "alpha" in lora else "2·rank"
    assert blocks["--alpha"] == f"LoRA alpha (default {alpha})"
