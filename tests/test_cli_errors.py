"""Bad inputs through the real command line: one line naming the thing and what is expected, exit status 2, before any
long work (no model loaded, no training, nothing written). The hub is made unreachable by pointing
huggingface_hub at a closed local port, so these tests hold with or without a network."""

import json
import subprocess
import sys
import time

import pytest

from c3a import hub
from c3a.cli import main

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once


def one_line(argv, capsys) -> str:
    """``c3a ARGV`` as the program runs it (user errors as one line); its error line."""
    assert main(argv, one_line_errors=True) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"c3a {argv[0]}: error: "), err
    return err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub out of reach, and an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub.hub_problem.cache_clear()
    yield
    hub.hub_problem.cache_clear()


@pytest.fixture
def local(tmp_path):
    """A folder that passes as a model (config.json), SQL rows, image folders, and the bad --model candidates."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    sql = tmp_path / "sql.jsonl"
    sql.write_text("".join(json.dumps({"question": "q", "context": "c", "answer": "SELECT 1"}) + "\n" for _ in range(30)))
    images = tmp_path / "images" / "train" / "cat"
    images.mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"}))
    (lora / "adapter_model.safetensors").write_bytes(b"")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    return tmp_path


def _runs(root, model):
    """One command line per command that takes --model, all else valid and local."""
    out = str(root / "out")
    return [
        ["glue", "--task", "sst2", "--method", "lora", "--model", model, "--data-dir", str(root / "gluedata"), "--out", out],
        ["sft", "--format", "sql", "--method", "lora", "--model", model, "--data", str(root / "sql.jsonl"), "--out", out],
        ["vit", "--method", "lora", "--model", model, "--data-dir", str(root / "images"), "--out", out],
        ["params", "--method", "lora", "--model", model],
        ["glue-suite", "--model", model, "--data-dir", str(root / "gluedata"), "--out", out],
        ["sft-suite", "--model", model, "--tasks", "sql", "--task-options", f"sql:data={root / 'sql.jsonl'}", "--out", out],
    ]


@pytest.mark.parametrize("bad, found", [
    ("missing", "does not exist"),
    ("file.bin", "is a file"),
    ("empty", "is an empty folder"),
    ("lora", r"holds a PEFT adapter \(adapter_config\.json\), not a model; pass its base model \(org/base\)"),
    ("other", r"has no config\.json \(it holds notes\.txt\)"),
])
def test_bad_model_folders_are_named_with_what_is_expected(local, capsys, bad, found):
    import re

    path = str(local / bad)
    for argv in _runs(local, path):
        err = one_line(argv, capsys)
        assert re.search(rf"(--model |: ){re.escape(path)} {found}", err), err  # params: after what it also tried
        if bad != "lora":
            assert "expected a model folder (config.json and weights" in err
    assert not (local / "out").exists()


def test_hub_ids_while_the_hub_is_unreachable(local, offline, capsys):
    for argv in _runs(local, "org/some-model"):
        err = one_line(argv, capsys)
        assert f"org/some-model is not a local path, and the Hugging Face hub ({CLOSED_PORT}) cannot be reached" in err
        assert argv[0] == "params" or "--model org/some-model is not" in err  # params: a model name or config
        assert "pass a local model folder" in err
    model = str(local / "model")
    err = one_line(["glue", "--task", "sst2", "--method", "lora", "--model", model, "--out", str(local / "out")], capsys)
    assert "GLUE data (no --data-dir given) nyu-mll/glue is not a local path" in err and "--data-dir DIR holding sst2/" in err
    err = one_line(["sft", "--format", "sql", "--method", "lora", "--model", model, "--out", str(local / "out")], capsys)
    assert "--format sql's dataset b-mc2/sql-create-context is not a local path" in err
    err = one_line(["sft", "--format", "sql", "--method", "lora", "--model", model, "--data", str(local / "sql.jsonl"),
                    "--eval-data", "org/math", "--out", str(local / "out")], capsys)  # fmt: skip
    assert "--eval-data org/math is not a local path" in err and "pass a local data file or folder" in err
    err = one_line(["vit", "--method", "lora", "--model", model, "--dataset", "org/pets", "--out", str(local / "out")], capsys)
    assert "--dataset org/pets is not a local path" in err
    for argv in (["rank", "org/adapter"], ["export-lora", "org/adapter", "--rank", "2", "--out", str(local / "out")]):
        assert "adapter org/adapter is not a local path" in one_line(argv, capsys)
    assert not (local / "out").exists()


def test_a_hub_id_in_the_cache_is_not_probed(local, offline, monkeypatch):
    monkeypatch.setattr(hub, "_cached", lambda name, kind: name == "org/cached")
    hub.check_hub("org/cached", "--model")
    with pytest.raises(ConnectionError, match="--model org/other is not a local path"):
        hub.check_hub("org/other", "--model")


def test_the_readme_s_hub_command_fails_fast_offline(tmp_path):
    """The program itself: one line, exit 2, in seconds instead of a minute of retries and a traceback."""
    env = {"PATH": "", "HF_ENDPOINT": CLOSED_PORT, "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "c3a.cli", "glue", "--task", "sst2", "--method", "c3a", "--model",
                           "roberta-base", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--model roberta-base is not a local path" in done.stderr
    # huggingface_hub's back-off alone sleeps 1+2+4+8+8 = 23 s before it gives up; the probe does not retry
    assert seconds < 23 + 60, seconds  # generous for a loaded machine: the import of c3a's run path is most of it


def test_data_files_with_bad_bytes_or_json_name_the_file_and_line(local, capsys):
    model = str(local / "model")
    bad = local / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "context": "c", "answer": "SELECT 1"}\n{"question": "caf\xe9"}\n')
    err = one_line(["sft", "--format", "sql", "--method", "lora", "--model", model, "--data", str(bad),
                    "--out", str(local / "out")], capsys)
    assert f"{bad}:2: not UTF-8 text (byte 0xe9 at column 18)" in err
    glue_dir = local / "glue" / "sst2"
    glue_dir.mkdir(parents=True)
    (glue_dir / "train.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1\n')
    (glue_dir / "validation.jsonl").write_text('{"sentence": "a", "label": 0}\n')
    err = one_line(["glue", "--task", "sst2", "--method", "lora", "--model", model, "--data-dir", str(local / "glue"),
                    "--out", str(local / "out")], capsys)  # fmt: skip
    assert f"{glue_dir / 'train.jsonl'}:2: not valid JSON" in err
    for name, text, reason in (("bad.json", '[{"question": 1', "JSON"), ("bad.csv", 'question,context\n"a,b\n', "CSV")):
        (local / name).write_text(text)
        err = one_line(["sft", "--format", "sql", "--method", "lora", "--model", model, "--data", str(local / name),
                        "--out", str(local / "out")], capsys)  # fmt: skip
        assert f"{local / name}: not a readable {reason} data file (" in err
    bom = local / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (local / "sql.jsonl").read_bytes())  # a BOM is UTF-8: read, not refused
    from c3a.experiments.jsonl import read_jsonl

    assert len(read_jsonl(str(bom))) == 30


def test_outputs_that_cannot_be_written_fail_before_the_run(local, capsys):
    file = local / "file.bin"
    model = str(local / "model")
    cases = [
        (["demo", "--out", str(file)], "--out"),
        (["demo", "--out", str(file / "sub")], "--out"),
        (["glue", "--task", "sst2", "--method", "lora", "--model", model, "--data-dir", str(local / "gluedata"), "--out", str(file)], "--out"),
        (["sft", "--format", "sql", "--method", "lora", "--model", model, "--data", str(local / "sql.jsonl"),
          "--out", str(file)], "--out"),
        (["vit", "--method", "lora", "--model", model, "--data-dir", str(local / "images"), "--out", str(file)], "--out"),
        (["export-lora", str(local / "lora"), "--rank", "2", "--out", str(file)], "--out"),
        (["rank", str(local / "lora"), "--plot", str(local / "empty")], "--plot"),
        (["glue-suite", "--model", model, "--data-dir", str(local / "gluedata"), "--out", str(file)], "--out"),
    ]
    for argv, option in cases:
        start = time.perf_counter()
        err = one_line(argv, capsys)
        assert f"{option} {argv[argv.index(option) + 1]}" in err and (
            "is a file; expected a folder" in err or "cannot be created: " in err
            or "is a folder; expected a file name" in err), err
        assert time.perf_counter() - start < 60  # the demo alone trains for minutes: refused before that
    assert sorted(p.name for p in local.iterdir()) == ["empty", "file.bin", "images", "lora", "model", "other", "sql.jsonl"]


def test_a_block_size_that_fits_no_layer_is_said_once(capsys):
    err = one_line(["params", "--model", "roberta-base", "--method", "c3a", "--block-size", "7"], capsys)
    assert err.count("does not fit") == 1 and err.count("valid block sizes") == 1, err
    assert "block size 7 does not fit 24 layer(s) of 768→768 (e.g. encoder.layer.0.attention.self.query)" in err
    err = one_line(["params", "--model", "llama3-8b", "--method", "c3a", "--block-size", "7",
                    "--targets", "q_proj,k_proj,v_proj"], capsys)  # fmt: skip
    assert err.count("valid block sizes") == 2  # two shapes: 4096→4096 (q) and 4096→1024 (k, v)
    assert "32 layer(s) of 4096→4096" in err and "64 layer(s) of 4096→1024" in err
