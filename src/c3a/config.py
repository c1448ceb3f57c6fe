"""`C3AConfig`: PEFT's ``C3AConfig`` plus ``block_size="auto"`` and ``exclude_modules``; its file is written
atomically and records a digest of the weights saved with it (see :mod:`c3a.io`)."""

from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Union

import peft
import torch
from peft.utils import CONFIG_NAME

from .io import (
    CHECKPOINT_KEY, IncompleteCheckpointError, atomic_write_text, file_mode, read_weights, tensor_digest, weights_files,
)

INIT_CHOICES = ("xavier_uniform", "kaiming_uniform", "gaussian")
BIAS_CHOICES = ("none", "all", "c3a_only")
# Fields PEFT's reference config lacks: written only when set, so saved configs stay loadable there.
OWN_FIELDS = ("budget", "lora_rank", "exclude_modules", "exact_delta")


def block_size_key_pattern(key: Any) -> re.Pattern:
    """The regex with which a ``block_size_pattern`` key matches module names, ``.*\\.key$`` (as PEFT's C3A
    resolves keys); a key that makes no valid pattern is a ValueError naming the field and the key."""
    if not isinstance(key, str):
        raise ValueError(f"block_size_pattern keys must be module names or regex patterns (strings), got {key!r}")
    try:
        return re.compile(rf".*\.{key}$")
    except re.error as e:
        raise ValueError(f"block_size_pattern key {key!r} is not a valid regular expression: {e}") from None


@dataclass
class C3AConfig(peft.C3AConfig):
    """Configuration of a C³A adapter: everything :class:`peft.C3AConfig` has, and

    Args:
        block_size: circulant block size ``b`` (divides ``in_features`` and ``out_features`` of every target;
            ``d_in·d_out/b`` trainable weights per layer), or ``"auto"``: per layer, the smallest block size
            within ``budget`` / ``lora_rank``'s parameter count (:func:`c3a.blocksize.choose_block_sizes`).
            ``"auto"`` is resolved to integers when the adapter is injected (``block_size`` becomes the most
            common choice, ``block_size_pattern`` lists the others by full module name), so saved configs load
            in PEFT's reference implementation too.
        budget: total trainable kernel weights over the adapted layers, for ``block_size="auto"``.
        lora_rank: LoRA rank ``r`` whose budget ``r·(d_in + d_out)`` per layer ``block_size="auto"`` matches.
        exclude_modules: module names (or a regex) never adapted, as in PEFT's LoRA.
        exact_delta: in half precision (bf16/fp16 weights or autocast), compute the delta in fp32 and add it
            before the one rounding of the output (:func:`c3a.functional.add_block_circular_conv`); slower.
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
    exact_delta: bool = field(
        default=False,
        metadata={"help": "Half precision: compute the delta in fp32 and round the output once (slower; see docs/performance.md)."},
    )
    # The digest of the weights saved beside the config file (c3a.io.checkpoint_record): read from the file, kept
    # off the dataclass fields (a loaded config equals the one saved), checked when the adapter is loaded.
    c3a_checkpoint: InitVar[Optional[dict]] = None

    def __post_init__(self, c3a_checkpoint: Optional[dict] = None) -> None:
        super().__post_init__()
        if c3a_checkpoint is not None:
            self._checkpoint_record = c3a_checkpoint
        if self.init_weights == "zeros":
            self.init_weights = True
        if self.init_weights not in (True, False, *INIT_CHOICES):
            raise ValueError(f"init_weights must be one of {INIT_CHOICES}, 'zeros' or True/False, got {self.init_weights!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        self.block_size_pattern = dict(self.block_size_pattern or {})
        for key in self.block_size_pattern:
            block_size_key_pattern(key)
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
            if d.get(name) in (None, False):
                d.pop(name, None)
        return d

    # -- saving: atomic, with the digest of what this process saved beside it ------------------------------

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (atomically: complete or absent) as PEFT does, plus the digest of the
        weights this process just saved into the same folder, when it did (``PeftModel.save_pretrained``).

        If the weights file there is not what this process wrote (another process saved into the folder at the
        same time), :class:`~c3a.io.IncompleteCheckpointError` is raised and no config is written.
        """
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")  # PEFT's
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output = {k: list(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        saved = _take_saved_state(self)
        if saved is not None and weights_files(save_directory):
            output[CHECKPOINT_KEY] = _record_for_saved_weights(save_directory, saved)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(output, indent=2, sort_keys=True))

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        try:
            return super().from_json_file(path_json_file, **kwargs)
        except ValueError as e:  # JSONDecodeError / UnicodeDecodeError: cut or damaged
            raise IncompleteCheckpointError(
                f"{path_json_file} is not a valid adapter config ({e}): a partial or damaged save"
            ) from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """PEFT's loader; the config remembers where it came from, so that when PEFT goes on to load that folder's
        weights (``PeftModel.from_pretrained``, ``load_adapter``) the tuner checks them — digest, readability,
        shapes against the model — before any module of the model is replaced."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, C3AConfig):
            hub = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
            config._load_source = (str(pretrained_model_name_or_path), subfolder, hub)
        return config


# Between PEFT's get_peft_model_state_dict (the tuner's _get_adapter_state_dict hook notes the dict it returns,
# which PEFT then completes with modules_to_save and embeddings) and the config's save_pretrained that follows it.
_SAVED: dict[int, tuple] = {}


def note_saved_state(
    config: Any, adapter_name: str, state: Mapping[str, torch.Tensor], key_of: Callable[[str, str], str]
) -> None:
    """Remember ``state`` (model keys; ``key_of(key, adapter_name)`` gives the saved key) as what is being saved
    for ``config``; its ``save_pretrained`` records the digest."""
    ident = id(config)
    _SAVED[ident] = (weakref.ref(config, lambda _ref: _SAVED.pop(ident, None)), adapter_name, state, key_of)


def _take_saved_state(config: Any) -> Optional[dict[str, torch.Tensor]]:
    entry = _SAVED.pop(id(config), None)
    if entry is None or entry[0]() is not config:
        return None
    _, adapter_name, state, key_of = entry
    return {key_of(k, adapter_name): v for k, v in state.items()}


def _record_for_saved_weights(folder: str, saved: Mapping[str, torch.Tensor]) -> dict:
    digest = tensor_digest(saved)
    present = weights_files(folder)
    ours = []
    for name in present:
        try:
            if tensor_digest(read_weights(os.path.join(folder, name))) == digest:
                ours.append(name)
        except IncompleteCheckpointError:
            continue  # being written by another process
    if not ours:
        raise IncompleteCheckpointError(
            f"{folder}: the adapter weights there are not the ones this save just wrote (another process is "
            f"saving into the same folder?); {CONFIG_NAME} was not written. Save again, one writer at a time"
        )
    name = ours[0]
    for other in present[: present.index(name)]:  # an older save's safetensors file would be loaded instead of ours
        os.remove(os.path.join(folder, other))
    try:
        os.chmod(os.path.join(folder, name), file_mode())  # safetensors creates its files 0600
    except OSError:
        pass
    return {"weights": name, "sha256": digest, "tensors": len(saved)}
