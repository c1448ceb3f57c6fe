"""`c3a demo`'s options; the experiment is :mod:`c3a.experiments.synthetic`, imported when the command runs (so
that `c3a demo --help` needs no torch)."""

from __future__ import annotations

import argparse

from c3a.argtypes import positive_int

STEPS = 2000  # full-batch Adam steps of every run


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="c3a-demo", help="output folder")
    parser.add_argument("--seeds", type=positive_int, default=3, help="number of seeds, 0..N-1")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help="full-batch Adam steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")


def run_demo(args: argparse.Namespace) -> int:
    from c3a.io import check_writable

    check_writable("--out", args.out)  # before the run, not after it
    from c3a.experiments.synthetic import run_demo

    return run_demo(args)
