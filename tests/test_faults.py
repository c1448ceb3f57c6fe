"""Faults and bad input: a checkpoint folder is one save or a clear error; failed calls leave the model as it was.

Writers run in forked children (no interpreter start-up, so every round takes milliseconds) and are killed with
SIGKILL at random moments; only the timing is random: every round asserts the same invariant — loading gives
exactly one of the saves (its config and its outputs), or fails with an error saying the folder holds a mixed or
partial save.
"""

import copy
import json
import os
import random
import re
import signal
import stat
import time
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

import c3a
from c3a import C3AConfig, C3ALinear
from c3a.adapters import load_adapter
from c3a.export import to_lora
from c3a.cli import main as _main
from c3a.io import IncompleteCheckpointError, atomic_write_text, file_mode
from c3a.layer import c3a_layers

def main(argv):  # as the `c3a` program runs: user errors are one line on stderr and exit status 2
    return _main(argv, one_line_errors=True)


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks writer processes")
X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.lin2(torch.relu(self.lin1(x)))))


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


# Saves that differ in the block size (kernel shapes), only in modules_to_save, or only in the kernels' values.
SAVES = {
    "b2_head": dict(block_size=2, target_modules=["lin1"], modules_to_save=["head"]),
    "b2": dict(block_size=2, target_modules=["lin1"]),
    "b4": dict(block_size=4, target_modules=["lin1"]),
    "b2_other": dict(block_size=2, target_modules=["lin1"]),
}


def adapted(name: str):
    model = get_peft_model(tiny(), C3AConfig(**SAVES[name]))
    seed = 2 if name == "b2_other" else 1  # b2_head and b2 share kernels: they differ only in modules_to_save
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in c3a_layers(model):
            layer.c3a_kernel["default"].copy_(torch.randn(layer.c3a_kernel["default"].shape, generator=g))
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)  # the saved head differs from the base model's
    return model


@pytest.fixture(scope="module")
def saves():
    """name → (model ready to save, its outputs, its config as saved)."""
    out = {}
    for name in SAVES:
        model = adapted(name)
        with torch.no_grad():
            out[name] = (model, model(X), model.peft_config["default"])
    return out


def which_save(folder, saves) -> str:
    """Load ``folder``; the name of the save it is exactly, or IncompleteCheckpointError."""
    loaded = PeftModel.from_pretrained(tiny(), folder)
    with torch.no_grad():
        y = loaded(X)
    config = loaded.peft_config["default"]
    for name, (_, out, saved) in saves.items():
        if (config.block_size == saved.block_size and (config.modules_to_save or None) == (saved.modules_to_save or None)
                and torch.equal(y, out)):
            return name
    raise AssertionError(f"{folder} loaded silently as none of the saves")


def assert_one_save_or_clear_error(folder, saves, allowed):
    try:
        got = which_save(folder, saves)
    except IncompleteCheckpointError as e:
        assert "mixed or partial save" in str(e) or "partial or damaged save" in str(e)
        return "error"
    assert got in allowed
    return got


def fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run, never return into pytest
        code = 0
        try:
            work()
        except IncompleteCheckpointError:
            code = 3  # the losing writer of two
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def reap(pid) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def save_forever(models, folder):
    def work():
        while True:
            for model in models:
                model.save_pretrained(folder)
    return work


# -- 1. a checkpoint folder is always one save or a clear error --------------------------------------------


def test_kill_during_save_at_random_moments(tmp_path, saves):
    rng = random.Random(0)
    folder = tmp_path / "adapter"
    saves["b2_head"][0].save_pretrained(folder)
    seen = set()
    for _ in range(8):
        order = [saves[n][0] for n in rng.sample(list(SAVES), len(SAVES))]
        pid = fork(save_forever(order, folder))
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        assert reap(pid) == -signal.SIGKILL
        seen.add(assert_one_save_or_clear_error(folder, saves, SAVES))
    assert seen - {"error"}, "no round loaded a save"
    saves["b4"][0].save_pretrained(folder)  # the next save cleans up after the killed ones
    assert which_save(folder, saves) == "b4"
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_two_writers_into_one_folder(tmp_path, saves):
    rng = random.Random(1)
    for round_ in range(6):
        folder = tmp_path / f"adapter{round_}"
        a, b = rng.sample(list(SAVES), 2)

        def writer(name):
            def work():
                for _ in range(3):
                    saves[name][0].save_pretrained(folder)
            return work

        pids = [fork(writer(a)), fork(writer(b))]
        codes = [reap(pid) for pid in pids]
        assert set(codes) <= {0, 3}, codes  # 3: the loser was told another process wrote into the folder
        assert_one_save_or_clear_error(folder, saves, {a, b})


