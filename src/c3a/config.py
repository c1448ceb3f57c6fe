"""`C3AConfig`: PEFT's ``C3AConfig`` plus ``block_size="auto"`` and ``exclude_modules``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import peft

INIT_CHOICES = ("xavier_uniform", "kaiming_uniform", "gaussian")
BIAS_CHOICES = ("none", "all", "c3a_only")
# Fields PEFT's reference config lacks: written only when set, so saved configs stay loadable there.
OWN_FIELDS = ("budget", "lora_rank", "exclude_modules")


@dataclass
class C3AConfig(peft.C3AConfig):
    """Configuration of a C³A adapter: everything :class:`peft.C3AConfig` has, and

    Args:
        block_size: circulant block size ``b`` (divides ``in_features`` and ``out_features`` of every target;
            ``d_in·d_out/b`` trainable weights per layer), or ``"auto"``: per layer, the smallest block size
            within ``budget`` / ``lora_rank``'s parameter count (:func:`c3a.analysis.choose_block_sizes`).
            ``"auto"`` is resolved to integers when the adapter is injected (``block_size`` becomes the most
            common choice, ``block_size_pattern`` lists the others by full module name), so saved configs load
            in PEFT's reference implementation too.
        budget: total trainable kernel weights over the adapted layers, for ``block_size="auto"``.
        lora_rank: LoRA rank ``r`` whose budget ``r·(d_in + d_out)`` per layer ``block_size="auto"`` matches.
        exclude_modules: module names (or a regex) never adapted, as in PEFT's LoRA.
        init_weights: as PEFT's (``"xavier_uniform"`` default, ``"kaiming_uniform"``, ``"gaussian"``, ``True``
            for zeros: an exact no-op at the start), plus ``"zeros"`` as a readable alias of ``True``.
    """

    block_size: Union[int, Literal["auto"]] = field(
        default=256, metadata={"help": "Circulant block size, or 'auto' (see budget / lora_rank)."}
    )
    budget: Optional[int] = field(
        default=None, metadata={"help": "Total trainable parameters of the adapted layers for block_size='auto'."}
    )
    lora_rank: Optional[int] = field(
        default=None, metadata={"help": "For block_size='auto': match LoRA rank r's budget r*(d_in + d_out) per layer."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights == "zeros":
            self.init_weights = True
        if self.init_weights not in (True, False, *INIT_CHOICES):
            raise ValueError(f"init_weights must be one of {INIT_CHOICES}, 'zeros' or True/False, got {self.init_weights!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        self.block_size_pattern = dict(self.block_size_pattern or {})
        for key, b in [("block_size", self.block_size), *self.block_size_pattern.items()]:
            if b == "auto" and key == "block_size":
                continue
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"block size for {key!r} must be a positive integer, got {b!r}")
        if self.budget is not None and self.lora_rank is not None:
            raise ValueError("give at most one of budget and lora_rank")
        for name in ("budget", "lora_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name in OWN_FIELDS:
            if d.get(name) is None:
                d.pop(name, None)
        return d
