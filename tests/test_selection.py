"""Grid selection: validation only, ties, incomplete grids; the suite's grid rows end to end on a tiny model."""

import argparse
import json
import math
import os
import shutil
import subprocess

import pytest

from c3a import hub
from c3a.cli import main
from c3a.experiments import glue, suite
from c3a.experiments.selection import GridPoint, grid_points, select, step_beyond

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
    row = suite.parse_row("lora:rank=4:lr=1e-3,1e-2")
    assert row.argv == ("--rank", "4") and row.grid == (("lr", ("1e-3", "1e-2")),)
    assert [p.argv for p in row.points()] == [("--lr", "1e-3"), ("--lr", "1e-2")]
    assert suite._row_specs(["lora:lr=1e-3,1e-2,c3a:block-size=8", "head"]) == [
        "lora:lr=1e-3,1e-2", "c3a:block-size=8", "head",
    ]
    default = suite.parse_row("lora", default_grid=True)
    assert default.grid == glue.METHODS["lora"].grid
    assert suite.parse_row("lora:lr=5e-4", default_grid=True).grid == ()  # an explicit lr wins
    with pytest.raises(ValueError, match="NAME=VALUE"):
        suite.parse_row("lora:lr=")


def _fake_cell(tmp_path, point, seed, validation, test):
    row = suite.parse_row("lora:lr=1e-3,1e-2,1e-1")
    folder = tmp_path / point.folder / f"seed{seed}"
    folder.mkdir(parents=True)
    results = {"main_metric": "accuracy", "validation": {"accuracy": validation}, "test": {"accuracy": test}}
    (folder / "results.json").write_text(json.dumps(results))
    return suite.SuiteCell("sst2", row, point, seed, str(folder), ())


def test_suite_selection_reads_validation_only(tmp_path):
    # validation favours lr=1e-2, test favours lr=1e-1 by far: the choice follows validation
    scores = {LRS[0]: (0.60, 0.99), LRS[1]: (0.80, 0.50), LRS[2]: (0.70, 1.00)}
    cells = [_fake_cell(tmp_path, p, seed, v + seed / 100, t) for p, (v, t) in scores.items() for seed in (0, 1)]
    choice = suite._choices(cells, [0, 1])[("sst2", "lora:lr=1e-3,1e-2,1e-1")]
    assert choice.point == LRS[1] and choice.means[LRS[1]] == pytest.approx(80.5)
    assert suite._choices(cells, [0])[("sst2", "lora:lr=1e-3,1e-2,1e-1")].point == LRS[1]
    assert suite._choices(cells[:-1], [0, 1]) == {}  # lr=1e-1 misses seed 1: no choice until the grid is complete


@pytest.mark.parametrize(
    "values, upward, expected",
    [
        (("0.1", "0.3", "1"), True, "3"), (("0.1", "0.3", "1"), False, "0.03"),  # the half-decade ladder, as written
        (("3e-4", "1e-3", "3e-3"), True, "1e-2"), (("3e-4", "1e-3", "3e-3"), False, "1e-4"),
        (("1e-5", "3e-5", "1e-4"), True, "3e-4"), (("1e-3", "1e-2"), True, "1e-1"),  # a decade apart: the grid's ratio
        (("2e-4", "5e-4", "1e-3"), True, "2e-3"), (("1e-3", "3e-3", "1e-2"), False, "3e-4"),
        (("a", "b"), True, None), (("1",), True, None), (("0", "1"), False, None),
    ],
)  # fmt: skip
def test_step_beyond_follows_the_grids_own_ladder(values, upward, expected):
    assert step_beyond(values, upward) == expected


