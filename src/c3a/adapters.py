"""Reading adapters: the config and the state dict of a saved adapter (a folder, a hub id) or of a ``PeftModel``,
and the C³A kernels in it. Checkpoints are verified as :mod:`c3a.io` describes (one save, or an error)."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from torch import nn

from .config import C3AConfig
from .hub import check_hub, looks_like_path
from .io import (
    CHECKPOINT_KEY,
    KERNEL_SUFFIX,
    IncompleteCheckpointError,
    check_kernel_dtypes,
    read_weights,
    verify_checkpoint,
)

PREFIX = "base_model.model."  # PEFT's key prefix in adapter files


def peft_type(config: Mapping[str, Any]) -> str:
    """An adapter config's ``peft_type`` as a string (a ``PeftType`` in memory, a string on disk; C3A if absent)."""
    value = config.get("peft_type", "C3A")
    return str(getattr(value, "value", value))


def _check_type(config: dict, where: str, peft_types: tuple[str, ...]) -> None:
    kind = peft_type(config)
    if kind not in peft_types:
        raise ValueError(f"{where} is a {kind} adapter, not {' or '.join(peft_types)}")


def load_adapter(
    source: Any, adapter_name: str = "default", peft_types: tuple[str, ...] = ("C3A",)
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter config as a dict, state dict with PEFT's key names)`` of a C³A adapter (or of another of
    ``peft_types``).

    ``source`` is a ``peft.PeftModel`` with C³A adapters (its adapter ``adapter_name``), a folder written by
    ``save_pretrained`` (a non-default adapter's sub-folder may be passed directly), or a hub id.
    """
    if isinstance(source, nn.Module):
        from peft import get_peft_model_state_dict

        configs = getattr(source, "peft_config", {})
        if adapter_name not in configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(configs)}")
        _check_type(configs[adapter_name].to_dict(), f"adapter {adapter_name!r}", peft_types)
        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
        if not state.keys() or next(iter(state)).startswith(PREFIX):  # a PeftModel; a bare tuned model lacks the prefix
            return configs[adapter_name].to_dict(), state
        return configs[adapter_name].to_dict(), {PREFIX + k: v for k, v in state.items()}
    path = _adapter_folder(str(source))
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = f"; adapters in its sub-folders: {', '.join(subs)} (pass one of them)" if subs else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}{hint}")
    config = C3AConfig.from_json_file(os.path.join(path, CONFIG_NAME))  # a cut file: IncompleteCheckpointError
    if not isinstance(config, dict):
        raise IncompleteCheckpointError(f"{os.path.join(path, CONFIG_NAME)} is not an adapter config (not a JSON object)")
    _check_type(config, path, peft_types)
    if not any(os.path.isfile(os.path.join(path, w)) for w in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} in {path}")
    checked = verify_checkpoint(path, config.pop(CHECKPOINT_KEY, None))  # one save, or a mixed/partial error
    if checked is not None:
        return config, read_weights(checked)
    try:
        return config, load_peft_weights(path, device="cpu")
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:
        raise IncompleteCheckpointError(f"{path}: the adapter weights cannot be read ({type(e).__name__}: {e}): a "
                                        "partial or damaged save") from None


def _adapter_folder(source: str) -> str:
    """``source`` as a local folder, fetching a hub id's adapter files."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise NotADirectoryError(f"{source} is a file; pass the adapter folder")
    if looks_like_path(source):
        raise FileNotFoundError(f"adapter folder {source} does not exist")
    check_hub(source, "adapter", "adapter")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=[CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME])
    except Exception as e:  # not a folder here, and not fetchable as a hub id
        raise FileNotFoundError(f"{source} is not an adapter folder, nor an adapter on the hub: {e}") from None


def natural_key(name: str) -> tuple:
    """Sort key that orders module names as people count: ``layer.2`` before ``layer.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def adapter_kernels(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: kernel}`` from an adapter state dict (keys ``base_model.model.<module>.c3a_kernel``);
    ``ValueError`` naming the tensors that are not real floating point and the layers whose kernels hold NaN/inf
    values."""
    kernels = {k.removeprefix(PREFIX)[: -len(KERNEL_SUFFIX)]: v for k, v in state.items() if k.endswith(KERNEL_SUFFIX)}
    if not kernels:
        raise ValueError(f"no C3A kernels (keys ending in {KERNEL_SUFFIX!r}) in the adapter")
    check_kernel_dtypes({k: v.dtype for k, v in state.items() if k.endswith(KERNEL_SUFFIX)}, "the adapter",
                        "no rank or export computed")
    bad = [name for name, k in kernels.items() if not torch.isfinite(k).all()]
    if bad:
        raise ValueError(f"the adapter's kernels hold NaN/inf values in {len(bad)} layer(s): {', '.join(bad)}")
    return dict(sorted(kernels.items(), key=lambda item: natural_key(item[0])))
