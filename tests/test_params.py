"""Parameter counts of the registry's methods with Table 1's terms (:mod:`c3a.experiments.params`, `c3a params`)."""

import json

import pytest
from transformers import AutoModel

from c3a.experiments.params import count_parameters
from conftest import run_cli, tiny_roberta

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

    config = tiny_roberta().config
    config.save_pretrained(tmp_path)
    for method in ("c3a", "lora", "vera", "boft", "ia3", "bitfit", "full"):
        real = build_method(AutoModel.from_config(config), method,
                            MethodOptions(targets=["query", "value"], block_size=8, rank=4))
        report = count_parameters(str(tmp_path), method, block_size=8, rank=4)
        assert report.trainable_params == trainable_parameters(real, ["pooler"]), method
    assert "shapes" in count_parameters(str(tmp_path), "boft").counted


def test_params_command_explains_auto_block_size():
    text = run_cli("params", "--model", "roberta-base", "--method", "c3a", "--block-size", "auto", "--rank", "8")
    assert "trainable parameters: 294,912" in text  # the same budget as LoRA r=8
    assert "768×768: b=48" in text and "b=32 would need 18,432" in text
    assert "(d1+d2)·log2(b) + d1·d2/b" in text
    report = json.loads(run_cli("params", "--model", "llama3-8b", "--method", "c3a", "--block-size", "128", "--json"))
    assert report["trainable_params"] == 5_242_880
    v = next(layer for layer in report["layers"] if layer["name"].endswith("v_proj"))
    assert (v["d1"], v["d2"], v["params"], v["space"]) == (1024, 4096, 32_768, 32_768)
    assert v["time"] == pytest.approx((1024 + 4096) * 7 + 32_768)


def test_auto_block_size_follows_the_registry_rank():
    text = run_cli("params", "--model", "roberta-base", "--method", "c3a", "--block-size", "auto", "--rank", "16")
    assert "trainable parameters: 589,824" in text  # LoRA r=16: 24 layers x 16 x (768 + 768)
    assert "768×768: b=24" in text


def test_a_new_method_is_one_registry_entry(tmp_path, monkeypatch):
    """Builder, defaults, Table-1 terms and suite row in one Method: `c3a params`, `c3a glue` and the glue suite's
    default rows all take it from there."""
    import argparse
    import dataclasses

    from c3a.experiments import glue
    from c3a.experiments.methods import METHODS, Complexity, Method, build_method

    paper_rows = ("full", "bitfit", "ia3", "lora", "vera", "boft", "c3a")
    assert glue._experiment().default_methods == paper_rows  # Table 2's rows, from the registry

    def build_wide(model, opts):
        return build_method(model, "lora", dataclasses.replace(opts, rank=2 * opts.rank))

    wide = Method("lora-wide", build_wide, 1e-3, 0.0, "LoRA at twice the rank",
                  complexity=Complexity("2r·(d1+d2)", "2r·(d1+d2)", "a test", lambda d1, d2, k: 2 * k["r"] * (d1 + d2),
                                        lambda d1, d2, k: 2 * k["r"] * (d1 + d2), options=("rank",)),
                  default_rows=(("glue", 8),))
    monkeypatch.setitem(METHODS, "lora-wide", wide)
    tiny_roberta().config.save_pretrained(tmp_path)
    lora = json.loads(run_cli("params", "--model", str(tmp_path), "--method", "lora", "--rank", "4", "--json"))
    report = json.loads(run_cli("params", "--model", str(tmp_path), "--method", "lora-wide", "--rank", "4", "--json"))
    assert report["trainable_params"] == 2 * lora["trainable_params"] > 0
    assert report["options"] == {"targets": ["query", "value"], "rank": 4}
    assert report["complexity"]["space"] == "2r·(d1+d2)" and all(x["params"] == x["space"] for x in report["layers"])
    assert glue._experiment().default_methods == (*paper_rows, "lora-wide")
    parser = argparse.ArgumentParser()
    glue.add_glue_arguments(parser)
    assert parser.parse_args(["--task", "sst2", "--method", "lora-wide", "--model", "m"]).method == "lora-wide"
