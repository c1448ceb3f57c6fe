import contextlib
import copy
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, LlamaConfig, LlamaModel, RobertaConfig, RobertaForSequenceClassification

from c3a import C3AConfig, circulant_matrix, get_c3a_model
from c3a.layer import c3a_layers
from c3a.analysis import (
    adapter_ranks,
    choose_block_sizes,
    count_parameters,
    delta_rank,
    delta_singular_values,
    low_rank_factors,
    suggest_block_size,
    to_lora,
)
from c3a.cli import main

SHAPES = [(1, 1, 1), (1, 1, 7), (2, 3, 5), (3, 2, 4), (4, 4, 8), (1, 3, 6), (3, 5, 1), (2, 2, 16)]


def _run(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def _kernel_from_spectrum(spectrum: torch.Tensor, b: int) -> torch.Tensor:
    """Real kernel (m, n, b) whose real-FFT blocks are ``spectrum`` (F, m, n)."""
    return torch.fft.irfft(spectrum.permute(1, 2, 0), n=b, dim=-1)


def _low_rank_kernel(m, n, b, ranks, seed=0) -> torch.Tensor:
    """A kernel whose frequency block f (real FFT) has rank ranks[f]; DC and Nyquist blocks stay real."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for f, r in enumerate(ranks):
        real = f == 0 or (b % 2 == 0 and f == b // 2)
        dtype = torch.float64 if real else torch.complex128
        blocks.append(torch.randn(m, r, dtype=dtype, generator=g) @ torch.randn(r, n, dtype=dtype, generator=g))
    return _kernel_from_spectrum(torch.stack([x.to(torch.complex128) for x in blocks]), b)


def _deficient_kernels():
    """Deliberately rank-deficient kernels, with their rank worked out by hand."""
    k1 = _low_rank_kernel(3, 4, 8, [1, 2, 0, 3, 1])  # f=1..3 count twice: 1 + 2·(2+0+3) + 1
    k2 = _low_rank_kernel(4, 2, 7, [2, 1, 0, 2])  # odd b: 2 + 2·(1+0+2)
    k3 = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])  # FFT (4, 0, 0, 0)
    k4 = torch.tensor([[[1.0, 0.0, -1.0, 0.0]]])  # FFT (0, 2, 0, 2)
    k5 = torch.tensor([[[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]]])  # only the Nyquist frequency
    k6 = torch.zeros(2, 3, 4)
    return [(k1, 12), (k2, 8), (k3, 1), (k4, 2), (k5, 1), (k6, 0)]


# -- spectrum and rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_values_match_dense(shape, dtype):
    k = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    s = delta_singular_values(k)
    dense = torch.linalg.svdvals(circulant_matrix(k))
    assert s.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(s, dense, rtol=tol, atol=tol * float(dense[0]))
    assert delta_rank(k) == int(torch.linalg.matrix_rank(circulant_matrix(k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_of_deficient_kernels(dtype):
    for k, expected in _deficient_kernels():
        k = k.to(dtype)
        assert delta_rank(k) == expected
        assert delta_rank(k) == int(torch.linalg.matrix_rank(circulant_matrix(k)))
        zero_frequency = torch.fft.rfft(k.double(), dim=-1)
        zero_frequency[..., 1] = 0  # wipe one (paired) frequency block: rank drops by twice its rank
        k0 = torch.fft.irfft(zero_frequency, n=k.shape[-1], dim=-1).to(dtype)
        assert delta_rank(k0) == int(torch.linalg.matrix_rank(circulant_matrix(k0)))


def _tiny_roberta(seed=0, labels=2):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, num_labels=labels)
    return RobertaForSequenceClassification(config).eval()


def test_rank_command_on_rank_deficient_adapter(tmp_path):
    model = get_c3a_model(_tiny_roberta(), C3AConfig(block_size=8, target_modules=["query", "value"]))
    ranks = [1, 2, 0, 1, 3]  # 4×4 blocks at b=8: rank 1 + 2·(2+0+1) + 3 = 10 of 32
    expected = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(c3a_layers(model)):
            if i == 0:
                layer.c3a_kernel["default"].copy_(_low_rank_kernel(4, 4, 8, ranks))
            k = layer.c3a_kernel["default"]
            expected[name] = int(torch.linalg.matrix_rank(circulant_matrix(k)))
    assert list(expected.values()) == [10, 32, 32, 32]
    model.save_pretrained(tmp_path / "adapter")
    report = json.loads(_run("rank", str(tmp_path / "adapter"), "--json", "--plot", str(tmp_path / "s.png")))
    assert {layer["name"]: layer["rank"] for layer in report["layers"]} == expected
    assert [layer["full_rank"] for layer in report["layers"]] == [False, True, True, True]
    assert report["full_rank_fraction"] == 0.75
    assert all(layer["shape"] == [32, 32] and layer["block_size"] == 8 for layer in report["layers"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    table = _run("rank", str(tmp_path / "adapter"))
    assert "no (max 32)" in table and "3 of 4 layers" in table
    # Singular values reported are those of the actual delta C/d_in.
    layer = adapter_ranks(model)[0]
    dense = model.model.get_submodule(layer.name).get_delta_weight("default").double()
    torch.testing.assert_close(layer.singular_values, torch.linalg.svdvals(dense), rtol=1e-5, atol=1e-9)


def test_rank_reads_peft_adapters_and_sub_folders(tmp_path):
    from peft import C3AConfig as PeftC3AConfig
    from peft import get_peft_model

    peft_model = get_peft_model(_tiny_roberta(), PeftC3AConfig(block_size=4, target_modules=["value"]))
    peft_model.add_adapter("other", PeftC3AConfig(block_size=16, target_modules=["query"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "c3a_kernel" in name:
                p.copy_(torch.randn_like(p))
                if ".0." in name and "default" in name:
                    p.copy_(p[..., :1].expand_as(p))  # constant along b: only the DC block, rank 8 of 32
    peft_model.save_pretrained(tmp_path)
    ranks = [layer.rank for layer in adapter_ranks(tmp_path)]
    assert ranks == [8, 32]
    other = adapter_ranks(tmp_path / "other")
    assert [(layer.block_size, layer.rank) for layer in other] == [(16, 32), (16, 32)]
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="sub-folders: other"):
        adapter_ranks(tmp_path)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_of_lora_adapters_matches_dense(tmp_path, use_rslora):
    """LoRA adapters (for comparison): rank and singular values of scaling·B·A from the factors, as the dense
    matrix gives them — including a layer whose factors are deliberately rank-deficient and an alpha_pattern."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=use_rslora,
                        alpha_pattern={"layer.1.attention.self.value": 2})  # fmt: skip
    model = get_peft_model(_tiny_roberta(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
                if "layer.0.attention.self.query.lora_A" in name:
                    p[2:] = p[:2]  # two repeated rows: rank 2 of r = 4
    model.save_pretrained(tmp_path / "lora")
    layers = adapter_ranks(tmp_path / "lora")
    assert [layer.rank for layer in layers] == [2, 4, 4, 4]
    for layer in layers:
        module = model.base_model.model.get_submodule(layer.name)
        dense = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double() * module.scaling["default"]
        assert layer.rank == int(torch.linalg.matrix_rank(dense)) and layer.lora_rank == 4 and layer.block_size is None
        torch.testing.assert_close(layer.singular_values, torch.linalg.svdvals(dense)[:4], rtol=1e-9, atol=1e-12)
    in_memory = adapter_ranks(model)  # the PeftModel itself: the same answer
    assert [(x.name, x.rank) for x in in_memory] == [(x.name, x.rank) for x in layers]
    for x, y in zip(in_memory, layers):
        torch.testing.assert_close(x.singular_values, y.singular_values, rtol=0, atol=0)


def test_rank_command_over_several_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    c3a_model = get_c3a_model(_tiny_roberta(), C3AConfig(block_size=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for _, layer in c3a_layers(c3a_model):
            layer.c3a_kernel["default"].normal_()
    c3a_model.save_pretrained(tmp_path / "c3a")
    lora = get_peft_model(_tiny_roberta(), LoraConfig(r=2, target_modules=["query"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora.save_pretrained(tmp_path / "lora")
    out = _run("rank", str(tmp_path / "c3a"), str(tmp_path / "lora"), "--plot", str(tmp_path / "s.png"))
    assert "LoRA r=2" in out and "full rank: 4 of 4 layers" in out and "full rank: 0 of 2 layers" in out
    assert "all 2 adapters: full rank: 4 of 6 layers (66.7%); rank 2 of 32: 2, rank 32 of 32: 4" in out
    report = json.loads(_run("rank", str(tmp_path / "c3a"), str(tmp_path / "lora"), "--json"))
    assert report["full_rank_fraction"] == pytest.approx(4 / 6)
    assert report["rank_counts"] == [{"rank": 2, "max": 32, "layers": 2}, {"rank": 32, "max": 32, "layers": 4}]
    assert report["adapters"][str(tmp_path / "lora")]["layers"][0]["lora_rank"] == 2
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


# -- LoRA export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 2, 4), (2, 2, 6), (1, 1, 8)])
def test_low_rank_factors_reach_the_dense_optimum(shape):
    k = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m, n, b = shape
    dense = circulant_matrix(k) / (n * b)
    s = torch.linalg.svdvals(dense)
    errors = []
    for r in range(1, min(m, n) * b + 2):
        f = low_rank_factors(k, r, scale=1 / (n * b))
        assert f.A.shape == (r, n * b) and f.B.shape == (m * b, r)
        error = float(torch.linalg.norm(dense - f.B.double() @ f.A.double()) / torch.linalg.norm(dense))
        optimum = float((s[r:].square().sum() / s.square().sum()).sqrt())
        assert error == pytest.approx(optimum, abs=1e-6)
        assert f.relative_error == pytest.approx(optimum, abs=1e-12)
        errors.append(error)
    assert all(a >= b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6


def test_low_rank_cut_inside_a_conjugate_pair():
    # One 1×1 block, b = 4, spectrum (0.5, 3, 1): singular values 3, 3 (f = 1 and 3), 1, 0.5.
    k = _kernel_from_spectrum(torch.tensor([[[0.5]], [[3.0]], [[1.0]]], dtype=torch.complex128), 4)
    dense = circulant_matrix(k)
    for r, tail in [(1, [3, 1, 0.5]), (2, [1, 0.5]), (3, [0.5])]:
        f = low_rank_factors(k, r)
        approx = f.B.double() @ f.A.double()
        assert int(torch.linalg.matrix_rank(approx)) == r
        expected = (torch.tensor(tail).square().sum() / torch.tensor([3, 3, 1, 0.5]).square().sum()).sqrt()
        assert float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense)) == pytest.approx(float(expected))


@pytest.mark.parametrize("bias", ["none", "all", "c3a_only"])
def test_export_lora_loads_in_peft_and_reproduces_outputs(tmp_path, bias):
    from peft import PeftModel

    base = _tiny_roberta()
    reference = copy.deepcopy(base)
    model = get_c3a_model(base, C3AConfig(block_size=8, target_modules=["query", "value"], bias=bias,
                                          modules_to_save=["classifier"]))
    with torch.no_grad():  # train-like changes everywhere the adapter saves something
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if "c3a_kernel" in name else 0.05))
    model.eval()
    model.save_pretrained(tmp_path / "c3a")
    out = _run("export-lora", str(tmp_path / "c3a"), "--rank", "32", "--out", str(tmp_path / "lora"), "--json")
    report = json.loads(out)
    assert all(layer["exact"] and layer["relative_error"] < 1e-6 for layer in report["layers"])

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 32, 32)
    assert config["bias"] == {"none": "none", "all": "all", "c3a_only": "lora_only"}[bias]
    state = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    key = "base_model.model.roberta.encoder.layer.0.attention.self.query"
    assert state[f"{key}.lora_A.weight"].shape == (32, 32) and state[f"{key}.lora_B.weight"].shape == (32, 32)

    lora = PeftModel.from_pretrained(reference, tmp_path / "lora").eval()
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_export_lora_of_gpt2_conv1d_layers(tiny_gpt2, token_ids, tmp_path):
    from peft import PeftModel

    reference = copy.deepcopy(tiny_gpt2)
    model = get_c3a_model(tiny_gpt2, C3AConfig(block_size=8, target_modules=["c_attn"], init_weights="gaussian"))
    to_lora(model.eval(), 32).save_pretrained(tmp_path)  # c_attn is 32→96: rank ≤ 32
    lora = PeftModel.from_pretrained(reference, tmp_path).eval()  # PEFT sets fan_in_fan_out for Conv1D itself
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=token_ids).logits, model(input_ids=token_ids).logits,
                                   rtol=0, atol=1e-5)


def test_export_lora_error_decreases_to_exact(tmp_path, capsys):
    model = get_c3a_model(_tiny_roberta(), C3AConfig(block_size=4, target_modules=["value"]))
    with torch.no_grad():
        layer = dict(c3a_layers(model))["roberta.encoder.layer.1.attention.self.value"]
        layer.c3a_kernel["default"].copy_(_low_rank_kernel(8, 8, 4, [2, 1, 3]))  # rank 2 + 2·1 + 3 = 7
    dense = layer.get_delta_weight("default").detach().double()
    s = torch.linalg.svdvals(dense)
    previous = float("inf")
    for r in (1, 2, 4, 6, 7, 9):
        export = to_lora(model, r)
        entry = next(e for e in export.layers if e["name"].endswith("layer.1.attention.self.value"))
        prefix = "base_model.model.roberta.encoder.layer.1.attention.self.value"
        B, A = (export.state_dict[f"{prefix}.lora_{x}.weight"].double() for x in "BA")
        approx = B @ A
        error = float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense))
        optimum = float((s[r:].square().sum() / s.square().sum()).sqrt())
        assert entry["rank"] == 7 and entry["exact"] == (r >= 7)
        assert error == pytest.approx(optimum, abs=1e-6) and entry["relative_error"] == pytest.approx(optimum, abs=1e-6)
        assert error <= previous
        previous = error
    assert previous < 1e-6
    model.save_pretrained(tmp_path)
    argv = ["export-lora", str(tmp_path), "--rank", "2", "--out", str(tmp_path)]
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        main(argv)
    assert main(argv, one_line_errors=True) == 2  # as the `c3a` program: one line, exit status 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "C3A"  # untouched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter_ranks(tmp_path / "missing")


