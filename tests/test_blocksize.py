"""Block-size advice (:mod:`c3a.blocksize`) and ``block_size="auto"`` resolved to integers that PEFT loads."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from c3a import C3AConfig, get_c3a_model
from c3a.blocksize import choose_block_sizes, suggest_block_size
from c3a.layer import c3a_layers


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
