"""Command-line options shared by the experiment commands (`c3a glue`, `c3a sft`, `c3a vit` and their suites).

Declaring them imports nothing heavy, so that `c3a <command> --help` answers at once; what they turn into at run
time (:func:`c3a.experiments.train.method_options`, :func:`~c3a.experiments.train.train_config`) is in
:mod:`c3a.experiments.train`.
"""

from __future__ import annotations

import argparse

from c3a.argtypes import block_size, fraction, nonnegative_float, nonnegative_int, positive_float, positive_int

# c3a.config.INIT_CHOICES and "zeros" (tests/test_cli.py holds them equal): that module imports PEFT, this one must not
INIT_WEIGHTS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")


def add_method_arguments(parser: argparse.ArgumentParser, setting: str = "classification") -> None:
    """Options of the registry's methods; each left out keeps the method's default (``method_options``), which the
    help states as the registry has it for ``setting`` (:meth:`~c3a.experiments.methods.Method.defaults`)."""
    from c3a.experiments.methods import METHODS, MethodOptions  # no torch: the registry imports none

    # what method_options resolves to when no option is given
    c3a, lora, vera = (MethodOptions(**dict(METHODS[name].defaults(setting).options))
                       for name in ("c3a", "lora", "vera"))
    rank = {"LoRA": lora.rank, "VeRA": vera.rank, "C³A": c3a.rank}
    ranks = f"{lora.rank}" if len(set(rank.values())) == 1 else ", ".join(f"{k} {v}" for k, v in rank.items())
    alpha = "2·rank" if lora.alpha is None else f"{lora.alpha:g}"
    group = parser.add_argument_group("method options (default: the registry's)")
    group.add_argument("--block-size", type=block_size,
                       help="C³A block size, an integer or 'auto' (the default: per layer, the smallest block size "
                       "within LoRA rank --rank's parameters)")
    group.add_argument("--rank", type=positive_int,
                       help=f"LoRA / VeRA rank, and C³A's parameter budget for block size 'auto' (default {ranks})")
    group.add_argument("--alpha", type=positive_float, help=f"LoRA alpha (default {alpha})")
    group.add_argument("--dropout", type=fraction, help=f"LoRA dropout (default {lora.dropout:g})")
    group.add_argument("--targets", nargs="+", help="modules to adapt (default: PEFT's default for the model type)")
    group.add_argument("--init-weights", choices=INIT_WEIGHTS,
                       help=f"C³A kernel init (default {c3a.init_weights}; xavier_uniform is PEFT's; zeros: ΔW starts "
                       "at 0, as LoRA's does)")


def add_save_adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-adapter", action="store_true",
                        help="save the trained adapter (best epoch) to <out>/adapter with PEFT's save_pretrained, "
                        "adapter weights and config only (PEFT methods; the others save nothing)")


def add_training_arguments(
    parser: argparse.ArgumentParser, *, epochs: float, batch_size: int, head: bool = True, seed: bool = True
) -> None:
    """Training options read by ``train_config``; ``head=False`` for models without a new task head,
    ``seed=False`` where the caller declares ``--seed`` itself (a suite runs several)."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_float, default=epochs, help="passes over the training data")
    group.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps (overrides --epochs)")
    group.add_argument("--batch-size", type=positive_int, default=batch_size, help="examples per step, per device")
    group.add_argument("--grad-accum", type=positive_int, default=1,
                       help="gradient accumulation: batches per optimizer step")
    group.add_argument("--lr", type=positive_float, help="learning rate of the method's parameters (default: the method's)")
    if head:
        group.add_argument("--head-lr", type=positive_float, help="learning rate of the task head (default: the method's)")
    group.add_argument("--weight-decay", type=nonnegative_float, help="AdamW weight decay (default: the method's)")
    group.add_argument("--warmup-ratio", type=fraction, default=0.06,
                       help="fraction of the steps with a linear warmup; the learning rate then decays linearly to 0")
    group.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, more time")
    group.add_argument("--group-by-length", action="store_true", help="batch examples of similar length together: less padding, faster")
    if seed:
        group.add_argument("--seed", type=nonnegative_int, default=0, help="initialisation and data order")
