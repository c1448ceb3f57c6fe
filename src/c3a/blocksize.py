"""Block-size advice: which block size ``b`` gives each adapted layer the most parameters within an allowance.

This is what ``C3AConfig(block_size="auto", budget=..., lora_rank=...)`` resolves with when the tuner injects an
adapter, and what ``c3a params`` and the ``peft-c3a`` baseline use to match c3a's choices. Which block sizes a
layer accepts at all (:func:`~c3a.layer.common_divisors`) is the layer's rule; this module only chooses among them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from torch import nn

from .config import C3AConfig
from .layer import common_divisors, targeted_shapes

__all__ = [
    "DEFAULT_LORA_RANK", "BlockSizeChoice", "as_block_size_config", "choose_block_sizes", "common_divisors",
    "suggest_block_size", "target_shapes",
]

DEFAULT_LORA_RANK = 8  # block_size="auto" with no budget matches LoRA r=8, the paper's usual baseline


@dataclass(frozen=True)
class BlockSizeChoice:
    block_size: int
    params: int  # d_in·d_out / block_size
    allowance: float  # this layer's parameter allowance
    reason: str


def choose_block_sizes(
    shapes: Mapping[str, tuple[int, int]], budget: Optional[int] = None, lora_rank: Optional[int] = None
) -> dict[str, BlockSizeChoice]:
    """Per layer ``{name: (d_in, d_out)}``, the smallest common divisor ``b`` whose ``d_in·d_out/b`` fits.

    A smaller ``b`` means more parameters, so this is the most expressive C³A within the allowance:

    * ``lora_rank=r``: each layer may have what LoRA rank ``r`` gives it, ``r·(d_in + d_out)``;
    * ``budget=N``: a total for all layers, shared in proportion to ``d_in + d_out`` (as LoRA shares it),
      i.e. the fractional rank ``N / Σ(d_in + d_out)``; the total then never exceeds ``N``;
    * neither: ``lora_rank=8`` (:data:`DEFAULT_LORA_RANK`).

    Raises ``ValueError`` when a layer cannot fit even at its largest block size ``gcd(d_in, d_out)``.
    """
    if budget is not None and lora_rank is not None:
        raise ValueError("give at most one of budget and lora_rank")
    for label, value in (("budget", budget), ("lora_rank", lora_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not shapes:
        return {}
    if budget is None:
        lora_rank = lora_rank or DEFAULT_LORA_RANK
    total = sum(d_in + d_out for d_in, d_out in shapes.values())
    chosen = {}
    for name, (d_in, d_out) in shapes.items():
        # The allowance as an exact fraction num/den, so that d_in·d_out/b ≤ num/den is tested in integers.
        if budget is None:
            num, den = lora_rank * (d_in + d_out), 1
            why = f"LoRA r={lora_rank}'s r·(d_in+d_out) = {num:,}"
        else:
            num, den = budget * (d_in + d_out), total
            why = f"this layer's share {num / den:,.0f} of the budget {budget:,} (split by d_in+d_out)"
        fits = [b for b in common_divisors(d_in, d_out) if d_in * d_out * den <= num * b]
        if not fits:
            largest = math.gcd(d_in, d_out)
            raise ValueError(
                f"{name} ({d_in}→{d_out}) needs at least {d_in * d_out // largest:,} parameters (block size "
                f"{largest}), more than {why}"
            )
        b = fits[0]
        smaller = [d for d in common_divisors(d_in, d_out) if d < b]
        reason = f"smallest common divisor of {d_in} and {d_out} with d_in·d_out/b = {d_in * d_out // b:,} ≤ {why}"
        if smaller:
            reason += f"; b={smaller[-1]} would need {d_in * d_out // smaller[-1]:,}"
        chosen[name] = BlockSizeChoice(b, d_in * d_out // b, num / den, reason)
    return chosen


def as_block_size_config(sizes: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """Per-layer block sizes as PEFT's C3A config spells them: ``(block_size, block_size_pattern)``, the most
    common size the default and the others by full module name (which PEFT's pattern matching takes too)."""
    default = Counter(sizes.values()).most_common(1)[0][0]
    return default, {name: b for name, b in sizes.items() if b != default}


def target_shapes(
    model: nn.Module, target_modules: Optional[Union[list[str], str]] = None
) -> dict[str, tuple[int, int]]:
    """``{name: (d_in, d_out)}`` of the layers C³A would adapt (PEFT's matching; its default targets when ``None``)."""
    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(f"no default target modules for model type {model_type!r}; name the layers to adapt")
        target_modules = list(defaults[model_type])
    config = C3AConfig(target_modules=target_modules)
    shapes = targeted_shapes(model, config)
    if not shapes:
        raise ValueError(f"target_modules {config.target_modules!r} match no module of the model")
    return shapes


def suggest_block_size(
    model: nn.Module,
    target_modules: Optional[Union[list[str], str]] = None,
    *,
    budget: Optional[int] = None,
    lora_rank: Optional[int] = None,
) -> dict[str, int]:
    """``{layer name: block size}`` for ``model``'s targets (PEFT's defaults when ``None``); the rule is
    :func:`choose_block_sizes`'s. ``C3AConfig(block_size="auto", budget=..., lora_rank=...)`` uses the same."""
    shapes = target_shapes(model, target_modules)
    return {name: c.block_size for name, c in choose_block_sizes(shapes, budget, lora_rank).items()}
