"""Image classification (the paper's Table 4): `c3a vit` fine-tunes a pretrained image classifier (ViT) with one
method of the registry on a hub dataset or a folder of class sub-folders.

Protocol, as for GLUE: the epoch with the best validation accuracy is the one evaluated on test.
- train, validation and test splits: used as given;
- train and validation only: a validation split is carved from train (seeded) and the given validation
  split is the test set;
- train and test only: a validation split is carved from train.
Images go through the model's own ``AutoImageProcessor`` (resize, normalise); no augmentation.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import numpy as np

from c3a.argtypes import nonnegative_int, positive_int
from c3a.experiments.methods import METHODS


# -- data -----------------------------------------------------------------------------------------------
def load_images(dataset: Optional[str], data_dir: Optional[str], config: Optional[str] = None):
    """``DatasetDict`` from the hub (``datasets.load_dataset(dataset)``) or from ``data_dir/<split>/<class>/*``
    (split folders ``train``, ``validation`` or ``val``, ``test``)."""
    from datasets import load_dataset

    if (dataset is None) == (data_dir is None):
        raise ValueError("give exactly one of --dataset and --data-dir")
    if dataset is not None:
        return load_dataset(dataset, config)
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise FileNotFoundError(f"--data-dir {data_dir} needs a train/ folder with one sub-folder of images per class")
    return load_dataset("imagefolder", data_dir=data_dir)


def find_columns(raw, image_column: Optional[str] = None, label_column: Optional[str] = None):
    """``(raw, image_column, label_column)``: the columns given or the first ``Image`` / ``ClassLabel`` ones;
    a label column of plain values (strings, integers) becomes a ``ClassLabel`` shared by all splits."""
    from datasets import ClassLabel, Image

    features = next(iter(raw.values())).features  # the same in every split
    image_column = image_column or next((n for n, f in features.items() if isinstance(f, Image)), None)
    label_column = label_column or next((n for n, f in features.items() if isinstance(f, ClassLabel)), None)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column is None or column not in features:
            raise ValueError(f"no {kind} column {column or ''} found among {list(features)}; name it with --{kind}-column")
    if not isinstance(features[image_column], Image):
        raise ValueError(f"column {image_column!r} holds {features[image_column]}, not images")
    if not isinstance(features[label_column], ClassLabel):
        raw = raw.class_encode_column(label_column)
    return raw, image_column, label_column


def make_splits(raw, seed: int, validation_size: Optional[int] = None, max_train_samples: Optional[int] = None):
    """``train``, ``validation`` and ``test`` by the protocol of the module docstring. ``validation_size``
    (rows carved from train) defaults to 10% of train, at most 1000."""
    if "train" not in raw:
        raise ValueError(f"the data needs a train split; it has {list(raw)}")
    train, validation, test = raw["train"], raw.get("validation"), raw.get("test")
    if test is None:
        if validation is None:
            raise ValueError(f"the data needs a validation or a test split besides train; it has {list(raw)}")
        test, validation = validation, None
    if validation is None:
        n = validation_size or max(1, min(1000, len(train) // 10))
        if not 0 < n < len(train):
            raise ValueError(f"validation size {n} must be between 1 and {len(train) - 1} (train has {len(train)} rows)")
        parts = train.train_test_split(test_size=n, seed=seed)
        train, validation = parts["train"], parts["test"]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return {"train": train, "validation": validation, "test": test}


def with_pixels(dataset, processor, image_column: str, label_column: str):
    """``dataset`` yielding ``pixel_values`` and ``labels``, images processed on the fly."""

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"], "labels": batch[label_column]}

    return dataset.with_transform(transform)


def accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float(np.mean(logits.argmax(-1) == prediction.label_ids))}


# -- c3a vit --------------------------------------------------------------------------------------------
def default_workers() -> int:
    """Image-decoding processes that leave a core to the training loop, at most 4 (more rarely help a ViT)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def add_vit_arguments(parser: argparse.ArgumentParser) -> None:
    from c3a.experiments.options import add_method_arguments, add_save_adapter_argument, add_training_arguments

    parser.add_argument("--model", required=True, help="hub id or local folder of an image classifier, e.g. google/vit-base-patch16-224-in21k")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="hub dataset id with an image and a label column")
    source.add_argument("--data-dir", help="folder with train/<class>/*, validation/<class>/* and/or test/<class>/*")
    parser.add_argument("--dataset-config", help="the hub dataset's configuration")
    parser.add_argument("--image-column", help="default: the first column of images")
    parser.add_argument("--label-column", help="default: the first ClassLabel column")
    parser.add_argument("--method", required=True, choices=list(METHODS), help="adapters go into the attention query and value projections unless --targets says otherwise")
    parser.add_argument("--out", help="output folder (default: c3a-vit/<dataset>/<method>/seed<seed>)")
    add_method_arguments(parser)
    add_training_arguments(parser, epochs=10, batch_size=64)
    data = parser.add_argument_group("data")
    data.add_argument("--validation-size", type=positive_int, help="rows carved from train for validation when needed (default: 10%%, at most 1000)")
    data.add_argument("--max-train-samples", type=positive_int, help="train on at most this many rows")
    data.add_argument("--num-workers", type=nonnegative_int, default=default_workers(),
                      help="data-loader processes decoding images: min(4, CPU cores − 1), one core left for training")
    add_save_adapter_argument(parser)


def run_vit(args: argparse.Namespace) -> int:
    from transformers import AutoImageProcessor, AutoModelForImageClassification, set_seed

    from c3a.experiments.methods import build_method, trainable_parameters
    from c3a.experiments.train import (
        end_distributed, evaluate, fit, head_modules, method_options, name_as_given, results_record,
        save_adapter, train_config, write_results,
    )
    from c3a.hub import check_data_source, check_model_source, loading
    from c3a.io import check_outputs_apart, check_writable
    from c3a.paper_models import query_value_targets, resolve_model

    name = args.dataset or os.path.basename(os.path.normpath(args.data_dir))
    out = args.out or os.path.join("c3a-vit", name.replace("/", "_"), args.method, f"seed{args.seed}")
    check_outputs_apart({"--out": out}, {"--data-dir": args.data_dir, "--model": args.model})
    check_writable("--out", out)
    if args.dataset:
        check_data_source(args.dataset, "--dataset")
    path = resolve_model(args.model)
    check_model_source(path)
    set_seed(args.seed)  # before the model: the new head and the adapters are initialised from it
    with loading("--dataset" if args.dataset else "--data-dir", args.dataset or args.data_dir):
        images = load_images(args.dataset, args.data_dir, args.dataset_config)
    raw, image_column, label_column = find_columns(images, args.image_column, args.label_column)
    labels = raw["train"].features[label_column].names
    splits = make_splits(raw, args.seed, args.validation_size, args.max_train_samples)

    with loading("--model", args.model):
        processor = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageClassification.from_pretrained(
            path,
            id2label=dict(enumerate(labels)),  # sets num_labels too (given both, transformers warns on a new head)
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a new head for these classes
        )
    model = name_as_given(model, args.model)
    head = head_modules(model)
    options = method_options(args, head)
    options.targets = options.targets or query_value_targets(model)  # the paper's: attention query and value
    model = build_method(model, args.method, options)
    data = {split: with_pixels(dataset, processor, image_column, label_column) for split, dataset in splits.items()}

    # the images are decoded on the fly from their own column (with_pixels), which the model's forward does not name
    config = train_config(args, os.path.join(out, "trainer"), dataloader_num_workers=args.num_workers,
                          remove_unused_columns=False)
    result = fit(
        model, data["train"], data["validation"], config=config, head=head, metric="accuracy", compute_metrics=accuracy
    )
    test = evaluate(result.trainer, data["test"])
    if result.trainer.is_world_process_zero():
        results = results_record(
            args, result, task=name, main_metric="accuracy", trainable_params=trainable_parameters(model, head),
            test=test, samples={split: len(dataset) for split, dataset in splits.items()}, classes=labels,
            config=dict(lr=config.lr, head_lr=config.head_lr, weight_decay=config.weight_decay, head=head, out=out),
        )
        if args.save_adapter:  # before results.json: a finished run has both
            save_adapter(model, out)
        write_results(os.path.join(out, "results.json"), results)
        print(
            f"{name} {args.method} seed {args.seed}: validation accuracy {result.best['accuracy']:.4f} "
            f"(epoch {result.best['epoch']:g}), test accuracy {test['accuracy']:.4f} -> {out}/results.json"
        )
    end_distributed(result.trainer)
    return 0
