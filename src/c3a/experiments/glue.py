"""GLUE (the paper's Table 2): `c3a glue` trains one method on one task; `c3a glue-suite` runs a grid of them
(:mod:`c3a.experiments.suite`).

Protocol: a validation split is carved from train (seeded); the original validation split is the test set;
the epoch with the best validation score is the one evaluated on test. Metrics: Matthews correlation (CoLA),
Pearson (STS-B, Spearman reported too), accuracy (the others).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c3a.argtypes import nonnegative_int, positive_int
from c3a.experiments.jsonl import read_jsonl
from c3a.experiments.methods import METHODS, build_method, trainable_parameters


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
def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_shared_arguments(parser)


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
def _experiment():
    from c3a.experiments.suite import Experiment

    return Experiment("glue", "GLUE", {name: task.title for name, task in TASKS.items()}, "--task",
                      add_glue_arguments, add_shared_arguments,
                      default_methods=("full", "bitfit", "ia3", "lora", "vera", "boft", "c3a"))


def add_glue_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from c3a.experiments.suite import add_suite_arguments

    add_suite_arguments(parser, _experiment())


def run_glue_suite(args: argparse.Namespace) -> int:
    from c3a.experiments.suite import run_suite

    return run_suite(args, _experiment())
