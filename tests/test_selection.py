"""Grid selection: validation only, ties, incomplete grids; the suite's grid rows end to end on a tiny model."""

import json
import math

import pytest

from c3a.experiments import glue
from c3a.experiments.selection import GridPoint, grid_points, select

LRS = grid_points([("lr", ("1e-3", "1e-2", "1e-1"))])


def test_grid_points_order_labels_and_flags():
    points = grid_points([("lr", ("1", "2")), ("head-lr", ("3", "4"))])
    assert [p.label for p in points] == ["lr=1, head-lr=3", "lr=1, head-lr=4", "lr=2, head-lr=3", "lr=2, head-lr=4"]
    assert points[1].argv == ("--lr", "1", "--head-lr", "4") and points[1].folder == "lr=1_head-lr=4"
    assert grid_points([]) == [GridPoint(())]  # no grid: one point, no flags


def test_best_mean_wins_ties_go_to_the_first_listed_and_nan_loses():
    choice = select({LRS[0]: [0.8, 0.6], LRS[1]: [0.7, 0.75], LRS[2]: [0.9, math.nan]}, LRS, runs=2)
    assert choice.point == LRS[1] and choice.means[LRS[0]] == pytest.approx(0.7)
    tie = select({LRS[0]: [0.5], LRS[1]: [0.7], LRS[2]: [0.7]}, LRS, runs=1)
    assert tie.point == LRS[1]
    assert select({LRS[0]: [0.5], LRS[1]: [0.7], LRS[2]: [0.7]}, list(reversed(LRS)), runs=1).point == LRS[2]


def test_incomplete_points_are_not_chosen():
    choice = select({LRS[0]: [0.5, 0.5], LRS[1]: [0.9]}, LRS, runs=2)
    assert choice.point == LRS[0] and set(choice.incomplete) == {LRS[1], LRS[2]}
    assert select({LRS[1]: [0.9]}, LRS, runs=2) is None


def test_rows_with_grids_and_registry_defaults():
    row = glue.parse_row("lora:rank=4:lr=1e-3,1e-2")
    assert row.argv == ("--rank", "4") and row.grid == (("lr", ("1e-3", "1e-2")),)
    assert [p.argv for p in row.points()] == [("--lr", "1e-3"), ("--lr", "1e-2")]
    assert glue._row_specs(["lora:lr=1e-3,1e-2,c3a:block-size=8", "head"]) == [
        "lora:lr=1e-3,1e-2", "c3a:block-size=8", "head",
    ]
    default = glue.parse_row("lora", default_grid=True)
    assert default.grid == glue.METHODS["lora"].grid
    assert glue.parse_row("lora:lr=5e-4", default_grid=True).grid == ()  # an explicit lr wins
    with pytest.raises(ValueError, match="NAME=VALUE"):
        glue.parse_row("lora:lr=")


def _fake_cell(tmp_path, point, seed, validation, test):
    row = glue.parse_row("lora:lr=1e-3,1e-2,1e-1")
    folder = tmp_path / point.folder / f"seed{seed}"
    folder.mkdir(parents=True)
    results = {"main_metric": "accuracy", "validation": {"accuracy": validation}, "test": {"accuracy": test}}
    (folder / "results.json").write_text(json.dumps(results))
    return glue.SuiteCell("sst2", row, point, seed, str(folder), ())


def test_suite_selection_reads_validation_only(tmp_path):
    # validation favours lr=1e-2, test favours lr=1e-1 by far: the choice follows validation
    scores = {LRS[0]: (0.60, 0.99), LRS[1]: (0.80, 0.50), LRS[2]: (0.70, 1.00)}
    cells = [_fake_cell(tmp_path, p, seed, v + seed / 100, t) for p, (v, t) in scores.items() for seed in (0, 1)]
    choice = glue._choices(cells, [0, 1])[("sst2", "lora:lr=1e-3,1e-2,1e-1")]
    assert choice.point == LRS[1] and choice.means[LRS[1]] == pytest.approx(80.5)
    assert glue._choices(cells, [0])[("sst2", "lora:lr=1e-3,1e-2,1e-1")].point == LRS[1]
    assert glue._choices(cells[:-1], [0, 1]) == {}  # lr=1e-1 misses seed 1: no choice until the grid is complete