def _fake_suite(tmp_path, monkeypatch, best_lr: float, *extra: str, row: str = "c3a:lr=0.1,0.3,1",
                failing_lr: float = math.nan, status: int = 0) -> tuple[list[str], list[str]]:
    """glue-suite over ``row`` with a fake `c3a glue` whose validation score peaks at ``best_lr`` (log scale) and
    whose test score is highest far from it (a run at ``failing_lr`` fails): returns the suite's argv and the
    folders trained."""
    from c3a.experiments.train import train_config

    trained, parser, real = [], argparse.ArgumentParser(), subprocess.run
    glue.add_glue_arguments(parser)

    def fake(command, *args, **kwargs):
        if list(command[1:3]) != ["-m", "c3a.cli"]:  # e.g. matplotlib's first font scan
            return real(command, *args, **kwargs)
        cell = parser.parse_args(command[4:])
        lr = train_config(cell, cell.out).lr
        trained.append(os.path.relpath(cell.out, tmp_path))
        if lr == failing_lr:
            return subprocess.CompletedProcess(command, 1)
        distance = abs(math.log10(lr) - math.log10(best_lr)) + cell.seed / 1000
        config = {**vars(cell), "lr": lr, "head_lr": train_config(cell, cell.out).head_lr,
                  "weight_decay": train_config(cell, cell.out).weight_decay}  # fmt: skip
        results = {"main_metric": "accuracy", "validation": {"accuracy": 1 - distance / 10, "epoch": 1},
                   "test": {"accuracy": distance / 10}, "trainable_params": 10, "peak_memory_bytes": 2**20,
                   "memory_kind": "cpu_peak_rss", "train_seconds": 1.0, "config": config}  # fmt: skip
        os.makedirs(cell.out, exist_ok=True)
        with open(os.path.join(cell.out, "results.json"), "w") as f:
            json.dump(results, f, default=str)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(suite.subprocess, "run", fake)
    monkeypatch.setattr(hub, "check_model_source", lambda name: None)  # fake cells load no model: "m" is fine
    argv = ["glue-suite", "--model", "m", "--tasks", "sst2", "--seeds", "0", "1", "--select-seeds", "0",
            "--methods", row, "--out", str(tmp_path), *extra]  # fmt: skip
    assert main(argv) == status
    return argv, trained


@pytest.mark.parametrize(
    "best_lr, extra, tried, chosen",
    [
        (3.0, [], ["0.1", "0.3", "1", "3", "10"], "3"),  # past the top: 3 wins, 10 does not: stop there
        (50.0, [], ["0.1", "0.3", "1", "3", "10"], "10"),  # still rising: at most 2 beyond (the default)
        (0.03, ["--extend-edges", "1"], ["0.1", "0.3", "1", "0.03"], "0.03"),  # downwards, one step allowed
        (0.3, [], ["0.1", "0.3", "1"], "0.3"),  # inside the grid: nothing more
        (50.0, ["--extend-edges", "0"], ["0.1", "0.3", "1"], "1"),  # the grid as given
    ],
)  # fmt: skip
def test_suite_tries_past_a_grid_edge_on_validation_only(tmp_path, monkeypatch, capsys, best_lr, extra, tried, chosen):
    argv, trained = _fake_suite(tmp_path, monkeypatch, best_lr, *extra)
    row = os.path.join("sst2", "c3a_lr_0.1_0.3_1")
    assert trained == [os.path.join(row, f"lr={lr}", "seed0") for lr in tried] + [os.path.join(row, f"lr={chosen}", "seed1")]
    selection = json.loads((tmp_path / "selection.json").read_text())["sst2/c3a:lr=0.1,0.3,1"]
    assert selection["chosen"] == f"lr={chosen}" and list(selection["validation_means"]) == [f"lr={lr}" for lr in tried]
    table = (tmp_path / "table.md").read_text()
    beyond = [lr for lr in tried if lr not in ("0.1", "0.3", "1")]
    assert ("; beyond: " in table) == bool(beyond) and all(f"lr={lr} " in table for lr in beyond)
    capsys.readouterr()
    assert main(argv) == 0  # resumed: the same cells, nothing trained again
    assert len(trained) == len(tried) + 1 and capsys.readouterr().out.count("done before, skipped") == len(tried) + 1


