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
