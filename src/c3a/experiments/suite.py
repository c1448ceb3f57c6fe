"""One suite runner for every experiment: a grid of methods × tasks × seeds, each cell one run of the
experiment's own command (`c3a glue`, `c3a sft`) in its own process, then tables and a chart.

A row is a method with options (``lora:rank=32:alpha=32,64,128``); options with several values form a grid whose
point is chosen per task on validation (:mod:`c3a.experiments.selection`), on the ``--select-seeds``, with the
edges of a one-option learning-rate grid extended while the choice sits on them; the other seeds then run at the
chosen point only. Finished cells are reused (their recorded settings checked against the requested ones), so a
suite stopped at any point resumes where it was; ``--report-only`` writes the tables from what has finished.

An experiment plugs in with an :class:`Experiment`: its command, tasks, the options its cells share, and the
registry setting its defaults come from. Nothing here knows about GLUE or instruction tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from c3a.argtypes import nonnegative_int
from c3a.io import check_outputs_apart, check_writable
from c3a.experiments.methods import METHODS
from c3a.experiments.selection import Choice, GridPoint, grid_points, select, step_beyond


@dataclass(frozen=True)
class Experiment:
    command: str  # each cell runs `c3a <command>`
    title: str  # of the tables, e.g. "GLUE"
    tasks: dict[str, str]  # task → its column title
    task_flag: str  # how `c3a <command>` is told the task: --task, --format
    add_run_arguments: Callable[[argparse.ArgumentParser], None]  # `c3a <command>`'s arguments
    add_shared_arguments: Callable[[argparse.ArgumentParser], None]  # the part a suite passes to every cell
    default_methods: tuple[str, ...]
    setting: str = "classification"  # whose registry defaults (:meth:`c3a.experiments.methods.Method.defaults`)
    selects_by_loss: bool = False  # the cells record their validation loss as what chooses (lower is better)
    # extra table columns: title → (task, test metric), e.g. ViGGO's slot F1 beside its exact match
    extra_columns: dict[str, tuple[str, str]] = field(default_factory=dict)


def _list(values: list[str]) -> list[str]:
    """Accept both ``a b c`` and ``a,b,c``."""
    return [v for value in values for v in value.split(",") if v]


def add_suite_arguments(parser: argparse.ArgumentParser, experiment: Experiment) -> None:
    parser.add_argument("--tasks", nargs="+", default=list(experiment.tasks),
                        help=f"default: all of {', '.join(experiment.tasks)}")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(experiment.default_methods),
        help=f"table rows: a method name, optionally with `c3a {experiment.command}` options after colons, e.g. "
        "c3a:block-size=64 or lora:rank=16 (row label `c3a (block-size=64)`); several values separated by commas "
        "form a grid chosen on validation, e.g. lora:lr=2e-4,5e-4,1e-3. A row without lr (and no suite --lr) "
        f"gets its method's default grid from the registry (default: {' '.join(experiment.default_methods)})",
    )
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="seeds every chosen grid point runs with")
    parser.add_argument(
        "--select-seeds", nargs="+",
        help="seeds whose validation scores choose the grid point (default: all --seeds); the other seeds run at "
        "the chosen point only, once it is known",
    )
    parser.add_argument(
        "--task-options", nargs="+", default=[], metavar="TASK:OPTION=VALUE",
        help="settings for one task's cells, e.g. mrpc:epochs=10 or viggo:data=train.jsonl (a row's own options win)",
    )
    parser.add_argument(
        "--extend-edges", type=nonnegative_int, default=2, metavar="N",
        help="when a learning-rate grid's best point is its largest or smallest value, try the next value on "
        "the grid's ladder (0.1, 0.3, 1 → 3), one at a time, up to N beyond each end (default 2; 0: the grid as given)",
    )
    parser.add_argument("--out", required=True, help="grid folder: <task>/<row>/[<grid point>/]seed<k>/results.json, table.md, summary.png")
    parser.add_argument("--overwrite", action="store_true", help="rerun cells whose recorded settings differ from the requested ones (default: stop and name them)")
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: write table.md, summary.png and selection.json from the cells already finished (e.g. "
        "over all tasks while other suite processes train one task each) and count those still missing",
    )
    experiment.add_shared_arguments(parser)


@dataclass(frozen=True)
class Row:
    spec: str  # as given: NAME[:option=value[,value...]...]
    method: str
    argv: tuple[str, ...]  # the single-valued options as command-line flags of the cells
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # options with several values, or the method's default grid

    @property
    def label(self) -> str:
        options = self.spec.partition(":")[2]
        return f"{self.method} ({options.replace(':', ', ')})" if options else self.method

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.spec)

    def points(self) -> list[GridPoint]:
        return grid_points(self.grid)


def _options(options: list[str], spec: str) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """``NAME=VALUE`` pieces of ``spec`` → (command-line flags of the single values, grid of the multi-valued)."""
    argv, grid = [], []
    for option in options:
        name, equals, value = option.partition("=")
        values = tuple(v for v in value.split(",") if v)
        if not equals or not name or name.startswith("-") or not values:
            raise ValueError(f"option {option!r} in {spec!r} must be NAME=VALUE[,VALUE...] (a command-line option without dashes)")
        if len(values) > 1:
            grid.append((name, values))
        else:
            argv += [f"--{name}", values[0]]
    return argv, grid


def parse_task_options(specs: list[str], tasks) -> dict[str, tuple[str, ...]]:
    """``TASK:option=value[:...]`` → ``{task: flags}``: per-task settings such as epochs (a row's own options
    still win). A task not in this suite's ``--tasks`` is allowed (one command split over processes by task keeps
    its options), one not in ``tasks`` is not."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        task, *options = spec.split(":")
        if task not in tasks:
            raise ValueError(f"--task-options {spec!r}: unknown task {task!r}; choose from {', '.join(tasks)}")
        argv, grid = _options(options, spec)
        if grid or not argv:
            raise ValueError(f"--task-options {spec!r}: give TASK:option=value, one value per option")
        out[task] = out.get(task, ()) + tuple(argv)
    return out


