"""Hyperparameter selection on validation only.

A suite row with a grid (``lora:lr=2e-4,5e-4,1e-3``) trains every grid point with every seed; per task the point
with the best mean **validation** score over seeds is chosen, and test is read at that point alone. Selection
sees validation scores only — it is given nothing else — so the test split cannot influence a choice.
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
