"""GLUE (the paper's Table 2): `c3a glue` trains one method on one task; `c3a glue-suite` runs a grid.

Protocol: a validation split is carved from train (seeded); the original validation split is the test set;
the epoch with the best validation score is the one evaluated on test. Metrics: Matthews correlation (CoLA),
Pearson (STS-B, Spearman reported too), accuracy (the others).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c3a.argtypes import nonnegative_int, positive_int
from c3a.experiments.jsonl import read_jsonl
from c3a.experiments.methods import METHODS, build_method, trainable_parameters
from c3a.experiments.selection import Choice, GridPoint, grid_points, select, step_beyond


# -- tasks and metrics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    title: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]  # the first one selects the best epoch and fills the table


TASKS = {
    "sst2": Task("SST-2", ("sentence",), 2, ("accuracy",)),
    "cola": Task("CoLA", ("sentence",), 2, ("mcc", "accuracy")),
    "mrpc": Task("MRPC", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "qnli": Task("QNLI", ("question", "sentence"), 2, ("accuracy",)),
    "rte": Task("RTE", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "stsb": Task("STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class MCC from the confusion matrix; 0 when a margin is constant (sklearn's convention)."""
    classes = np.union1d(predictions, labels)
    confusion = (labels[:, None] == classes).T.astype(np.float64) @ (predictions[:, None] == classes)
    true, predicted, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    denominator = np.sqrt((n * n - predicted @ predicted) * (n * n - true @ true))
    return float((np.trace(confusion) * n - true @ predicted) / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


METRICS = {"accuracy": accuracy, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def compute_metrics(task: Task):
    """The `Trainer`'s ``compute_metrics`` for ``task``: logits → predictions → the task's metrics."""

    def compute(prediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        labels = np.asarray(prediction.label_ids)
        predictions = logits.reshape(-1) if task.num_labels == 1 else logits.argmax(-1)
        return {name: METRICS[name](predictions, labels) for name in task.metrics}

    return compute


# -- data -----------------------------------------------------------------------------------------------
def load_task(task: str, data_dir: Optional[str] = None):
    """``DatasetDict`` with ``train`` and ``validation`` in the HF GLUE schema: from ``data_dir/<task>/*.jsonl``
    or, without ``data_dir``, from the hub. A bad local row is reported with its file and line."""
    from datasets import Dataset, DatasetDict, load_dataset

    spec = TASKS[task]
    if data_dir is None:
        raw = load_dataset("nyu-mll/glue", task)
        for split in ("train", "validation"):
            absent = [c for c in (*spec.text_columns, "label") if c not in raw[split].column_names]
            if absent:
                raise ValueError(f"{task} {split}: columns {absent} missing (has {raw[split].column_names})")
        return raw
    files = {split: os.path.join(data_dir, task, f"{split}.jsonl") for split in ("train", "validation")}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"--data-dir needs {task}/train.jsonl and {task}/validation.jsonl; missing: {missing}")

    def check(row: dict) -> Optional[str]:
        absent = [c for c in (*spec.text_columns, "label") if c not in row]
        if absent:
            return f"fields {absent} missing (GLUE {task} needs {list(spec.text_columns)} and 'label')"
        if any(not isinstance(row[c], str) for c in spec.text_columns):
            return f"{list(spec.text_columns)} must be strings"
        label = row["label"]
        if spec.num_labels == 1:
            return None if isinstance(label, (int, float)) and not isinstance(label, bool) else f"label {label!r} is not a number"
        if isinstance(label, bool) or label not in range(spec.num_labels):
            return f"label {label!r} is not an integer in 0..{spec.num_labels - 1}"
        return None

    return DatasetDict({split: Dataset.from_list(read_jsonl(path, check)) for split, path in files.items()})


def make_splits(
    raw,
    seed: int,
    validation_size: Optional[int] = None,
    max_train_samples: Optional[int] = None,
    max_test_samples: Optional[int] = None,
):
    """Carve a seeded validation split from train; the original validation split becomes the test set.
    ``validation_size`` defaults to 10% of train, at most 1000 rows. A capped test set is the same random
    subset for every seed and method, so scores stay paired."""
    train = raw["train"]
    n_validation = validation_size if validation_size is not None else min(1000, len(train) // 10)
    if not 0 < n_validation < len(train):
        raise ValueError(f"validation size {n_validation} must be between 1 and {len(train) - 1} (train has {len(train)} rows)")
    parts = train.train_test_split(test_size=n_validation, seed=seed)
    train = parts["train"]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    test = raw["validation"]
    if max_test_samples is not None and max_test_samples < len(test):
        test = test.shuffle(seed=0).select(range(max_test_samples))
    return {"train": train, "validation": parts["test"], "test": test}


def tokenize(dataset, tokenizer, task: Task, max_length: int, pad_to_max_length: bool):
    """Model inputs and ``labels`` only (float for regression), nothing else."""

    def encode(batch):
        encoded = tokenizer(
            *(batch[c] for c in task.text_columns),
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
        )
        encoded["labels"] = [float(y) if task.num_labels == 1 else int(y) for y in batch["label"]]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")


# -- c3a glue -------------------------------------------------------------------------------------------
def _add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `c3a glue` that `c3a glue-suite` passes on to every cell."""
    from c3a.experiments.train import add_method_arguments, add_training_arguments
    from c3a.paper_models import MODEL_SHORTCUTS

    parser.add_argument(
        "--model",
        required=True,
        help=f"hub id or local folder of a model with a sequence-classification head, or a shortcut: {', '.join(MODEL_SHORTCUTS)}",
    )
    parser.add_argument("--data-dir", help="folder with <task>/train.jsonl and <task>/validation.jsonl (default: the hub's GLUE)")
    add_method_arguments(parser)
    add_training_arguments(parser, epochs=3, batch_size=32, seed=False)
    data = parser.add_argument_group("data")
    data.add_argument("--max-length", type=positive_int, default=128, help="tokens per example, longer ones are truncated")
    data.add_argument("--pad-to-max-length", action="store_true", help="pad every batch to --max-length (fixed shapes for memory measurements)")
    data.add_argument("--max-train-samples", type=positive_int, help="train on at most this many rows (after carving validation)")
    data.add_argument("--max-test-samples", type=positive_int, help="test on a fixed random subset of this many rows (same for every run)")
    data.add_argument("--validation-size", type=positive_int, help="rows carved from train for validation (default: 10%%, at most 1000)")
    parser.add_argument("--save-adapter", action="store_true",
                        help="save the trained adapter (best epoch) to <out>/adapter with save_pretrained (PEFT methods)")


def add_glue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--out", help="output folder (default: c3a-glue/<task>/<method>/seed<seed>)")
    _add_shared_arguments(parser)


def _load_model(name: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)
    if tokenizer.pad_token is None:  # decoder models: pad with EOS so batches can be formed
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def run_glue(args: argparse.Namespace) -> int:
    from transformers import DataCollatorWithPadding, set_seed

    from c3a.experiments.train import (
        end_distributed, evaluate, fit, head_modules, method_options, name_as_given, results_record,
        train_config, write_results,
    )
    from c3a.paper_models import resolve_model

    task = TASKS[args.task]
    out = args.out or os.path.join("c3a-glue", args.task, args.method, f"seed{args.seed}")
    config = train_config(args, os.path.join(out, "trainer"))

    set_seed(args.seed)  # before the model: the new head and the adapters are initialised from it
    splits = make_splits(
        load_task(args.task, args.data_dir), args.seed, args.validation_size, args.max_train_samples, args.max_test_samples
    )
    tokenizer, model = _load_model(resolve_model(args.model), task.num_labels)
    model = name_as_given(model, args.model)
    head = head_modules(model)
    model = build_method(model, args.method, method_options(args, head))
    data = {name: tokenize(split, tokenizer, task, args.max_length, args.pad_to_max_length) for name, split in splits.items()}

    result = fit(
        model,
        data["train"],
        data["validation"],
        config=config,
        head=head,
        metric=task.metrics[0],
        compute_metrics=compute_metrics(task),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    test = evaluate(result.trainer, data["test"])
    end_distributed(result.trainer)  # the last collective is done: leave cleanly on every rank
    if not result.trainer.is_world_process_zero():
        return 0
    results = results_record(
        args, result, task=args.task, main_metric=task.metrics[0], trainable_params=trainable_parameters(model, head),
        test=test, samples={name: len(split) for name, split in data.items()},
        config=dict(lr=config.lr, head_lr=config.head_lr, weight_decay=config.weight_decay, head=head, out=out),
    )
    if args.save_adapter and hasattr(model, "peft_config"):  # before results.json: a finished cell has both
        model.save_pretrained(os.path.join(out, "adapter"))
    write_results(os.path.join(out, "results.json"), results)
    metric = task.metrics[0]
    print(
        f"{args.task} {args.method} seed {args.seed}: validation {metric} {result.best[metric]:.4f} "
        f"(epoch {result.best['epoch']:g}), test {metric} {test[metric]:.4f} -> {out}/results.json"
    )
    return 0


# -- c3a glue-suite -------------------------------------------------------------------------------------
def _list(values: list[str]) -> list[str]:
    """Accept both ``a b c`` and ``a,b,c``."""
    return [v for value in values for v in value.split(",") if v]


def add_glue_suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="default: all six")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["full", "bitfit", "ia3", "lora", "vera", "boft", "c3a"],
        help="table rows: a method name, optionally with `c3a glue` options after colons, e.g. "
        "c3a:block-size=64 or lora:rank=16 (row label `c3a (block-size=64)`); several values separated by commas "
        "form a grid chosen on validation, e.g. lora:lr=2e-4,5e-4,1e-3. A row without lr (and no suite --lr) "
        "gets its method's default grid from the registry",
    )
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument(
        "--select-seeds", nargs="+",
        help="seeds whose validation scores choose the grid point (default: all --seeds); the other seeds run at "
        "the chosen point only, once it is known",
    )
    parser.add_argument(
        "--task-options", nargs="+", default=[], metavar="TASK:OPTION=VALUE",
        help="settings for one task's cells, e.g. mrpc:epochs=10 (a row's own options win)",
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
    _add_shared_arguments(parser)


@dataclass(frozen=True)
class Row:
    spec: str  # as given: NAME[:option=value[,value...]...]
    method: str
    argv: tuple[str, ...]  # the single-valued options as `c3a glue` flags
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
    """``NAME=VALUE`` pieces of ``spec`` → (``c3a glue`` flags of the single values, grid of the multi-valued)."""
    argv, grid = [], []
    for option in options:
        name, equals, value = option.partition("=")
        values = tuple(v for v in value.split(",") if v)
        if not equals or not name or name.startswith("-") or not values:
            raise ValueError(f"option {option!r} in {spec!r} must be NAME=VALUE[,VALUE...] (a `c3a glue` option without dashes)")
        if len(values) > 1:
            grid.append((name, values))
        else:
            argv += [f"--{name}", values[0]]
    return argv, grid


def parse_task_options(specs: list[str]) -> dict[str, tuple[str, ...]]:
    """``TASK:option=value[:...]`` → ``{task: c3a glue flags}``: per-task settings such as epochs (a row's own
    options still win). A task not in this suite's ``--tasks`` is allowed (one command split over processes by
    task keeps its options), an unknown one is not."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        task, *options = spec.split(":")
        if task not in TASKS:
            raise ValueError(f"--task-options {spec!r}: unknown task {task!r}; choose from {', '.join(TASKS)}")
        argv, grid = _options(options, spec)
        if grid or not argv:
            raise ValueError(f"--task-options {spec!r}: give TASK:option=value, one value per option")
        out[task] = out.get(task, ()) + tuple(argv)
    return out


def parse_row(spec: str, default_grid: bool = False) -> Row:
    """``NAME[:option=value...]``; ``value1,value2,...`` makes a grid. ``default_grid``: without an ``lr`` option the
    row takes its method's default grid (:attr:`Method.grid`)."""
    method, *options = spec.split(":")
    if method not in METHODS:
        raise ValueError(f"method {method!r} in {spec!r} is unknown; choose from {', '.join(METHODS)}")
    argv, grid = _options(options, spec)
    named = {name for name, _ in grid} | {a[2:] for a in argv[::2]}
    if default_grid and "lr" not in named:
        grid += [(name, values) for name, values in METHODS[method].grid if name not in named]
    return Row(spec, method, tuple(argv), tuple(grid))


def _row_specs(values: list[str]) -> list[str]:
    """Row specs from ``--methods``: separated by spaces or commas; a comma followed by a value (no method name)
    continues the previous row's grid (``lora:lr=1e-4,3e-4,c3a`` is two rows)."""
    specs: list[str] = []
    for value in values:
        for piece in value.split(","):
            if not piece:
                continue
            if specs and piece.split(":")[0] not in METHODS and ":" not in piece:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def _shared_argv(args: argparse.Namespace) -> list[str]:
    """The shared options of ``args`` as command-line flags again, for the cells' `c3a glue`."""
    parser = argparse.ArgumentParser()
    _add_shared_arguments(parser)
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


def _recorded_differences(cell: SuiteCell, requested: argparse.Namespace) -> list[str]:
    """Settings a finished cell was run with that differ from the requested ones (``out`` aside)."""
    from c3a.experiments.train import train_config

    with open(cell.results_path) as f:
        recorded = json.load(f).get("config", {})
    resolved = train_config(requested, cell.folder)  # defaults resolved as the run resolves them
    wanted = {**vars(requested), "lr": resolved.lr, "head_lr": resolved.head_lr, "weight_decay": resolved.weight_decay}
    differences = []
    for key, value in wanted.items():
        if key in ("out", "command"):
            continue
        value = json.loads(json.dumps(value, default=str))
        if recorded.get(key) != value:
            differences.append(f"{key}: {recorded.get(key)!r} → {value!r}")
    return differences


def _load(cell: SuiteCell) -> Optional[dict]:
    if not os.path.isfile(cell.results_path):
        return None
    with open(cell.results_path) as f:
        return json.load(f)


def _choices(cells: list[SuiteCell], select_seeds: list[int]) -> dict[tuple[str, str], Choice]:
    """Per (task, row) with a grid: the point chosen on the selection seeds' validation scores, among the points
    planned for that task (the row's grid, then any tried beyond its edge, in that order: ties go to the first)."""
    from c3a.experiments.report import score

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
                validation.setdefault(cell.point, []).append(score(results, "validation"))
        choice = select(validation, list(dict.fromkeys(cell.point for cell in group)), len(select_seeds))
        if choice is not None and not choice.incomplete:
            choices[key] = choice
    return choices


def _beyond_edge(row: Row, choice: Choice, limit: int) -> Optional[GridPoint]:
    """The next point to try when ``choice`` lies on the edge of a one-option learning-rate grid, at most ``limit``
    points past the row's own values on that side; else ``None``."""
    if len(row.grid) != 1 or row.grid[0][0] not in ("lr", "head-lr"):
        return None
    (name, base), = row.grid
    try:
        tried = [float(p.values[0][1]) for p in choice.means]
        chosen, lowest, highest = float(choice.point.values[0][1]), min(map(float, base)), max(map(float, base))
    except ValueError:
        return None
    for upward, edge, past in ((True, max(tried), sum(x > highest for x in tried)),
                               (False, min(tried), sum(x < lowest for x in tried))):  # fmt: skip
        if chosen == edge and past < limit:
            value = step_beyond([p.values[0][1] for p in choice.means], upward)
            return None if value is None else GridPoint(((name, value),))
    return None


def run_glue_suite(args: argparse.Namespace) -> int:
    tasks, seeds = _list(args.tasks), [int(s) for s in _list(args.seeds)]
    select_seeds = [int(s) for s in _list(args.select_seeds)] if args.select_seeds else seeds
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    if not set(select_seeds) <= set(seeds):
        raise ValueError(f"--select-seeds {select_seeds} must be among --seeds {seeds}")
    if args.report_only and args.overwrite:
        raise ValueError("--report-only trains nothing, so --overwrite would rerun nothing: give one of them")
    rows = [parse_row(spec, default_grid=args.lr is None) for spec in _row_specs(args.methods)]
    per_task = parse_task_options(args.task_options)
    shared = _shared_argv(args)
    glue_parser = argparse.ArgumentParser(prog="c3a glue")
    add_glue_arguments(glue_parser)
    stale: set[SuiteCell] = set()

    def plan(task: str, row: Row, point: GridPoint, seed: int) -> SuiteCell:
        folder = os.path.join(args.out, task, row.folder, point.folder, f"seed{seed}")
        argv = ("--task", task, "--method", row.method, "--seed", str(seed), "--out", folder,
                *shared, *per_task.get(task, ()), *row.argv, *point.argv)  # fmt: skip
        return SuiteCell(task, row, point, seed, folder, argv)

    def check(batch: list[SuiteCell]) -> list[SuiteCell]:
        """Every cell's options parse, and a finished cell's recorded settings are the requested ones (else stop,
        naming one, unless --overwrite)."""
        requested = {cell: glue_parser.parse_args(cell.argv) for cell in batch}  # a bad option fails now
        differing = {cell: diff for cell in batch if os.path.isfile(cell.results_path)
                     and (diff := _recorded_differences(cell, requested[cell]))}  # fmt: skip
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
            print(f"[{cells.index(cell) + 1}/{len(cells)}] c3a glue {' '.join(cell.argv)}", flush=True)
            # one process per cell: peak RSS is a per-process high-water mark
            if subprocess.run([sys.executable, "-m", "c3a.cli", "glue", *cell.argv]).returncode != 0:
                failed.append(cell.folder)
            else:  # the tables follow every finished cell: a long suite stopped midway still leaves them current
                _write_suite_report(args, rows, tasks, cells, select_seeds)

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

    if _write_suite_report(args, rows, tasks, cells, select_seeds):
        print(f"table: {os.path.join(args.out, 'table.md')}, chart: {os.path.join(args.out, 'summary.png')}")
    if args.report_only:  # cells not planned yet (other seeds of an unfinished grid) are not counted
        print(f"report only: {len(unfinished)} planned cell(s) not finished yet", flush=True)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write_suite_report(args, rows: list[Row], tasks: list[str], cells: list[SuiteCell], select_seeds: list[int]) -> bool:
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
            finished.append(Cell(cell.row.label, TASKS[cell.task].title, results))
    if not finished:
        return False
    write_report(
        finished,
        args.out,
        rows=[row.label for row in rows],
        columns=[TASKS[t].title for t in tasks],
        title=f"GLUE, model {args.model}",
        notes=selection_notes(rows, tasks, choices, select_seeds, args.extend_edges),
        reference=next((row.label for row in rows if row.method == "lora"), None),
    )
    write_results(os.path.join(args.out, "selection.json"), {
        f"{task}/{spec}": {"chosen": c.point.label, "validation_means": {p.label: m for p, m in c.means.items()}}
        for (task, spec), c in choices.items()
    })  # fmt: skip
    return True


def selection_notes(
    rows: list[Row], tasks: list[str], choices: dict[tuple[str, str], Choice], select_seeds: list[int], extend_edges: int
) -> str:
    """Markdown: per grid row and task, the grid, each point's mean validation score and the chosen point."""
    gridded = [row for row in rows if row.grid]
    if not gridded:
        return ""
    lines = [
        "## Hyperparameter selection (validation only)",
        "",
        f"Each grid point was trained with seed(s) {', '.join(map(str, select_seeds))}; the point with the best mean "
        "validation score (best epoch, ×100) was chosen per task (ties: the first listed), and test is reported at "
        "that point only. Other seeds ran at the chosen point alone."
        + (f" Where the best point of a learning-rate grid was its largest or smallest value, the next value on the "
           f"grid's ladder was tried too, one at a time, up to {extend_edges} beyond each end (listed after the "
           "grid's own, \"beyond\")." if extend_edges else ""),
        "",
        "| Method | grid | " + " | ".join(TASKS[t].title for t in tasks) + " |",
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
            shown = {p: f"**{m:.1f}**" if p == choice.point else f"{m:.1f}" for p, m in choice.means.items()}
            means = ", ".join(text for p, text in shown.items() if p in own)
            beyond = ", ".join(f"{p.label} {text}" for p, text in shown.items() if p not in own)
            cells.append(f"{choice.point.label} ({means}{'; beyond: ' + beyond if beyond else ''})")
        lines.append(f"| {row.label} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
