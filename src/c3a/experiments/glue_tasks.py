"""GLUE tasks (the paper's Table 2): their text columns, labels and metrics, and their data — read from the hub or
from local JSONL in the HF GLUE schema, validated row by row, and split by the protocol below.

Protocol: a validation split is carved from train (seeded); the original validation split is the test set;
the epoch with the best validation score is the one evaluated on test. Metrics: Matthews correlation (CoLA),
Pearson (STS-B, Spearman reported too), accuracy (the others).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c3a.experiments.jsonl import read_jsonl


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
GLUE_HUB_ID = "nyu-mll/glue"  # without --data-dir


def load_task(task: str, data_dir: Optional[str] = None):
    """``DatasetDict`` with ``train`` and ``validation`` in the HF GLUE schema: from ``data_dir/<task>/*.jsonl``
    or, without ``data_dir``, from the hub. A bad local row is reported with its file and line."""
    from datasets import Dataset, DatasetDict, load_dataset

    spec = TASKS[task]
    if data_dir is None:
        raw = load_dataset(GLUE_HUB_ID, task)
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
