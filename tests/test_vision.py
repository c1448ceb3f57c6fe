"""`c3a vit`: split protocol, column detection, image processing, and end-to-end runs on a tiny random ViT."""

import json
import os

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from safetensors.torch import load_file

from c3a.cli import main
from c3a.experiments.vision import find_columns, load_images, make_splits, with_pixels

COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def _image(rgb, rng, size=(20, 24)):
    """A noisy patch of one colour, in a size the processor must change."""
    pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
    return PILImage.fromarray(pixels)


def _rows(n_per_class, rng, label=lambda i, name: i):
    return [{"img": _image(rgb, rng), "y": label(i, name)} for i, (name, rgb) in enumerate(COLORS.items()) for _ in range(n_per_class)]


def _dataset(n_per_class, seed=0, **kwargs):
    rows = _rows(n_per_class, np.random.default_rng(seed), **kwargs)
    features = Features({"img": Image(), "y": ClassLabel(names=list(COLORS))})
    return Dataset.from_list(rows, features=features)


def test_split_protocol():
    train, validation, test = _dataset(10), _dataset(2, seed=1), _dataset(3, seed=2)
    # all three given: used as given
    splits = make_splits(DatasetDict(train=train, validation=validation, test=test), seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [30, 6, 9]
    # no test: validation carved from train (10%), the given validation is the test set
    splits = make_splits(DatasetDict(train=train, validation=validation), seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [27, 3, 6]
    assert splits["test"]["y"] == validation["y"]
    # no validation: carved from train; seeded
    splits = make_splits(DatasetDict(train=train, test=test), seed=0, validation_size=5)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [25, 5, 9]
    again = make_splits(DatasetDict(train=train, test=test), seed=0, validation_size=5)
    assert again["validation"]["y"] == splits["validation"]["y"]
    with pytest.raises(ValueError, match="validation or a test split"):
        make_splits(DatasetDict(train=train), seed=0)
    with pytest.raises(ValueError, match="validation size 30"):
        make_splits(DatasetDict(train=train, test=test), seed=0, validation_size=30)


def test_find_columns_detects_and_encodes():
    raw = DatasetDict(train=_dataset(2), test=_dataset(1))
    assert find_columns(raw)[1:] == ("img", "y")
    # string labels become one ClassLabel shared by the splits
    strings = {s: Dataset.from_list(_rows(n, np.random.default_rng(0), label=lambda i, name: name)) for s, n in (("train", 2), ("test", 1))}
    raw = DatasetDict({s: d.cast_column("img", Image()) for s, d in strings.items()})
    raw, image, label = find_columns(raw, label_column="y")
    assert raw["train"].features["y"].names == sorted(COLORS) and raw["test"]["y"] == [0, 1, 2]
    with pytest.raises(ValueError, match="no label column"):
        find_columns(DatasetDict(train=raw["train"].cast_column("y", Value("int64"))))
    with pytest.raises(ValueError, match="not images"):
        find_columns(raw, image_column="y")
    with pytest.raises(ValueError, match="exactly one"):
        load_images(None, None)


def test_with_pixels_uses_the_processor():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    dataset = _dataset(1)
    item = with_pixels(dataset, processor, "img", "y")[2]
    assert item["labels"] == 2 and item["pixel_values"].shape == (3, 32, 32)
    expected = processor(images=dataset[2]["img"].convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(item["pixel_values"], expected)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """Image folders train/ (12 per class) and validation/ (4 per class, no test/), a 2-layer random ViT for
    32×32 images (patch 8, hidden 32) with 5 labels (the command replaces the head) and its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, set_seed

    root = tmp_path_factory.mktemp("vit")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("validation", 4)):
        for name, rgb in COLORS.items():
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                _image(rgb, rng).save(folder / f"{i}.png")
    set_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5
    )
    ViTForImageClassification(config).save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    return root


def _vit(root, out, *extra):
    argv = ["vit", "--model", str(root / "model"), "--data-dir", str(root / "images"), "--batch-size", "8",
            "--num-workers", "0", "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_vit_c3a_end_to_end(tiny_vit, tmp_path):
    results = _vit(tiny_vit, tmp_path, "--method", "c3a", "--block-size", "8", "--epochs", "3", "--save-adapter")
    # no test/ folder: validation/ is the test set (12 images), validation carved from train (10% of 36)
    assert results["samples"] == {"train": 33, "validation": 3, "test": 12}
    assert results["classes"] == sorted(COLORS)
    assert results["trainable_params"] == 2 * 2 * 32 * 32 // 8  # query and value of 2 layers, head excluded
    assert results["test"]["accuracy"] >= 0.9  # colours are easy
    best = max(row["validation"]["accuracy"] for row in results["history"])
    assert results["validation"]["accuracy"] == best and len(results["history"]) == 3
    for key in ("peak_memory_bytes", "memory_kind", "train_seconds", "config"):
        assert key in results
    assert results["config"]["head"] == ["classifier"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")  # the kernels and the trained head
    assert sum("c3a_kernel" in k for k in saved) == 4 and any("classifier" in k for k in saved)


def test_vit_head_only_max_steps(tiny_vit, tmp_path):
    results = _vit(tiny_vit, tmp_path, "--method", "head", "--max-steps", "2")
    assert results["trainable_params"] == 0  # the head is not counted, as in the paper
    assert results["test"]["accuracy"] in {k / 12 for k in range(13)}  # a share of the 12 test images
    assert results["history"][-1]["epoch"] < 1
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # nothing else: no empty trainer/ folder


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (5, 4), (64, 4)])
def test_image_workers_leave_a_core_to_training(monkeypatch, cores, workers):
    from c3a.experiments import vision

    monkeypatch.setattr(vision.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert vision.default_workers() == workers


def test_vit_dataset_from_the_hub(tiny_vit, tmp_path, monkeypatch):
    """--dataset: a hub dataset id (and --dataset-config) goes to datasets.load_dataset; its Image and ClassLabel
    columns are found. The hub is stood in for by the image folders, read by the real loader."""
    import datasets

    from c3a import hub

    real, calls = datasets.load_dataset, []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return real("imagefolder", data_dir=str(tiny_vit / "images"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_problem", lambda: None)  # reachable, as far as the check is concerned
    argv = ["vit", "--model", str(tiny_vit / "model"), "--dataset", "org/colors", "--dataset-config", "small",
            "--method", "head", "--max-steps", "1", "--batch-size", "8", "--num-workers", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert calls == [("org/colors", "small")]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "org/colors" and results["classes"] == sorted(COLORS)
    assert results["samples"] == {"train": 33, "validation": 3, "test": 12}  # the folders' protocol, as with --data-dir
