"""``argparse`` types that reject out-of-range numbers when the command line is parsed (one line, exit 2)."""

from __future__ import annotations

import argparse


def _number(kind, test, requirement: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or not test(value):  # NaN fails every range
            raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
        return value

    parse.__name__ = f"{kind.__name__} ({requirement})"  # what argparse names in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
nonnegative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def block_size(text: str):
    """A C³A block size: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'") from None


block_size.__name__ = "block size"
