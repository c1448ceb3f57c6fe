"""Hot-swapping a loaded C³A adapter: new kernels from a saved folder copied into the ones in place.

PEFT's ``peft.utils.hotswap.hotswap_adapter`` supports LoRA only; this is its C³A counterpart, with the same
signature. Modules and parameters stay the same objects, their values change: so only an adapter with the same
layers and block sizes can be swapped in.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from .layer import c3a_layers

# Settings that change the output beyond the kernels: they must agree, since only kernels are swapped.
_SAME_SETTINGS = {"exact_delta": False, "bias": "none", "modules_to_save": None, "trainable_token_indices": None}


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: Optional[str] = None, **kwargs: Any
) -> None:
    """Replace the kernels of the loaded C³A adapter ``adapter_name`` of ``model`` (a ``PeftModel``, possibly
    ``torch.compile``'d) with those saved in ``model_name_or_path`` (a folder or hub id; ``subfolder=`` as PEFT's),
    in place: afterwards the model computes what a fresh ``PeftModel.from_pretrained`` of that folder computes.

    The saved adapter must adapt the same layers with the same block sizes and agree on ``exact_delta``, ``bias``
    and ``modules_to_save`` (only kernels are swapped); the adapter must not be merged. Otherwise a ``ValueError``
    says what differs, and nothing is changed. Kernels keep their device and dtype; ``torch_device`` is accepted
    for PEFT's signature.
    """
    from .adapters import KERNEL_SUFFIX, PREFIX, adapter_kernels, load_adapter  # the reading side: not loaded by ``import c3a``

    subfolder = kwargs.pop("subfolder", None)
    if kwargs:
        raise TypeError(f"hotswap_adapter: unsupported argument(s) {', '.join(sorted(kwargs))}")
    source = os.path.join(str(model_name_or_path), subfolder) if subfolder else model_name_or_path
    peft_model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    configs = getattr(peft_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model's adapters are {sorted(configs)}")
    current = configs[adapter_name].to_dict()
    if str(getattr(current.get("peft_type"), "value", current.get("peft_type"))) != "C3A":
        raise ValueError(f"adapter {adapter_name!r} is not a C3A adapter")
    layers = {name: layer for name, layer in c3a_layers(peft_model) if adapter_name in layer.c3a_kernel}
    # merged, or unmerged only while adapters are disabled (merged back on enable)
    merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters
              or (layer._merged_before_disable and adapter_name in layer._merged_before_disable[0])]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {len(merged)} layer(s) ({merged[0]}, ...): unmerge it "
                         "before swapping, or the merged weights would keep the old kernels")

    config, state = load_adapter(source)  # checked: one complete save of a C3A adapter
    problems = [f"{key} is {config.get(key, default)!r} there but {current.get(key, default)!r} here"
                for key, default in _SAME_SETTINGS.items()
                if _setting(config.get(key, default)) != _setting(current.get(key, default))]
    kernels = adapter_kernels(state)  # NaN/inf kernels are refused, naming the layers
    others = sorted(k for k in state if k.removeprefix(PREFIX).removesuffix(KERNEL_SUFFIX) not in kernels)
    if others:
        problems.append(f"it holds other weights than kernels ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    for name in sorted(set(layers) | set(kernels)):
        if name not in kernels:
            problems.append(f"it has no kernel for {name}")
        elif name not in layers:
            problems.append(f"it adapts {name}, which adapter {adapter_name!r} does not")
        elif not kernels[name].is_floating_point():
            problems.append(f"{name}'s kernel is {str(kernels[name].dtype).removeprefix('torch.')}, not real floating point")
        elif kernels[name].shape != layers[name].c3a_kernel[adapter_name].shape:
            have, new = layers[name].c3a_kernel[adapter_name].shape, kernels[name].shape
            problems.append(f"{name} has block size {new[-1]} there (kernel {list(new)}) but {have[-1]} here "
                            f"(kernel {list(have)})")
    if problems:
        raise ValueError(f"the adapter in {source} cannot replace adapter {adapter_name!r} in place (nothing was "
                         "changed): " + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else ""))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.c3a_kernel[adapter_name].copy_(kernels[name])


def _setting(value: Any) -> Any:
    """A config value as comparable: lists and sets alike (JSON keeps sets as lists), none and empty alike."""
    if isinstance(value, (list, tuple, set)):
        return sorted(value) or None
    return value