# -- block-size advice ------------------------------------------------------------------------------------


def _tiny_llama():
    torch.manual_seed(0)
    # q_proj 48→48, v_proj 48→24 (2 of 4 heads for keys/values)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaModel(config).eval()


def test_choose_block_sizes_rules():
    shapes = {"q": (48, 48), "v": (48, 24)}
    by_rank = choose_block_sizes(shapes, lora_rank=2)
    # q: 2304/b ≤ 2·96 → b ≥ 12; v: 1152/b ≤ 2·72 → b ≥ 8 (divisors of 24)
    assert {n: c.block_size for n, c in by_rank.items()} == {"q": 12, "v": 8}
    assert "b=8 would need 288" in by_rank["q"].reason
    by_budget = choose_block_sizes(shapes, budget=240)  # shares 240·96/168 ≈ 137 and 240·72/168 ≈ 103
    assert {n: c.block_size for n, c in by_budget.items()} == {"q": 24, "v": 12}
    assert sum(c.params for c in by_budget.values()) <= 240
    assert {n: c.block_size for n, c in choose_block_sizes(shapes).items()} == {"q": 3, "v": 2}  # LoRA r=8
    with pytest.raises(ValueError, match="needs at least"):
        choose_block_sizes(shapes, budget=50)
    with pytest.raises(ValueError, match="at most one"):
        choose_block_sizes(shapes, budget=100, lora_rank=2)