def parse_row(spec: str, default_grid: bool = False, setting: str = "classification") -> Row:
    """``NAME[:option=value...]``; ``value1,value2,...`` makes a grid. ``default_grid``: without an ``lr`` option the
    row takes its method's default grid in ``setting`` (:meth:`Method.defaults`)."""
    method, *options = spec.split(":")
    if method not in METHODS:
        raise ValueError(f"method {method!r} in {spec!r} is unknown; choose from {', '.join(METHODS)}")
    argv, grid = _options(options, spec)
    named = {name for name, _ in grid} | {a[2:] for a in argv[::2]}
    if default_grid and "lr" not in named:
        grid += [(name, values) for name, values in METHODS[method].defaults(setting).grid if name not in named]
    return Row(spec, method, tuple(argv), tuple(grid))


def _row_specs(values: list[str]) -> list[str]:
    """Row specs from ``--methods``: separated by spaces or commas; a comma followed by a value (no method name)
    continues the previous row's grid, also when more options follow (``lora:alpha=32,64:lr=1e-4,3e-4,c3a`` is two
    rows)."""
    specs: list[str] = []
    for value in values:
        for piece in value.split(","):
            if not piece:
                continue
            if specs and piece.split(":")[0] not in METHODS:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def shared_argv(args: argparse.Namespace, experiment: Experiment) -> list[str]:
    """The shared options of ``args`` as command-line flags again, for the cells."""
    parser = argparse.ArgumentParser()
    experiment.add_shared_arguments(parser)
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest == "help" or value is None or value is False:
            continue
        flag = action.option_strings[-1]
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@dataclass(frozen=True)
class SuiteCell:
    task: str
    row: Row
    point: GridPoint
    seed: int
    folder: str
    argv: tuple[str, ...]

    @property
    def results_path(self) -> str:
        return os.path.join(self.folder, "results.json")


def _recorded_differences(cell: SuiteCell, requested: argparse.Namespace, setting: str) -> list[str]:
    """Settings a finished cell was run with that differ from the requested ones (``out`` aside)."""
    from c3a.experiments.train import train_config

    recorded = (_load(cell) or {}).get("config", {})
    resolved = train_config(requested, cell.folder, setting)  # defaults resolved as the run resolves them
    wanted = {**vars(requested), "lr": resolved.lr, "weight_decay": resolved.weight_decay}
    if hasattr(requested, "head_lr"):  # experiments with a task head
        wanted["head_lr"] = resolved.head_lr
    differences = []
    for key, value in wanted.items():
        if key in ("out", "command"):
            continue
        value = json.loads(json.dumps(value, default=str))
        if key not in recorded and (value is None or value is False):
            continue  # an option newer than the cell, left off: options are added off, so the cell ran that way
        if recorded.get(key) != value:
            differences.append(f"{key}: {recorded.get(key)!r} → {value!r}")
    return differences


