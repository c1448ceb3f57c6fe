"""Exact rank and spectrum of ΔW (:mod:`c3a.rank`) and `c3a rank`, against dense SVDs of small adapters."""

import json
import os

import pytest
import torch

from c3a import C3AConfig, circulant_matrix, get_c3a_model
from c3a.layer import c3a_layers
from c3a.rank import adapter_ranks, delta_rank, delta_singular_values
from conftest import low_rank_kernel, run_cli, tiny_roberta

SHAPES = [(1, 1, 1), (1, 1, 7), (2, 3, 5), (3, 2, 4), (4, 4, 8), (1, 3, 6), (3, 5, 1), (2, 2, 16)]


def _deficient_kernels():
    """Deliberately rank-deficient kernels, with their rank worked out by hand."""
    k1 = low_rank_kernel(3, 4, 8, [1, 2, 0, 3, 1])  # f=1..3 count twice: 1 + 2·(2+0+3) + 1
    k2 = low_rank_kernel(4, 2, 7, [2, 1, 0, 2])  # odd b: 2 + 2·(1+0+2)
    k3 = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])  # FFT (4, 0, 0, 0)
    k4 = torch.tensor([[[1.0, 0.0, -1.0, 0.0]]])  # FFT (0, 2, 0, 2)
    k5 = torch.tensor([[[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]]])  # only the Nyquist frequency
    k6 = torch.zeros(2, 3, 4)
    return [(k1, 12), (k2, 8), (k3, 1), (k4, 2), (k5, 1), (k6, 0)]


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


def test_rank_command_on_rank_deficient_adapter(tmp_path):
    model = get_c3a_model(tiny_roberta(), C3AConfig(block_size=8, target_modules=["query", "value"]))
    ranks = [1, 2, 0, 1, 3]  # 4×4 blocks at b=8: rank 1 + 2·(2+0+1) + 3 = 10 of 32
    expected = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(c3a_layers(model)):
            if i == 0:
                layer.c3a_kernel["default"].copy_(low_rank_kernel(4, 4, 8, ranks))
            k = layer.c3a_kernel["default"]
            expected[name] = int(torch.linalg.matrix_rank(circulant_matrix(k)))
    assert list(expected.values()) == [10, 32, 32, 32]
    model.save_pretrained(tmp_path / "adapter")
    report = json.loads(run_cli("rank", str(tmp_path / "adapter"), "--json", "--plot", str(tmp_path / "s.png")))
    assert {layer["name"]: layer["rank"] for layer in report["layers"]} == expected
    assert [layer["full_rank"] for layer in report["layers"]] == [False, True, True, True]
    assert report["full_rank_fraction"] == 0.75
    assert all(layer["shape"] == [32, 32] and layer["block_size"] == 8 for layer in report["layers"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    table = run_cli("rank", str(tmp_path / "adapter"))
    assert "no (max 32)" in table and "3 of 4 layers" in table
    # Singular values reported are those of the actual delta C/d_in.
    layer = adapter_ranks(model)[0]
    dense = model.model.get_submodule(layer.name).get_delta_weight("default").double()
    torch.testing.assert_close(layer.singular_values, torch.linalg.svdvals(dense), rtol=1e-5, atol=1e-9)


def test_rank_reads_peft_adapters_and_sub_folders(tmp_path):
    from peft import C3AConfig as PeftC3AConfig
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_roberta(), PeftC3AConfig(block_size=4, target_modules=["value"]))
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
    model = get_peft_model(tiny_roberta(), config)
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

    c3a_model = get_c3a_model(tiny_roberta(), C3AConfig(block_size=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for _, layer in c3a_layers(c3a_model):
            layer.c3a_kernel["default"].normal_()
    c3a_model.save_pretrained(tmp_path / "c3a")
    lora = get_peft_model(tiny_roberta(), LoraConfig(r=2, target_modules=["query"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora.save_pretrained(tmp_path / "lora")
    out = run_cli("rank", str(tmp_path / "c3a"), str(tmp_path / "lora"), "--plot", str(tmp_path / "s.png"))
    assert "LoRA r=2" in out and "full rank: 4 of 4 layers" in out and "full rank: 0 of 2 layers" in out
    assert "all 2 adapters: full rank: 4 of 6 layers (66.7%); rank 2 of 32: 2, rank 32 of 32: 4" in out
    report = json.loads(run_cli("rank", str(tmp_path / "c3a"), str(tmp_path / "lora"), "--json"))
    assert report["full_rank_fraction"] == pytest.approx(4 / 6)
    assert report["rank_counts"] == [{"rank": 2, "max": 32, "layers": 2}, {"rank": 32, "max": 32, "layers": 4}]
    assert report["adapters"][str(tmp_path / "lora")]["layers"][0]["lora_rank"] == 2
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_and_export_tables_list_layers_in_natural_order(tmp_path):
    """``layers.2`` before ``layers.10``, in the tables and the JSON of both commands (the files sort them as text)."""
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(12))
    model = get_c3a_model(net, C3AConfig(block_size=2, target_modules=r"layers\.\d+"))
    model.save_pretrained(tmp_path / "a")
    names = [f"layers.{i}" for i in range(12)]
    assert [layer["name"] for layer in json.loads(run_cli("rank", str(tmp_path / "a"), "--json"))["layers"]] == names
    table = run_cli("rank", str(tmp_path / "a"))
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| layers.")] == names
    exported = json.loads(run_cli("export-lora", str(tmp_path / "a"), "--rank", "2", "--out", str(tmp_path / "l"), "--json"))
    assert [layer["name"] for layer in exported["layers"]] == names


def test_rank_refuses_a_dora_adapter(tmp_path, capsys):
    """DoRA's ΔW depends on the base weight, which an adapter folder does not hold: refused in one line."""
    from peft import LoraConfig, get_peft_model

    from c3a.cli import main

    get_peft_model(tiny_roberta(), LoraConfig(r=2, target_modules=["query"], use_dora=True)).save_pretrained(tmp_path / "d")
    assert main(["rank", str(tmp_path / "d")], one_line_errors=True) == 2
    err = capsys.readouterr().err
    assert err == ("c3a rank: error: a DoRA adapter's ΔW depends on the base weight, which the adapter does not hold\n")
    get_peft_model(tiny_roberta(), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "l")
    assert "full rank: 0 of 2 layers" in run_cli("rank", str(tmp_path / "l"))  # the same adapter without DoRA: read