def test_auto_block_size_model_saves_concrete_ints_that_peft_loads(tmp_path):
    from peft import PeftModel

    base = _tiny_llama()
    reference = copy.deepcopy(base)
    assert suggest_block_size(base, ["q_proj", "v_proj"], lora_rank=2) == {
        f"layers.{i}.self_attn.{p}": b for i in range(2) for p, b in (("q_proj", 12), ("v_proj", 8))}
    model = get_c3a_model(base, C3AConfig(block_size="auto", lora_rank=2, target_modules=["q_proj", "v_proj"],
                                          init_weights="gaussian"))
    assert {name: layer.block_size["default"] for name, layer in c3a_layers(model)} == {
        f"layers.{i}.self_attn.{p}": b for i in range(2) for p, b in (("q_proj", 12), ("v_proj", 8))}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["block_size"], int) and "lora_rank" not in saved
    assert all(isinstance(b, int) for b in saved["block_size_pattern"].values())
    peft_model = PeftModel.from_pretrained(reference, tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).last_hidden_state,
                                   model(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-5)


# -- parameter counts -------------------------------------------------------------------------------------

PAPER_COUNTS = [
    ("roberta-base", "c3a", {"block_size": 768}, 18_432),
    ("roberta-base", "c3a", {"block_size": 128}, 110_592),
    ("roberta-base", "lora", {"rank": 8}, 294_912),
    ("roberta-base", "vera", {"rank": 1024}, 43_008),
    ("roberta-base", "bitfit", {}, 102_144),
    ("roberta-large", "lora", {"rank": 8}, 786_432),
    ("roberta-large", "vera", {"rank": 256}, 61_440),
    ("roberta-large", "bitfit", {}, 271_360),
    ("llama2-7b", "lora", {"rank": 32}, 16_777_216),
    ("llama2-7b", "c3a", {"block_size": 128}, 8_388_608),
    ("llama2-13b", "c3a", {"block_size": 128}, 16_384_000),
    ("llama3-8b", "c3a", {"block_size": 128}, 5_242_880),
    ("llama3-8b", "lora", {"rank": 32}, 13_631_488),
    ("vit-base", "c3a", {"block_size": 64}, 221_184),
    ("vit-large", "c3a", {"block_size": 64}, 786_432),
]


