"""LoRA export (:mod:`c3a.export`, `c3a export-lora`): the Eckart–Young optimum per layer, and PEFT loading the
export with the C³A model's outputs."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from c3a import C3AConfig, circulant_matrix, get_c3a_model
from c3a.cli import main
from c3a.export import low_rank_factors, to_lora
from c3a.layer import c3a_layers
from c3a.rank import adapter_ranks
from conftest import kernel_from_spectrum, low_rank_kernel, run_cli, tiny_roberta


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
    k = kernel_from_spectrum(torch.tensor([[[0.5]], [[3.0]], [[1.0]]], dtype=torch.complex128), 4)
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

    base = tiny_roberta()
    reference = copy.deepcopy(base)
    model = get_c3a_model(base, C3AConfig(block_size=8, target_modules=["query", "value"], bias=bias,
                                          modules_to_save=["classifier"]))
    with torch.no_grad():  # train-like changes everywhere the adapter saves something
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if "c3a_kernel" in name else 0.05))
    model.eval()
    model.save_pretrained(tmp_path / "c3a")
    out = run_cli("export-lora", str(tmp_path / "c3a"), "--rank", "32", "--out", str(tmp_path / "lora"), "--json")
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
    model = get_c3a_model(tiny_roberta(), C3AConfig(block_size=4, target_modules=["value"]))
    with torch.no_grad():
        layer = dict(c3a_layers(model))["roberta.encoder.layer.1.attention.self.value"]
        layer.c3a_kernel["default"].copy_(low_rank_kernel(8, 8, 4, [2, 1, 3]))  # rank 2 + 2·1 + 3 = 7
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
    model.save_pretrained(tmp_path / "c3a")
    model.save_pretrained(tmp_path / "other")  # another adapter where the export would go
    argv = ["export-lora", str(tmp_path / "c3a"), "--rank", "2", "--out", str(tmp_path / "other")]
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        main(argv)
    assert main(argv, one_line_errors=True) == 2  # as the `c3a` program: one line, exit status 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["peft_type"] == "C3A"  # untouched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter_ranks(tmp_path / "missing")
