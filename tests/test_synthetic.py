import json
import math

import pytest
import torch

from c3a.cli import main
from c3a.experiments import synthetic as S
from c3a.functional import circulant_matrix


def test_data_shapes_balanced_and_seeded():
    x, y = S.make_data(0)
    assert x.shape == (240, 2) and x.dtype == torch.float32
    assert y.shape == (240,)
    assert torch.bincount(y).tolist() == [30] * 8
    x_again, y_again = S.make_data(0)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.allclose(x, S.make_data(1)[0])
    # Each class sits around its own centre on the unit circle.
    for c in range(8):
        angle = 2 * math.pi * c / 8
        centre = torch.tensor([math.cos(angle), math.sin(angle)])
        assert torch.linalg.vector_norm(x[y == c].mean(0) - centre) < 0.25


def test_equal_budgets_for_lora_and_c3a():
    assert S.middle_weights("lora") == S.middle_weights("c3a") == 256
    assert S.middle_weights("linear") == 128 * 128
    for method in S.METHODS:
        model = S.MLP(method)
        assert sum(p.numel() for p in model.middle.parameters()) == S.middle_weights(method)
    with pytest.raises(ValueError, match="unknown method"):
        S.middle_layer("vera")


def test_c3a_middle_layer_is_its_dense_circulant_matrix():
    torch.manual_seed(0)
    layer = S.BlockCirculant(128, 64)
    assert layer.kernel.shape == (2, 2, 64)
    assert layer.kernel.abs().max() <= 1 / math.sqrt(128)  # nn.Linear's default init range
    layer.double()
    x = torch.randn(5, 128, dtype=torch.float64)
    y, y_dense = layer(x), x @ circulant_matrix(layer.kernel).T
    torch.testing.assert_close(y, y_dense)
    grad = torch.autograd.grad(y.square().sum(), layer.kernel)[0]
    grad_dense = torch.autograd.grad(y_dense.square().sum(), layer.kernel)[0]
    torch.testing.assert_close(grad, grad_dense)


def test_rank_of_middle_layers():
    torch.manual_seed(0)
    lora = S.middle_layer("lora")
    assert torch.linalg.matrix_rank(lora[1].weight @ lora[0].weight) == 1
    c3a = S.middle_layer("c3a")
    assert torch.linalg.matrix_rank(circulant_matrix(c3a.kernel.detach().double())) == 128


def _runs(lora_accs):
    linear = [1.0] * len(lora_accs)
    return [
        {"method": m, "seed": s, "final_train_accuracy": a}
        for m, accs in (("linear", linear), ("lora", lora_accs), ("c3a", linear))
        for s, a in enumerate(accs)
    ]


def test_table_reports_when_lora_catches_up():
    table = S.markdown_table(_runs([0.8, 0.98]))
    assert "| lora | 256 | 0.890 ± 0.127 | 0.800 | 0.980 |" in table
    assert "seed(s) 1." in table
    assert "Note" not in S.markdown_table(_runs([0.8, 0.9]))


def test_cli_short_run_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--steps", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "synthetic"
    assert sorted(r["method"] for r in results["runs"]) == sorted(S.METHODS)
    for run in results["runs"]:
        assert run["seed"] == 0
        assert run["trainable_params"] == S.middle_weights(run["method"])
        assert len(run["train_accuracy"]) == 6  # before the first update, then after each of 5
        shares = {round(k / 240, 4) for k in range(241)}  # correct points out of 240, as recorded (4 digits)
        assert all(a in shares for a in run["train_accuracy"]), run["train_accuracy"]
        assert run["final_train_accuracy"] == run["train_accuracy"][-1]
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in S.METHODS)
    assert table in capsys.readouterr().out
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same numbers.
    rerun = S.train("c3a", 0, 5, "cpu")
    assert rerun == next(r for r in results["runs"] if r["method"] == "c3a")


def test_cli_rejects_bad_input(tmp_path, capsys):
    for option in ("--seeds", "--steps"):
        with pytest.raises(SystemExit, match="^2$") as exit:
            main(["demo", "--out", str(tmp_path), option, "0"])
        assert exit.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