def _load(cell: SuiteCell) -> Optional[dict]:
    """A finished cell's results; ``None`` while it has none. A results file that does not hold a finished run's
    record (cut, empty, another schema) is an error naming it: counting it as done would skew the tables."""
    if not os.path.isfile(cell.results_path):
        return None
    try:
        with open(cell.results_path) as f:
            results = json.load(f)
        if not isinstance(results, dict) or not all(k in results for k in ("main_metric", "validation", "test")):
            raise ValueError("not a run's record")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cell.results_path} is not a finished run's results ({e}): remove it to rerun the cell") from None
    return results


def _choices(cells: list[SuiteCell], select_seeds: list[int]) -> dict[tuple[str, str], Choice]:
    """Per (task, row) with a grid: the point chosen on the selection seeds' validation scores, among the points
    planned for that task (the row's grid, then any tried beyond its edge, in that order: ties go to the first)."""
    from c3a.experiments.report import validation_score

    groups: dict[tuple[str, str], list[SuiteCell]] = {}
    for cell in cells:
        if cell.row.grid and cell.seed in select_seeds:
            groups.setdefault((cell.task, cell.row.spec), []).append(cell)
    choices = {}
    for key, group in groups.items():
        validation: dict[GridPoint, list[float]] = {}
        for cell in group:
            results = _load(cell)
            if results is not None:
                validation.setdefault(cell.point, []).append(validation_score(results))
        choice = select(validation, list(dict.fromkeys(cell.point for cell in group)), len(select_seeds))
        if choice is not None and not choice.incomplete:
            choices[key] = choice
    return choices


def _beyond_edge(row: Row, choice: Choice, limit: int) -> Optional[GridPoint]:
    """The next point to try when ``choice`` lies on the edge of the row's learning-rate values (among the points
    that share the chosen point's other values, e.g. LoRA's alpha), at most ``limit`` points past the row's own
    values on that side; else ``None``."""
    grid = dict(row.grid)
    name = next((n for n in ("lr", "head-lr") if n in grid), None)
    if name is None:
        return None

    def rest(point: GridPoint) -> tuple:
        return tuple(pair for pair in point.values if pair[0] != name)

    line = [dict(p.values)[name] for p in choice.means if rest(p) == rest(choice.point)]
    try:
        tried = [float(v) for v in line]
        chosen, lowest, highest = float(dict(choice.point.values)[name]), min(map(float, grid[name])), max(map(float, grid[name]))
    except ValueError:
        return None
    for upward, edge, past in ((True, max(tried), sum(x > highest for x in tried)),
                               (False, min(tried), sum(x < lowest for x in tried))):  # fmt: skip
        if chosen == edge and past < limit:
            value = step_beyond(line, upward)
            if value is None:
                return None
            return GridPoint(tuple((n, value if n == name else v) for n, v in choice.point.values))
    return None


