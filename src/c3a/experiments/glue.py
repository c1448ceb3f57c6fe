"""`c3a glue` trains one method on one GLUE task; `c3a glue-suite` runs a grid of them (:mod:`c3a.experiments.suite`).

The tasks, their data and metrics are in :mod:`c3a.experiments.glue_tasks`; the methods are the registry's.
"""

from __future__ import annotations

import argparse
import os

from c3a.argtypes import nonnegative_int, positive_int
from c3a.experiments.glue_tasks import GLUE_HUB_ID, TASKS, compute_metrics, load_task, make_splits, tokenize
from c3a.experiments.methods import METHODS, build_method, default_methods, trainable_parameters

# Kept for one release: these were defined here before glue_tasks.py, and scripts may import them from here.
from c3a.experiments.glue_tasks import METRICS, Task, accuracy, matthews_corrcoef, pearson, spearman  # noqa: F401


# -- c3a glue -------------------------------------------------------------------------------------------
def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `c3a glue` that `c3a glue-suite` passes on to every cell."""
    from c3a.experiments.options import add_method_arguments, add_save_adapter_argument, add_training_arguments
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
    add_save_adapter_argument(parser)


def add_glue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the GLUE task")
    parser.add_argument("--method", required=True, choices=list(METHODS), help="the fine-tuning method (the registry's)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="validation split, initialisation and data order")
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
        save_adapter, train_config, write_results,
    )
    from c3a.hub import check_hub, check_model_source, loading
    from c3a.io import check_outputs_apart, check_writable
    from c3a.paper_models import resolve_model

    task = TASKS[args.task]
    out = args.out or os.path.join("c3a-glue", args.task, args.method, f"seed{args.seed}")
    check_outputs_apart({"--out": out}, {"--data-dir": args.data_dir, "--model": args.model})
    check_writable("--out", out)
    path = resolve_model(args.model)
    check_model_source(path)
    if args.data_dir is None:
        check_hub(GLUE_HUB_ID, "GLUE data (no --data-dir given)", "dataset",
                  instead=f"--data-dir DIR holding {args.task}/train.jsonl and {args.task}/validation.jsonl")
    config = train_config(args, os.path.join(out, "trainer"))

    set_seed(args.seed)  # before the model: the new head and the adapters are initialised from it
    splits = make_splits(
        load_task(args.task, args.data_dir), args.seed, args.validation_size, args.max_train_samples, args.max_test_samples
    )
    with loading("--model", args.model):
        tokenizer, model = _load_model(path, task.num_labels)
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
    if args.save_adapter:  # before results.json: a finished cell has both
        save_adapter(model, out)
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
                      default_methods=default_methods("glue"))


def add_glue_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from c3a.experiments.suite import add_suite_arguments

    add_suite_arguments(parser, _experiment())


def run_glue_suite(args: argparse.Namespace) -> int:
    from c3a.experiments.suite import run_suite

    return run_suite(args, _experiment())