def test_mixed_saves_fail_clearly(tmp_path, saves):
    """The probe's mixes: a config for one block size beside kernels of another, and two saves that differ only
    in modules_to_save — each half from a complete save."""
    for config_of, weights_of in [("b2", "b4"), ("b2_head", "b2"), ("b2", "b2_head"), ("b2", "b2_other")]:
        a, b = tmp_path / f"{config_of}-{weights_of}", tmp_path / f"{weights_of}-only"
        saves[config_of][0].save_pretrained(a)
        saves[weights_of][0].save_pretrained(b)
        os.replace(b / "adapter_model.safetensors", a / "adapter_model.safetensors")
        model = tiny()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(IncompleteCheckpointError, match="mixed or partial save"):
            PeftModel.from_pretrained(model, a)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and len(before) == len(model.state_dict())
        with pytest.raises(IncompleteCheckpointError, match="mixed or partial save"):
            load_adapter(a)
        peft_model = get_peft_model(tiny(), C3AConfig(**SAVES["b2"]))
        with pytest.raises(IncompleteCheckpointError, match="mixed or partial save"):
            peft_model.load_adapter(a, "other")
        assert list(peft_model.peft_config) == ["default"]


def test_truncated_and_corrupted_files(tmp_path, saves, capsys):
    model = saves["b2_head"][0]
    weights_cases = {
        "cut": lambda data: data[: len(data) // 2],
        "empty": lambda data: b"",
        "flipped": lambda data: data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:],
    }
    for case, damage in weights_cases.items():
        folder = tmp_path / case
        model.save_pretrained(folder)
        path = folder / "adapter_model.safetensors"
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(IncompleteCheckpointError, match="partial"):
            PeftModel.from_pretrained(tiny(), folder)
        assert main(["rank", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "partial" in err and "Traceback" not in err
    folder = tmp_path / "config"
    model.save_pretrained(folder)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(IncompleteCheckpointError, match="not a valid adapter config"):
        C3AConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"^(Expecting|Unterminated|Invalid)"):  # PEFT parses the file itself first (to find peft_type): a JSONDecodeError
        PeftModel.from_pretrained(tiny(), folder)
    assert main(["rank", str(folder)]) == 2 and "not a valid adapter config" in capsys.readouterr().err
    (folder / "adapter_config.json").unlink()
    saves["b2"][0].save_pretrained(tmp_path / "b2")
    os.replace(tmp_path / "b2" / "adapter_config.json", folder / "adapter_config.json")
    (folder / "adapter_model.safetensors").unlink()  # a config whose weights never arrived
    with pytest.raises(IncompleteCheckpointError, match="missing"):
        PeftModel.from_pretrained(tiny(), folder)


def test_saved_config_still_loads_in_peft_reference(tmp_path, saves):
    saves["b2_head"][0].save_pretrained(tmp_path)
    assert "c3a_checkpoint" in json.loads((tmp_path / "adapter_config.json").read_text())
    with c3a.peft_reference(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = PeftModel.from_pretrained(tiny(), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(reference(X), saves["b2_head"][1], rtol=1e-4, atol=1e-5)
    assert any("c3a_checkpoint" in str(w.message) for w in caught)  # PEFT warns about the key and ignores it
    loaded = C3AConfig.from_pretrained(tmp_path)
    loaded.auto_mapping, loaded.inference_mode = None, False  # what save_pretrained sets in the file
    assert loaded == saves["b2_head"][2] and "c3a_checkpoint" not in loaded.to_dict()


def test_export_lora_killed_or_concurrent_is_one_export_or_absent(tmp_path, saves):
    exports = {r: to_lora(saves["b2_head"][0], r) for r in (1, 4)}
    rng = random.Random(2)
    folder = tmp_path / "lora"

    def state():
        config_path = folder / "adapter_config.json"
        if not config_path.exists():
            return None  # weights without a config: PEFT refuses to load it
        config, weights = json.loads(config_path.read_text()), load_file(folder / "adapter_model.safetensors")
        for r, export in exports.items():
            if config == export.config:
                assert weights.keys() == export.state_dict.keys()
                assert all(torch.equal(weights[k], v.contiguous()) for k, v in export.state_dict.items())
                return r
        raise AssertionError("a LoRA config of no export")

    for _ in range(5):
        pid = fork(lambda: [exports[r].save_pretrained(folder) for _ in range(100) for r in (1, 4)])
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        reap(pid)
        state()
        pids = [fork(lambda r=r: exports[r].save_pretrained(folder)) for r in (1, 4)]
        assert [reap(p) for p in pids] == [0, 0]
        assert state() in (1, 4)
    exports[1].save_pretrained(folder)
    assert state() == 1
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]  # no lock, no temporary


# -- 2. file modes ------------------------------------------------------------------------------------------


def test_files_honour_the_umask(tmp_path, saves):
    old = os.umask(0o022)
    try:
        assert file_mode() == 0o644
        saves["b2"][0].save_pretrained(tmp_path / "a")
        to_lora(saves["b2"][0], 2).save_pretrained(tmp_path / "lora")
        atomic_write_text(str(tmp_path / "results.json"), "{}")
        atomic_write_text(str(tmp_path / "results.json"), "{}")  # a re-save keeps 0644
        for path in [tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors",
                     tmp_path / "lora" / "adapter_config.json", tmp_path / "lora" / "adapter_model.safetensors",
                     tmp_path / "results.json"]:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
        os.umask(0o027)
        atomic_write_text(str(tmp_path / "results.json"), "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == 0o640
    finally:
        os.umask(old)


def test_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "table.md"
    pid = fork(lambda: None)
    reap(pid)  # a finished process: its leftovers are stale
    host = c3a.io._HOST
    dead = tmp_path / f".table.md.{host}.{pid}.abc123.tmp"
    live = tmp_path / f".table.md.{host}.{os.getpid()}.def456.tmp"
    old = tmp_path / ".table.md.k3j2h1.tmp"  # the older naming, without a pid
    for p in (dead, live, old):
        p.write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 2 * c3a.io.STALE_TMP_SECONDS,) * 2)
    atomic_write_text(str(target), "ok")
    assert target.read_text() == "ok" and not dead.exists() and not old.exists() and live.exists()


# -- 3. export-lora does not overwrite an adapter ---------------------------------------------------------


def test_export_lora_refuses_an_out_holding_an_adapter(tmp_path, saves, capsys):
    saves["b2"][0].save_pretrained(tmp_path / "A")
    saves["b4"][0].save_pretrained(tmp_path / "A" / "other")
    before = (tmp_path / "A" / "adapter_model.safetensors").read_bytes()
    assert main(["export-lora", str(tmp_path / "A" / "other"), "--rank", "2", "--out", str(tmp_path / "A")]) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert (tmp_path / "A" / "adapter_model.safetensors").read_bytes() == before
    assert main(["export-lora", str(tmp_path / "A" / "other"), "--rank", "2", "--out", str(tmp_path / "A"),
                 "--overwrite"]) == 0
    assert json.loads((tmp_path / "A" / "adapter_config.json").read_text())["peft_type"] == "LORA"


# -- 4. non-finite kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_kernels_are_named(tmp_path, saves, capsys, bad):
    model = copy.deepcopy(saves["b2"][0])
    layer = dict(c3a_layers(model))["lin1"]
    with torch.no_grad():
        layer.c3a_kernel["default"][0, 0, 0] = bad
    model.save_pretrained(tmp_path / "a")
    with pytest.warns(UserWarning, match=r"NaN/inf values in 1 layer\(s\): lin1"):
        PeftModel.from_pretrained(tiny(), tmp_path / "a")
    for argv in (["rank", str(tmp_path / "a")],
                 ["export-lora", str(tmp_path / "a"), "--rank", "2", "--out", str(tmp_path / "lora")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "lin1" in err and "NaN/inf" in err and err.count("\n") == 1
    assert not (tmp_path / "lora" / "adapter_config.json").exists()


# -- 5. kernels that are not real floating point ----------------------------------------------------------


def _with_kernel_dtype(folder, dtype, digest: bool):
    """Rewrite ``folder``'s lin1 kernel in ``dtype``; the config then records the digest of exactly these tensors
    (so that only the dtype is wrong), or none, as PEFT's reference implementation writes it."""
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.lin1.c3a_kernel"
    kernel = state[key]
    state[key] = {torch.int64: (3 * kernel).round().to(torch.int64), torch.bool: kernel > 0,
                  torch.complex64: kernel.to(torch.complex64) + 1j}[dtype]
    save_file(state, path)
    config = json.loads((folder / "adapter_config.json").read_text())
    if digest:
        config["c3a_checkpoint"] = c3a.io.checkpoint_record(state, path.name)
    else:
        del config["c3a_checkpoint"]
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("digest", [True, False])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_kernels_not_real_floating_point_are_refused(tmp_path, saves, dtype, digest, capsys):
    """Such kernels used to load cast to fp32 (a complex one losing its imaginary part): now a ValueError naming
    the tensor and its dtype, raised before any module is replaced (from_pretrained, load_adapter), or before
    the kernels are written (PEFT's set_peft_model_state_dict, which transformers' load_adapter uses)."""
    folder = tmp_path / "a"
    saves["b2"][0].save_pretrained(folder)
    _with_kernel_dtype(folder, dtype, digest)
    name = str(dtype).removeprefix("torch.")
    match = rf"base_model\.model\.lin1\.c3a_kernel is {name}\b"
    model = tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match + ".*the model is unchanged"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")
    host = copy.deepcopy(saves["b2"][0])
    before = snapshot(host)
    with pytest.raises(ValueError, match=match):
        host.load_adapter(folder, "x")
    assert_unchanged(host, before)
    assert list(host.peft_config) == ["default"]
    fresh = copy.deepcopy(saves["b2"][0])
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"lin1\.c3a_kernel\.default is " + name):
        set_peft_model_state_dict(fresh, load_file(folder / "adapter_model.safetensors"))
    assert_unchanged(fresh, before)
    # rank and export-lora read the kernels without PEFT: refused the same way, in one line, nothing written
    for argv in (["rank", str(folder)], ["export-lora", str(folder), "--rank", "2", "--out", str(tmp_path / "lora")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), err
        assert "must be real floating point" in err and "no rank or export computed" in err
    assert not (tmp_path / "lora").exists()


# -- 6. failed calls leave the model as it was --------------------------------------------------------------


def snapshot(model):
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: list(m.merged_adapters) for n, m in model.named_modules() if isinstance(m, C3ALinear)})


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert after[0].keys() == before[0].keys()
    for n, (value, grad) in before[0].items():
        assert torch.equal(after[0][n][0], value) and after[0][n][1] == grad, n


def test_failed_get_peft_model_and_from_pretrained_leave_the_model(tmp_path, saves):
    model = tiny()
    model.lin2.weight.requires_grad_(False)
    before = snapshot(model)
    for bad, match in ((dict(block_size=5, target_modules=["lin1"]), r"invalid block size for lin1 "),
                       (dict(block_size=2, target_modules=["nope"]), r"Target modules \{'nope'\} not found"),
                       (dict(block_size=2, target_modules=["lin1", "head"], block_size_pattern={"head": 3}),
                        r"invalid block size for head \(in_features=16, out_features=4\)")):
        with pytest.raises(ValueError, match=match):
            get_peft_model(model, C3AConfig(**bad))
        assert_unchanged(model, before)
    # an adapter of another model: the head has 4 outputs there, 3 here
    saves["b2_head"][0].save_pretrained(tmp_path / "a")
    other = tiny()
    other.head = nn.Linear(16, 3)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"head.weight is \[4, 16\] in the checkpoint but \[3, 16\] in the model"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    assert_unchanged(other, before)
    assert not hasattr(other, "peft_config")
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(model, tmp_path / "missing")
    assert_unchanged(model, (snapshot(model)[0], before[1], before[2]))


def test_failed_load_adapter_and_add_adapter_keep_merged_state(tmp_path, saves):
    model = copy.deepcopy(saves["b2"][0])
    model.merge_adapter()
    before = snapshot(model)
    other = tmp_path / "other"
    saves["b4"][0].save_pretrained(other)
    state = load_file(other / "adapter_model.safetensors")  # an adapter for a wider lin1: kernels do not fit
    state = {k: torch.zeros(8, 8, 4) if k.endswith("c3a_kernel") else v for k, v in state.items()}
    config = json.loads((other / "adapter_config.json").read_text())
    del config["c3a_checkpoint"]  # PEFT's reference writes none: the shapes are what is left to check
    (other / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, other / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not fit this model"):
        model.load_adapter(other, "x")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    for bad, match in ((C3AConfig(block_size=5, target_modules=["lin1"]), r"invalid block size for lin1 "),
                       (C3AConfig(block_size=2, target_modules=["lin1"], modules_to_save=["lin1"]),
                        "No modules were targeted for adaptation")):  # lin1 is kept whole: nothing left to adapt
        with pytest.raises(ValueError, match=match):
            model.add_adapter("x", bad)
        assert_unchanged(model, before)
        assert list(model.peft_config) == ["default"]


# -- 8. adapter names never escape the save folder -------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "/tmp/evil", "", "..", "a\\b"])
def test_adapter_names_with_path_parts_are_refused(tmp_path, name):
    model = get_peft_model(tiny(), C3AConfig(block_size=2, target_modules=["lin1"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.add_adapter(name, C3AConfig(block_size=2, target_modules=["lin2"]))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="invalid adapter name"):
        get_peft_model(tiny(), C3AConfig(block_size=2, target_modules=["lin1"]), adapter_name=name)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_selected_adapters_are_checked_before_writing(tmp_path):
    model = get_peft_model(tiny(), C3AConfig(block_size=2, target_modules=["lin1"]))
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["default", "nope"])
    assert not (tmp_path / "out").exists()


# -- 8. the command line: one line per user error, tracebacks for bugs or with --debug ----------------------


def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["params", "--model", "roberta-base", "--method", "vera", "--rank", "0"], "--rank: 0 must be a positive integer"),
        (["params", "--model", "roberta-base", "--method", "c3a", "--block-size", "x"], "'x' is not a positive integer or 'auto'"),
        (["export-lora", "a", "--rank", "-1", "--out", "b"], "--rank: -1 must be a positive integer"),
        (["rank", "--nope"], "the following arguments are required: adapter"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match="^2$") as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    os.mkdir("runs")
    for source in ["./missing", "runs/missing", str(tmp_path / "missing"), "a/b/c", "../missing"]:
        assert main(["rank", source]) == 2  # a path: never looked up on the hub
        err = capsys.readouterr().err
        assert err == f"c3a rank: error: adapter folder {source} does not exist\n", err
    (tmp_path / "file").write_text("x")
    assert main(["rank", "file"]) == 2 and "is a file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "rank", "./missing"])
    monkeypatch.setattr("sys.argv", ["c3a", "rank", "./missing"])
    assert _main() == 2  # the `c3a` program itself
    assert capsys.readouterr().err == "c3a rank: error: adapter folder ./missing does not exist\n"


def test_cli_data_errors_name_file_and_line(tmp_path, capsys, monkeypatch):
    import c3a.rank

    def bad_data(*_, **__):
        raise ValueError(f"{tmp_path}/train.jsonl:3: expected a JSON object")

    monkeypatch.setattr(c3a.rank, "adapter_ranks", bad_data)
    assert main(["rank", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"c3a rank: error: {tmp_path}/train.jsonl:3: expected a JSON object\n"

    def bug(*_, **__):
        raise KeyError("a bug")

    monkeypatch.setattr(c3a.rank, "adapter_ranks", bug)
    with pytest.raises(KeyError, match="a bug"):  # not a user error: the traceback stays
        main(["rank", str(tmp_path)])


def test_outputs_apart_from_inputs(tmp_path):
    from c3a.io import check_outputs_apart

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "link").symlink_to(adapter / "adapter_model.safetensors")
    inputs = {"ADAPTER": str(adapter), "--data": "org/hub-dataset"}
    for out in [adapter, adapter / "adapter_model.safetensors", tmp_path / "link", adapter / "sub" / "x.png"]:
        with pytest.raises(ValueError, match=r"--out .* would write over the input ADAPTER"):
            check_outputs_apart({"--out": str(out)}, inputs)
    check_outputs_apart({"--out": str(tmp_path / "export"), "--plot": None}, inputs)  # apart: fine
    check_outputs_apart({"--out": str(tmp_path / "adapter-2")}, inputs)  # a shared name prefix is not a folder
    check_outputs_apart({"--out": str(tmp_path)}, inputs)  # written into: the adapter beside its files is kept


def test_commands_refuse_to_write_over_their_inputs(tmp_path):
    """rank --plot into the adapter, export-lora over the adapter it reads (even with --overwrite), a suite or a
    run whose --out lies in its data: one line, exit 2, nothing written."""
    import subprocess
    import sys

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"not read: refused before")
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    runs = [
        ["rank", str(adapter), "--plot", str(weights)],
        ["export-lora", str(adapter), "--rank", "4", "--out", str(adapter), "--overwrite"],
        ["glue", "--task", "sst2", "--method", "lora", "--model", "m", "--data-dir", str(data), "--out", str(data / "sst2")],
        ["glue-suite", "--model", "m", "--data-dir", str(data), "--out", str(data / "grid")],
        ["sft-suite", "--model", "m", "--tasks", "sql", "--task-options", f"sql:data={data}", "--out", str(data / "grid")],
    ]
    for argv in runs:
        done = subprocess.run([sys.executable, "-m", "c3a.cli", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "would write over the input" in done.stderr, (argv, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert weights.read_bytes() == b"not read: refused before" and sorted(p.name for p in tmp_path.rglob("*")) == [
        "adapter", "adapter_model.safetensors", "data", "sst2"]