@pytest.mark.parametrize("model,method,kwargs,expected", PAPER_COUNTS)
def test_paper_parameter_counts(model, method, kwargs, expected):
    report = count_parameters(model, method, **kwargs)
    assert report.trainable_params == expected
    # Per adapted layer, the counted parameters are Table 1's space term evaluated at (d1, d2).
    assert all(layer["params"] == layer["space"] for layer in report.layers)
    if method != "bitfit":  # BitFit also trains biases outside the adapted layers
        assert sum(layer["params"] for layer in report.layers) == expected


def test_counts_on_meta_equal_counts_on_a_real_model(tmp_path):
    from c3a.experiments.methods import MethodOptions, build_method, trainable_parameters

    config = _tiny_roberta().config
    config.save_pretrained(tmp_path)
    for method in ("c3a", "lora", "vera", "boft", "ia3", "bitfit", "full"):
        real = build_method(AutoModel.from_config(config), method,
                            MethodOptions(targets=["query", "value"], block_size=8, rank=4))
        report = count_parameters(str(tmp_path), method, block_size=8, rank=4)
        assert report.trainable_params == trainable_parameters(real, ["pooler"]), method
    assert "shapes" in count_parameters(str(tmp_path), "boft").counted


def test_params_command_explains_auto_block_size():
    text = _run("params", "--model", "roberta-base", "--method", "c3a", "--block-size", "auto", "--rank", "8")
    assert "trainable parameters: 294,912" in text  # the same budget as LoRA r=8
    assert "768×768: b=48" in text and "b=32 would need 18,432" in text
    assert "(d1+d2)·log2(b) + d1·d2/b" in text
    report = json.loads(_run("params", "--model", "llama3-8b", "--method", "c3a", "--block-size", "128", "--json"))
    assert report["trainable_params"] == 5_242_880
    v = next(layer for layer in report["layers"] if layer["name"].endswith("v_proj"))
    assert (v["d1"], v["d2"], v["params"], v["space"]) == (1024, 4096, 32_768, 32_768)
    assert v["time"] == pytest.approx((1024 + 4096) * 7 + 32_768)


def test_auto_block_size_follows_the_registry_rank():
    text = _run("params", "--model", "roberta-base", "--method", "c3a", "--block-size", "auto", "--rank", "16")
    assert "trainable parameters: 589,824" in text  # LoRA r=16: 24 layers x 16 x (768 + 768)
    assert "768×768: b=24" in text