def run_suite(args: argparse.Namespace, experiment: Experiment) -> int:
    tasks, seeds = _list(args.tasks), [int(s) for s in _list(args.seeds)]
    select_seeds = [int(s) for s in _list(args.select_seeds)] if args.select_seeds else seeds
    unknown = [t for t in tasks if t not in experiment.tasks]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(experiment.tasks)}")
    if not set(select_seeds) <= set(seeds):
        raise ValueError(f"--select-seeds {select_seeds} must be among --seeds {seeds}")
    if args.report_only and args.overwrite:
        raise ValueError("--report-only trains nothing, so --overwrite would rerun nothing: give one of them")
    rows = [parse_row(spec, args.lr is None, experiment.setting) for spec in _row_specs(args.methods)]
    per_task = parse_task_options(args.task_options, experiment.tasks)
    inputs = {"--model": args.model, "--data-dir": getattr(args, "data_dir", None)}
    inputs.update({f"{task}:{flag[2:]}": value for task, argv in per_task.items()
                   for flag, value in zip(argv[::2], argv[1::2]) if flag in ("--data", "--eval-data")})  # fmt: skip
    check_outputs_apart({"--out": args.out}, inputs)
    check_writable("--out", args.out)
    if not args.report_only:  # once here, not once per cell, each after the seconds a cell takes to start
        from c3a.hub import check_model_source
        from c3a.paper_models import resolve_model

        check_model_source(resolve_model(args.model))
    shared = shared_argv(args, experiment)
    cell_parser = argparse.ArgumentParser(prog=f"c3a {experiment.command}")
    experiment.add_run_arguments(cell_parser)
    stale: set[SuiteCell] = set()

    def plan(task: str, row: Row, point: GridPoint, seed: int) -> SuiteCell:
        folder = os.path.join(args.out, task, row.folder, point.folder, f"seed{seed}")
        argv = (experiment.task_flag, task, "--method", row.method, "--seed", str(seed), "--out", folder,
                *shared, *per_task.get(task, ()), *row.argv, *point.argv)  # fmt: skip
        return SuiteCell(task, row, point, seed, folder, argv)

    def check(batch: list[SuiteCell]) -> list[SuiteCell]:
        """Every cell's options parse, and a finished cell's recorded settings are the requested ones (else stop,
        naming one, unless --overwrite)."""
        requested = {cell: _parse(cell_parser, cell.argv) for cell in batch}  # a bad option fails now
        differing = {cell: diff for cell in batch if os.path.isfile(cell.results_path)
                     and (diff := _recorded_differences(cell, requested[cell], experiment.setting))}  # fmt: skip
        if differing and not args.overwrite:
            cell, diff = next(iter(differing.items()))
            raise ValueError(
                f"{len(differing)} finished cell(s) in {args.out} were run with other settings, e.g. {cell.folder}: "
                f"{'; '.join(diff)}. Use another --out, or --overwrite to rerun them."
            )
        stale.update(differing)
        return batch

    # The selection seeds' cells first (seeds outermost: a partial grid already covers every row and task), then
    # points beyond a grid's edge where the choice landed on it, then the other seeds at the chosen points.
    order = sorted(seeds, key=lambda s: s not in select_seeds)
    later_seeds = [seed for seed in order if seed not in select_seeds]
    cells = [plan(task, row, point, seed) for seed in order if seed in select_seeds for task in tasks for row in rows
             for point in row.points()]  # fmt: skip
    # Before anything runs: every option, and the settings of whatever the other seeds may reuse at any grid point.
    check(cells + [plan(task, row, point, seed) for seed in later_seeds for task in tasks for row in rows
                   for point in row.points()])  # fmt: skip
    failed, unfinished = [], []

    def run(batch: list[SuiteCell]) -> None:
        for cell in batch:
            if os.path.isfile(cell.results_path) and cell not in stale:
                print(f"[{cells.index(cell) + 1}/{len(cells)}] {cell.folder}: done before, skipped", flush=True)
                continue
            if args.report_only:
                unfinished.append(cell.folder)
                continue
            print(f"[{cells.index(cell) + 1}/{len(cells)}] c3a {experiment.command} {' '.join(cell.argv)}", flush=True)
            # one process per cell: peak RSS is a per-process high-water mark
            if subprocess.run([sys.executable, "-m", "c3a.cli", experiment.command, *cell.argv]).returncode != 0:
                failed.append(cell.folder)
            else:  # the tables follow every finished cell: a long suite stopped midway still leaves them current
                write_suite_report(args, experiment, rows, tasks, cells, select_seeds)

    run(list(cells))
    settled: set[tuple[str, str]] = set()  # a point past the edge failed to train: the choice stays inside
    while True:  # one more point per (task, row) at a time, as long as the choice sits on an edge
        extra = []
        for (task, spec), choice in _choices(cells, select_seeds).items():
            row = next(r for r in rows if r.spec == spec)
            point = None if (task, spec) in settled else _beyond_edge(row, choice, args.extend_edges)
            if point is not None:
                extra += [plan(task, row, point, seed) for seed in order if seed in select_seeds]
        if not extra:
            break
        cells += check(extra)
        run(extra)
        for cell in extra:
            if cell.folder in failed:
                cells.remove(cell)
                settled.add((cell.task, cell.row.spec))
    choices = _choices(cells, select_seeds)
    rest = [plan(task, row, choices[(task, row.spec)].point if row.grid else GridPoint(()), seed)
            for seed in later_seeds for task in tasks for row in rows
            if not row.grid or (task, row.spec) in choices]  # fmt: skip
    cells += check(rest)
    run(rest)

    if write_suite_report(args, experiment, rows, tasks, cells, select_seeds):
        print(f"table: {os.path.join(args.out, 'table.md')}, chart: {os.path.join(args.out, 'summary.png')}")
    if args.report_only:  # cells not planned yet (other seeds of an unfinished grid) are not counted
        print(f"report only: {len(unfinished)} planned cell(s) not finished yet", flush=True)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``argv`` parsed, or a ValueError naming the bad option (argparse would exit the suite)."""
    errors: list[str] = []
    parser.error = errors.append  # type: ignore[method-assign]  # argparse calls it, then would exit
    try:
        args = parser.parse_args(list(argv))
    except SystemExit:
        args = None
    if errors or args is None:
        raise ValueError(f"a cell's options do not parse ({'; '.join(errors) or 'bad options'}): {' '.join(argv)}")
    return args


def write_suite_report(args, experiment: Experiment, rows: list[Row], tasks: list[str], cells: list[SuiteCell],
                       select_seeds: list[int]) -> bool:
    """table.md, summary.png and selection.json from the cells finished so far (test at chosen points only; a grid
    still incomplete on the selection seeds contributes no row yet). False when nothing has finished."""
    from c3a.experiments.report import Cell, write_report
    from c3a.experiments.train import write_results

    choices = _choices(cells, select_seeds)
    finished = []
    for cell in cells:
        chosen = choices.get((cell.task, cell.row.spec))
        if cell.row.grid and (chosen is None or chosen.point != cell.point):
            continue  # test is read at the chosen point only
        results = _load(cell)
        if results is not None:
            finished.append(Cell(cell.row.label, experiment.tasks[cell.task], results))
            finished += [Cell(cell.row.label, column, {**results, "main_metric": metric})
                         for column, (task, metric) in experiment.extra_columns.items()
                         if task == cell.task and metric in results["test"]]  # fmt: skip
    if not finished:
        return False
    columns = [experiment.tasks[t] for t in tasks]
    for column, (task, _) in experiment.extra_columns.items():
        if task in tasks:
            columns.insert(columns.index(experiment.tasks[task]) + 1, column)
    write_report(
        finished,
        args.out,
        rows=[row.label for row in rows],
        columns=columns,
        title=f"{experiment.title}, model {args.model}",
        notes=selection_notes(experiment, rows, tasks, choices, select_seeds, args.extend_edges),
        reference=next((row.label for row in rows if row.method == "lora"), None),
    )
    write_results(os.path.join(args.out, "selection.json"), {
        f"{task}/{spec}": {"chosen": c.point.label, "validation_means": {p.label: m for p, m in c.means.items()}}
        for (task, spec), c in choices.items()
    })  # fmt: skip
    return True


def selection_notes(
    experiment: Experiment, rows: list[Row], tasks: list[str], choices: dict[tuple[str, str], Choice],
    select_seeds: list[int], extend_edges: int,
) -> str:
    """Markdown: per grid row and task, the grid, each point's mean validation score and the chosen point."""
    gridded = [row for row in rows if row.grid]
    if not gridded:
        return ""
    loss = experiment.selects_by_loss
    lines = [
        "## Hyperparameter selection (validation only)",
        "",
        f"Each grid point was trained with seed(s) {', '.join(map(str, select_seeds))}; the point with the "
        + ("lowest mean validation loss (best epoch)" if loss else "best mean validation score (best epoch, ×100)")
        + " was chosen per task (ties: the first listed), and test is reported at that point only. Other seeds ran "
        "at the chosen point alone."
        + (f" Where the best point of a learning-rate grid was its largest or smallest value, the next value on the "
           f"grid's ladder was tried too, one at a time, up to {extend_edges} beyond each end (listed after the "
           "grid's own, \"beyond\")." if extend_edges else ""),
        "",
        "| Method | grid | " + " | ".join(experiment.tasks[t] for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for row in gridded:
        grid = "; ".join(f"{name} ∈ {{{', '.join(values)}}}" for name, values in row.grid)
        cells = []
        for task in tasks:
            choice = choices.get((task, row.spec))
            if choice is None:
                cells.append("pending")
                continue
            own = set(row.points())
            values = {p: f"{-m:.3f}" if loss else f"{m:.1f}" for p, m in choice.means.items()}
            shown = {p: f"**{text}**" if p == choice.point else text for p, text in values.items()}
            means = ", ".join(text for p, text in shown.items() if p in own)
            beyond = ", ".join(f"{p.label} {text}" for p, text in shown.items() if p not in own)
            cells.append(f"{choice.point.label} ({means}{'; beyond: ' + beyond if beyond else ''})")
        lines.append(f"| {row.label} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
