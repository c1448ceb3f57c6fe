"""Hyperparameter selection on validation only.

A suite row with a grid (``lora:lr=2e-4,5e-4,1e-3``) trains every grid point with every seed; per task the point
with the best mean **validation** score over seeds is chosen, and test is read at that point alone. Selection
sees validation scores only — it is given nothing else — so the test split cannot influence a choice.

A grid whose best value lies on its edge says little about the values beyond it; :func:`step_beyond` gives the
next value on the grid's own ladder so that the suite can try it (the choice is then made again, on validation).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class GridPoint:
    """One combination of grid values: ``(("lr", "5e-4"), ("head-lr", "4e-3"))``."""

    values: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.values)

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(arg for name, value in self.values for arg in (f"--{name}", value))

    @property
    def folder(self) -> str:
        return "_".join(f"{name}={value}" for name, value in self.values)


def grid_points(grid: Sequence[tuple[str, Sequence[str]]]) -> list[GridPoint]:
    """Every combination of the grid's values, in the order given (the first option varies slowest)."""
    names = [name for name, _ in grid]
    return [GridPoint(tuple(zip(names, combo))) for combo in itertools.product(*(values for _, values in grid))]


@dataclass(frozen=True)
class Choice:
    point: GridPoint
    means: dict[GridPoint, float]  # mean validation score of every point that has all its runs
    incomplete: tuple[GridPoint, ...]  # points still missing runs (not considered)


def select(validation: Mapping[GridPoint, Sequence[float]], points: Sequence[GridPoint], runs: int) -> Optional[Choice]:
    """The point with the highest mean validation score among those with all ``runs`` scores (one per seed).

    Ties go to the point listed first in ``points`` (write grids in the order you would prefer on a tie). A NaN
    score counts as the worst possible. ``None`` when no point is complete yet.
    """
    means, incomplete = {}, []
    for point in points:
        scores = list(validation.get(point, ()))
        if len(scores) < runs:
            incomplete.append(point)
            continue
        means[point] = -math.inf if any(math.isnan(s) for s in scores) else sum(scores) / len(scores)
    if not means:
        return None
    best = max(means.values())
    chosen = next(point for point in points if means.get(point) == best)
    return Choice(chosen, means, tuple(incomplete))


def _ladder_position(value: float) -> Optional[int]:
    """Position on the half-decade ladder ``…, 0.1, 0.3, 1, 3, 10, …`` (``2k`` for ``10^k``, ``2k + 1`` for
    ``3·10^k``), or ``None`` off it."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    for offset, m in enumerate((1.0, 3.0)):
        if math.isclose(mantissa, m, rel_tol=1e-6):
            return 2 * exponent + offset
    return None


def _format(value: float, scientific: bool) -> str:
    if not scientific:
        return format(value, ".3g")
    mantissa, exponent = format(value, ".2e").split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def step_beyond(values: Sequence[str], upward: bool) -> Optional[str]:
    """The next value past the largest (``upward``) or smallest of a numeric grid, on the grid's ladder: the
    half-decade ladder when the values are consecutive on it (``0.1, 0.3, 1`` → ``3`` / ``0.03``; ``3e-4, 1e-3,
    3e-3`` → ``1e-2`` / ``1e-4``), else the ratio of the two outermost values (``2e-4, 5e-4, 1e-3`` → ``2e-3``).
    Written as the edge value is (``1e-2`` style or decimal). ``None`` unless there are two or more distinct
    positive numbers."""
    try:
        numbers = sorted({float(v): v for v in values}.items())
    except ValueError:
        return None
    if len(numbers) < 2 or numbers[0][0] <= 0 or not all(math.isfinite(x) for x, _ in numbers):
        return None
    edge, text = numbers[-1] if upward else numbers[0]
    positions = [_ladder_position(x) for x, _ in numbers]
    if None not in positions and all(b - a == 1 for a, b in zip(positions, positions[1:])):
        position = positions[-1] + 1 if upward else positions[0] - 1
        value = 10 ** (position // 2) * (3 if position % 2 else 1)
    else:
        inner = numbers[-2][0] if upward else numbers[1][0]
        value = edge * edge / inner
    return _format(value, scientific="e" in text.lower())
