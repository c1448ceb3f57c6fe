"""GGUF model shortcuts (paper_models.resolve_model / converted_gguf) on a tiny Llama GGUF written here: no download,
never the real package's file."""

import json
import os
import re
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from c3a import paper_models
from c3a.paper_models import Shortcut, converted_gguf, resolve_model

TEXTS = ["the quick brown fox", "héllo wörld 123<|endoftext|> lazy dogs", "  jumps\nover"]


def write_tiny_gguf(path):
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads), fp32, with a byte-level BPE tokenizer ("gpt2")."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    vocab, hidden, layers, heads, kv_heads, ffn = len(tokens), 32, 2, 4, 2, 64
    kv = kv_heads * hidden // heads

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", r(vocab, hidden))
    for i in range(layers):
        shapes = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, hidden), "attn_k": (kv, hidden),
                  "attn_v": (kv, hidden), "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden),
                  "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", r(*shape) + (1 if name.endswith("norm") else 0))
    w.add_tensor("output_norm.weight", 1 + r(hidden))
    w.add_tensor("output.weight", r(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return str(path)


def test_conversion_matches_the_gguf_loaded_directly(gguf_file, tmp_path):
    target = converted_gguf(gguf_file, str(tmp_path / "m"))
    assert target == str(tmp_path / "m")
    with open(os.path.join(target, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    folder, name = os.path.split(gguf_file)
    direct, plain = (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval(),
                     AutoModelForCausalLM.from_pretrained(target).eval())
    direct_tok, plain_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(target)
    assert getattr(plain.config, "quantization_config", None) is None
    for text in TEXTS:
        ids = direct_tok(text)["input_ids"]
        assert plain_tok(text)["input_ids"] == ids
        with torch.no_grad():
            torch.testing.assert_close(plain(torch.tensor([ids])).logits, direct(torch.tensor([ids])).logits)
    assert plain_tok.eos_token == direct_tok.eos_token == "<|endoftext|>"


def test_second_call_reuses_the_folder(gguf_file, tmp_path, monkeypatch):
    target = converted_gguf(gguf_file, str(tmp_path / "m"))
    stamp = os.stat(os.path.join(target, "model.safetensors")).st_mtime_ns

    def fail(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(paper_models, "_convert_gguf", fail)
    assert converted_gguf(gguf_file, target) == target
    assert os.stat(os.path.join(target, "model.safetensors")).st_mtime_ns == stamp


def test_concurrent_callers_share_one_conversion(gguf_file, tmp_path, monkeypatch):
    real, calls, converting = paper_models._convert_gguf, [], threading.Event()

    def slow(src, out):
        calls.append(out)
        converting.set()
        time.sleep(0.5)  # the second caller arrives meanwhile and must wait, not convert or return early
        real(src, out)

    monkeypatch.setattr(paper_models, "_convert_gguf", slow)
    target, results = str(tmp_path / "m"), {}

    def call(key):
        path = converted_gguf(gguf_file, target)
        results[key] = (path, sorted(os.listdir(path)))

    first = threading.Thread(target=call, args=(1,))
    first.start()
    assert converting.wait(60)
    second = threading.Thread(target=call, args=(2,))
    second.start()
    first.join()
    second.join()
    assert len(calls) == 1
    assert results[1] == results[2] and results[1][0] == target
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(results[2][1])


def test_crash_leaves_nothing_and_a_later_call_succeeds(gguf_file, tmp_path, monkeypatch):
    def crash(src, out):
        os.makedirs(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{")  # a partial file
        raise RuntimeError("disk full")

    monkeypatch.setattr(paper_models, "_convert_gguf", crash)
    target = str(tmp_path / "m")
    with pytest.raises(RuntimeError, match="disk full"):
        converted_gguf(gguf_file, target)
    assert os.listdir(tmp_path) == [".m.lock"]  # no target, no staging folder
    monkeypatch.undo()
    assert converted_gguf(gguf_file, target) == target
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 2
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]


def test_missing_package_names_the_pip_line(monkeypatch):
    shortcut = Shortcut("c3a_no_such_package", "org/none", "pip install c3a-no-such-package==1.0", gguf="x.gguf")
    monkeypatch.setitem(paper_models.MODEL_SHORTCUTS, "nothing", shortcut)
    with pytest.raises(ValueError, match=r"'nothing'.*'c3a_no_such_package'.*" + re.escape(shortcut.install)):
        resolve_model("nothing")
    assert resolve_model("org/other-model") == "org/other-model"  # not a shortcut: as given


def test_shortcut_converts_from_the_package_without_importing_it(gguf_file, tmp_path, monkeypatch):
    site = tmp_path / "site"
    package = site / "c3a_fake_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the package must not be imported')\n")
    shutil.copy(gguf_file, package / "model.gguf")
    (site / "c3a_fake_smollm2-9.9.dist-info").mkdir()
    (site / "c3a_fake_smollm2-9.9.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: c3a-fake-smollm2\nVersion: 9.9\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("C3A_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(paper_models.MODEL_SHORTCUTS, "smollm2",
                        Shortcut("c3a_fake_smollm2", "org/tiny", "pip install c3a-fake-smollm2", gguf="model.gguf"))
    path = resolve_model("smollm2")
    assert path == str(tmp_path / "cache" / "models" / "smollm2-9.9")  # one folder per package version
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert "c3a_fake_smollm2" not in sys.modules
    assert resolve_model("smollm2") == path


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("C3A_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paper_models.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("C3A_CACHE")
    assert paper_models.cache_dir() == str(tmp_path / "xdg" / "c3a")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paper_models.cache_dir() == str(tmp_path / "home" / ".cache" / "c3a")


@pytest.fixture
def modes_under_umask(gguf_file, tmp_path):
    """{path relative to tmp_path: permission bits} of what a conversion under umask 0o027 creates."""
    old = os.umask(0o027)
    try:
        converted_gguf(gguf_file, str(tmp_path / "cache" / "m"))
    finally:
        os.umask(old)
    return {os.path.relpath(os.path.join(root, name), tmp_path): oct(os.stat(os.path.join(root, name)).st_mode & 0o777)
            for root, subdirs, names in os.walk(tmp_path) for name in subdirs + names}


def test_folders_and_files_respect_the_umask(modes_under_umask):
    """Weights included: safetensors itself writes 0600, which in a shared C3A_CACHE would let other users find
    config.json, skip converting, and fail to read the weights."""
    modes = modes_under_umask
    assert {"cache", "cache/.m.lock", "cache/m", "cache/m/config.json", "cache/m/model.safetensors"} <= set(modes)
    assert modes == {path: "0o750" if path in ("cache", "cache/m") else "0o640" for path in modes}


def test_a_dead_writers_staging_folder_is_removed(gguf_file, tmp_path):
    target = str(tmp_path / "m")
    os.makedirs(target + ".otherhost.999.partial")  # a converter killed mid-way: it held the lock, so it is dead
    assert converted_gguf(gguf_file, target) == target
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]
