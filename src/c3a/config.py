"""`C3AConfig`: what to adapt and how, stored as PEFT's ``adapter_config.json`` (``"peft_type": "C3A"``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
INIT_CHOICES = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")
BIAS_CHOICES = ("none", "all", "c3a_only")


@dataclass
class C3AConfig:
    """Configuration of a C³A adapter; field names and meanings follow ``peft.C3AConfig``.

    Args:
        block_size: circulant block size ``b``; must divide ``in_features`` and ``out_features`` of every
            target. Trainable weights per layer: ``d_in·d_out/b``. ``"auto"`` lets
            :func:`c3a.analysis.suggest_block_size` choose per layer (see ``budget``/``lora_rank``).
        block_size_pattern: ``{name or regex: block_size}`` overriding ``block_size`` for modules whose
            name ends with (``.``) the key, as in PEFT.
        target_modules: module names (a module matches when its full name equals or ends with ``.name``),
            or a regex string matched against the full name.
        init_weights: ``"xavier_uniform"`` (default, as the reference), ``"kaiming_uniform"``,
            ``"gaussian"``, or ``"zeros"`` / ``True`` for an exact no-op at the start. ``False`` means
            xavier_uniform (PEFT's convention).
        bias: which biases train with the adapter: ``"none"``, ``"all"`` or ``"c3a_only"``.
        modules_to_save: extra modules (e.g. a classifier head) trained and saved with the adapter.
        layers_to_transform: layer indices to adapt (only with a list ``target_modules``).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ...) used with
            ``layers_to_transform``; the common names are tried when unset.
        budget, lora_rank: parameter targets for ``block_size="auto"``: a total trainable budget for the
            adapted layers, or LoRA rank ``r``'s budget ``r·(d_in + d_out)`` per layer.
    """

    block_size: Union[int, str] = 256
    block_size_pattern: dict = field(default_factory=dict)
    target_modules: Optional[Union[list, str]] = None
    init_weights: Union[bool, str] = "xavier_uniform"
    bias: str = "none"
    modules_to_save: Optional[list] = None
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    budget: Optional[int] = None
    lora_rank: Optional[int] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.block_size_pattern = dict(self.block_size_pattern or {})
        for key, b in [("block_size", self.block_size), *self.block_size_pattern.items()]:
            if b == "auto" and key == "block_size":
                continue
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"block size for {key!r} must be a positive integer, got {b!r}")
        if self.init_weights not in (True, False, *INIT_CHOICES):
            raise ValueError(f"init_weights must be one of {INIT_CHOICES} or True/False, got {self.init_weights!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform needs a list of target_modules, not a regex string")
        if self.budget is not None and self.lora_rank is not None:
            raise ValueError("give at most one of budget and lora_rank")

    @property
    def peft_type(self) -> str:
        return "C3A"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        for key in ("budget", "lora_rank"):  # ours only: keep files PEFT-clean when unused
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "C3AConfig":
        peft_type = d.get("peft_type", "C3A")
        if peft_type != "C3A":
            raise ValueError(f"not a C3A adapter config: peft_type is {peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        # PEFT writes bookkeeping keys (peft_version, auto_mapping, ...) that have no meaning here.
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_pretrained(self, save_directory: str) -> None:
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(cls, path: str) -> "C3AConfig":
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        with open(file) as f:
            return cls.from_dict(json.load(f))
