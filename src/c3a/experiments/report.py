"""Tables and charts from experiments' ``results.json``: method rows × task columns, as in the paper.

A result needs ``main_metric``, ``test`` (metric → value), ``trainable_params``, ``peak_memory_bytes``,
``memory_kind`` and ``train_seconds``; nothing here knows which experiment wrote it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c3a.io import atomic_path, atomic_write_text

MEMORY_KINDS = {"cuda_max_allocated": "peak GPU memory (torch.cuda.max_memory_allocated)", "cpu_peak_rss": "peak RSS of the training process (CPU)"}


@dataclass(frozen=True)
class Cell:
    row: str  # e.g. the method
    column: str  # e.g. the task
    results: dict


def selection_metric(results: dict) -> tuple[str, bool]:
    """The validation metric that chose the run's epoch (and a suite's grid point), and whether higher is better:
    ``results["select"]`` where a run records one (``c3a sft``: the loss), else the main metric."""
    select = results.get("select") or {}
    return select.get("metric", results["main_metric"]), select.get("greater_is_better", True)


def metric_name(results: dict, split: str = "test") -> str:
    return selection_metric(results)[0] if split == "validation" else results["main_metric"]


def score(results: dict, split: str = "test") -> float:
    """The main metric on ``split`` ("test"), or the selection metric on "validation" (its best epoch), ×100 as
    papers print scores (a loss as it is)."""
    metric = metric_name(results, split)
    return results[split][metric] * (1 if metric == "loss" else 100)


def validation_score(results: dict) -> float:
    """:func:`score` on validation, negated where lower is better: the higher, the better the run."""
    return score(results, "validation") * (1 if selection_metric(results)[1] else -1)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _params(values: set[int]) -> str:
    low, high = min(values), max(values)
    text = f"{low / 1e6:.3f}M"
    return text if low == high else f"{text}–{high / 1e6:.3f}M"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _mean_std(values: list[float], digits: int = 1) -> str:
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):.{digits}f}"


@dataclass
class Summary:
    """Per row: scores per column (one per seed), parameter counts, peak memory and its kind, training time."""

    scores: dict[str, dict[str, list[float]]]
    params: dict[str, set[int]]
    memory: dict[str, tuple[int, str]]
    seconds: dict[str, float]  # training wall time summed over the row's runs
    metrics: dict[str, str]  # column → its main metric
    rows: list[str]
    columns: list[str]
    split: str

    def average(self, row: str) -> Optional[float]:
        """Mean over columns of the per-column means; None unless every column has a score."""
        if not all(self.scores[row].get(c) for c in self.columns):
            return None
        return float(np.mean([np.mean(self.scores[row][c]) for c in self.columns]))


def summarize(
    cells: list[Cell], rows: Optional[list[str]] = None, columns: Optional[list[str]] = None, split: str = "test"
) -> Summary:
    rows = [r for r in (rows or dict.fromkeys(c.row for c in cells)) if any(c.row == r for c in cells)]
    columns = columns or list(dict.fromkeys(c.column for c in cells))
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[str, set[int]] = defaultdict(set)
    memory: dict[str, tuple[int, str]] = {}
    seconds: dict[str, float] = defaultdict(float)
    metrics: dict[str, str] = {}
    for cell in cells:
        r = cell.results
        scores[cell.row][cell.column].append(score(r, split))
        params[cell.row].add(int(r["trainable_params"]))
        seconds[cell.row] += r["train_seconds"]
        if cell.row not in memory or r["peak_memory_bytes"] > memory[cell.row][0]:
            memory[cell.row] = (r["peak_memory_bytes"], r["memory_kind"])
        metrics[cell.column] = metric_name(r, split)
    return Summary(scores, params, memory, seconds, metrics, rows, columns, split)


def markdown_table(summary: Summary, title: Optional[str] = None) -> str:
    s = summary
    kinds = {kind for _, kind in s.memory.values()}
    memory_header = "Peak memory" if len(kinds) != 1 else {"cuda_max_allocated": "Peak GPU mem", "cpu_peak_rss": "Peak RSS (CPU)"}.get(next(iter(kinds)), "Peak memory")
    header = ["Method", "# Params", memory_header, "Train time", *(f"{c} ({s.metrics.get(c, '?')})" for c in s.columns), "Avg."]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    runs = set()
    for row in s.rows:
        cells = []
        for column in s.columns:
            values = s.scores[row].get(column, [])
            runs.add(len(values))
            cells.append(_mean_std(values, 3 if s.metrics.get(column) == "loss" else 1) if values else "–")
        average = s.average(row)
        memory_bytes, kind = s.memory[row]
        memory = _bytes(memory_bytes) + ("" if len(kinds) == 1 else f" ({kind})")
        lines.append(
            "| " + " | ".join([row, _params(s.params[row]), memory, _minutes(s.seconds[row]), *cells,
                               "–" if average is None else f"{average:.{3 if 'loss' in s.metrics.values() else 1}f}"]) + " |"
        )
    seeds = "/".join(str(n) for n in sorted(runs - {0}))
    lines += [
        "",
        ("Test scores ×100 at the epoch with the best validation score" if s.split == "test"
         else f"Best {s.split} scores (×100; a loss as it is)")
        + f"; mean ± sample std over {seeds} run(s) per cell. "
        "Avg. = mean of the column means. # Params: trainable parameters without the task head. "
        "Train time: training wall time summed over the row's runs here. Memory: the highest over the row's runs; "
        + "; ".join(f"{k} = {MEMORY_KINDS.get(k, k)}" for k in sorted(kinds))
        + ".",
        "",
    ]
    return "\n".join(lines)


def paired_table(cells: list[Cell], reference: str, rows: list[str], columns: list[str], title: str) -> str:
    """Each row minus ``reference``, seed by seed (one seed fixes the validation split and the data order, so both
    runs saw the same data): per column the mean ± sample std of the test differences ×100
    and on how many seeds the row scored higher. Seeds that only one of the two ran are left out."""
    by_seed: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for cell in cells:
        if "seed" in cell.results:
            by_seed[cell.row, cell.column][int(cell.results["seed"])] = score(cell.results)
    lines = [f"## {title}", "", "| Method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        if row == reference:
            continue
        entries = []
        for column in columns:
            mine, theirs = by_seed.get((row, column), {}), by_seed.get((reference, column), {})
            diffs = [mine[seed] - theirs[seed] for seed in sorted(mine.keys() & theirs.keys())]
            if not diffs:
                entries.append("–")
                continue
            spread = f" ± {np.std(diffs, ddof=1):.1f}" if len(diffs) > 1 else ""
            entries.append(f"{np.mean(diffs):+.1f}{spread} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    lines += [
        "",
        f"Test score ×100 of the row minus {reference}'s, seed by seed; mean ± sample std over the seeds both ran, "
        "(k/n): on k of those n seeds the row scored higher. A 95 % interval for the mean difference is mean ± "
        "t·std/√n, t from Student's t with n − 1 degrees of freedom (n = 3: ± 2.5 std; n = 2: ± 9.0 std): where it "
        "holds zero, the difference is not distinguishable from seed noise.",
        "",
    ]
    return "\n".join(lines)


def bar_chart(summary: Summary, path: str, title: Optional[str] = None) -> None:
    """Grouped bars (score per column, std as error bars) beside average score vs trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(s.rows), 1)
    x = np.arange(len(s.columns))
    for i, row in enumerate(s.rows):
        values = [s.scores[row].get(c, []) for c in s.columns]
        means = [np.mean(v) if v else np.nan for v in values]
        errors = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        bars.bar(x + (i - (len(s.rows) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=row)
    bars.set_xticks(x, [f"{c}\n({s.metrics.get(c, '?')})" for c in s.columns])
    bars.set_ylabel(f"{s.split} score ×100")
    bars.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    for row in s.rows:
        average = s.average(row)
        if average is not None:
            x = max(max(s.params[row]), 1)  # log axis: the head-only row (0) is drawn at 1
            scatter.scatter(x, average)
            scatter.annotate(row, (x, average), fontsize=7, xytext=(3, 3), textcoords="offset points")
    scatter.set_xscale("log")
    scatter.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    scatter.set_xlabel("trainable parameters, head excluded (0 drawn at 1)")
    scatter.set_ylabel("average score")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(
    cells: list[Cell], out: str, rows=None, columns=None, title: Optional[str] = None, notes: str = "",
    reference: Optional[str] = None,
) -> Summary:
    """``out/table.md`` (test scores, then the validation scores that chose the epochs and hyperparameters, then
    each row paired seed by seed with the ``reference`` row where given and present, then ``notes``) and
    ``out/summary.png`` (test) for ``cells``."""
    summary = summarize(cells, rows, columns)
    validation = summarize(cells, rows, columns, split="validation")
    tables = [markdown_table(summary, title), markdown_table(validation, f"{title or 'Results'}: validation (best epoch)")]
    if reference in summary.rows and len(summary.rows) > 1:
        tables.append(paired_table(cells, reference, summary.rows, summary.columns,
                                   f"{title or 'Results'}: paired with {reference} (same seeds)"))
    tables += [notes] if notes else []
    atomic_write_text(os.path.join(out, "table.md"), "\n".join(tables))
    bar_chart(summary, os.path.join(out, "summary.png"), title)
    return summary