def test_report_only_trains_nothing_and_reports_what_is_finished(tmp_path, monkeypatch, capsys):
    """--report-only: the finished cells make the tables, nothing is trained, the missing ones are counted; the
    grid of a task whose selection cells are not all finished contributes no row yet."""
    argv, trained = _fake_suite(tmp_path, monkeypatch, 0.3)
    (tmp_path / "table.md").unlink()
    shutil.rmtree(tmp_path / "sst2" / "c3a_lr_0.1_0.3_1" / "lr=0.3" / "seed1")  # the chosen point's second seed
    capsys.readouterr()
    assert main([*argv, "--report-only"]) == 0
    assert len(trained) == 4  # the first run's 3 + 1 cells, nothing since
    assert "report only: 1 planned cell(s) not finished yet" in capsys.readouterr().out
    assert "lr=0.3 (" in (tmp_path / "table.md").read_text()
    shutil.rmtree(tmp_path / "sst2" / "c3a_lr_0.1_0.3_1" / "lr=1" / "seed0")  # now the grid itself is incomplete
    assert main([*argv, "--report-only"]) == 0 and len(trained) == 4
    assert "report only: 1 planned cell(s) not finished yet" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--report-only trains nothing"):
        main([*argv, "--report-only", "--overwrite"])


def test_a_failed_point_past_the_edge_ends_the_search_there(tmp_path, monkeypatch, capsys):
    _, trained = _fake_suite(tmp_path, monkeypatch, 50.0, failing_lr=3.0, status=1)
    row = os.path.join("sst2", "c3a_lr_0.1_0.3_1")
    assert trained == [os.path.join(row, f"lr={lr}", "seed0") for lr in ("0.1", "0.3", "1", "3")] + [
        os.path.join(row, "lr=1", "seed1")
    ]  # the grid's best stands, and seed 1 runs there
    assert "1 cell(s) failed" in capsys.readouterr().err


def test_only_learning_rate_grids_go_past_their_edges(tmp_path, monkeypatch):
    _, trained = _fake_suite(tmp_path, monkeypatch, 1.0, row="lora:lr=1:rank=2,4")
    assert [path.split(os.sep)[2] for path in trained] == ["rank=2", "rank=4", "rank=2"]  # no rank=8


def test_readme_defaults_table_matches_the_registry():
    """The GLUE defaults table (docs/experiments.md) of per-method defaults is the registry's, value for value (docs that match behaviour)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "experiments.md").read_text()
    table = text[text.index("| method | `--lr` | suite grid |"):].split("\n\n")[0].splitlines()[2:]
    seen = set()
    for line in table:
        names, lr, grid, head_lr, weight_decay = [c.strip() for c in line.strip().strip("|").split("|")]
        lr = lr.split()[0]
        for name in re.findall(r"`([^`]+)`", names):
            method = glue.METHODS[name]
            seen.add(name)
            if lr != "–":
                assert float(lr) == method.lr, name
            assert float(head_lr) == (method.head_lr or method.lr), name
            assert float(weight_decay) == method.weight_decay, name
            if grid == "–":
                assert method.grid == (), name
            else:
                option = grid.split()[0] if grid.startswith("head-lr") else "lr"
                values = tuple(v.strip() for v in grid.removeprefix("head-lr").split(","))
                assert method.grid == ((option, values),), name
    assert seen == set(glue.METHODS)


def test_a_two_option_grid_goes_past_its_learning_rate_edge_at_the_chosen_other_values(tmp_path, monkeypatch):
    """LoRA's alpha × lr grid (Table 3): when the choice sits on the lr edge, the next lr is tried with the chosen
    alpha only; the search stops once a point past the edge loses."""
    _, trained = _fake_suite(tmp_path, monkeypatch, 3.0, row="lora:alpha=32,64:lr=0.1,0.3,1")
    row = os.path.join("sst2", "lora_alpha_32_64_lr_0.1_0.3_1")
    grid = [f"alpha={a}_lr={lr}" for a in ("32", "64") for lr in ("0.1", "0.3", "1")]
    # the fake's score depends on lr alone: alpha=32 wins the tie (listed first), so its line is extended
    assert trained == [os.path.join(row, p, "seed0") for p in [*grid, "alpha=32_lr=3", "alpha=32_lr=10"]] + [
        os.path.join(row, "alpha=32_lr=3", "seed1")]
