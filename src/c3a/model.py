"""`C3AModel`: inject C³A adapters into a model, switch/merge them, save and load in PEFT's format."""

from __future__ import annotations

import dataclasses
import os
import re
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, C3AConfig
from .io import atomic_path
from .layer import C3ALinear, block_size_problem, linear_features

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's key prefix: keeps checkpoints interchangeable with peft.PeftModel
COMMON_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _is_target(name: str, config: C3AConfig) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not any(_name_matches(name, t) for t in targets):
        return False
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or COMMON_LAYER_PATTERNS
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1)) in config.layers_to_transform
    return False


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(
            f"target_modules is not set and there is no default for model type {model_type!r}: "
            "name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj']"
        )
    return list(defaults[model_type])


def _pattern_block_size(name: str, config: C3AConfig) -> Optional[int]:
    for key, b in config.block_size_pattern.items():
        if name == key or re.match(rf".*\.{key}$", name):
            return b
    return None


class C3AModel(nn.Module):
    """A model with C³A adapters. Calls and unknown attributes go to the wrapped model.

    Build it with :func:`get_c3a_model` or load one with :meth:`from_pretrained`.
    """

    def __init__(self, model: nn.Module, config: Optional[C3AConfig] = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, C3AConfig] = {}
        self.active_adapters: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- plumbing ---------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def c3a_layers(self) -> Iterator[tuple[str, C3ALinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, C3ALinear):
                yield name, module

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    # -- adapters ---------------------------------------------------------------------------------------
    def _plan(self, config: C3AConfig) -> list[tuple[str, nn.Module, int]]:
        """Match and validate every target first, so a bad config changes nothing."""
        if config.target_modules is None:
            config.target_modules = _default_targets(self.model)
        matched = []
        for name, module in self.model.named_modules():
            if isinstance(module, C3ALinear):
                is_target = _is_target(name, config)
            else:  # skip the frozen layer inside a C3ALinear, already covered by its wrapper
                is_target = "base_layer" not in name.split(".") and _is_target(name, config)
            if not is_target:
                continue
            try:
                linear_features(_base(module))
            except TypeError as e:
                raise TypeError(f"target {name!r}: {e}") from None
            matched.append((name, module, _pattern_block_size(name, config) or config.block_size))
        if not matched:
            raise ValueError(f"target_modules {config.target_modules!r} match no module of the model")
        if config.block_size == "auto":  # (config validation keeps "auto" out of block_size_pattern)
            from .analysis import choose_block_sizes

            shapes = {name: linear_features(_base(m)) for name, m, b in matched if b == "auto"}
            chosen = choose_block_sizes(shapes, budget=config.budget, lora_rank=config.lora_rank)
            matched = [(n, m, chosen[n].block_size if b == "auto" else b) for n, m, b in matched]
        errors = [f"{name} {problem}" for name, module, b in matched
                  if (problem := block_size_problem(b, *linear_features(_base(module))))]
        if errors:
            raise ValueError("invalid block size for " + "; ".join(errors))
        return matched

    def add_adapter(self, adapter_name: str, config: C3AConfig) -> None:
        """Add a new adapter (not active until :meth:`set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        config = dataclasses.replace(config)
        plan = self._plan(config)
        block_sizes = {}
        for name, module, b in plan:
            layer = module if isinstance(module, C3ALinear) else C3ALinear(module)
            layer.add_adapter(adapter_name, b, config.init_weights)
            layer.c3a_kernel[adapter_name].requires_grad_(False)
            if layer is not module:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, layer)
            block_sizes[name] = b
        config.block_size, config.block_size_pattern = _concrete_block_sizes(block_sizes)
        config.budget = config.lora_rank = None
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        self.peft_config[adapter_name] = config

    def _extra_trainable(self, config: C3AConfig) -> dict[str, nn.Parameter]:
        """Parameters outside the kernels that train and save with an adapter (biases, modules_to_save)."""
        params = {}
        for name, p in self.model.named_parameters():
            if "c3a_kernel" in name:
                continue
            module_name = name.rpartition(".")[0]
            if config.bias == "all" and name.endswith("bias"):
                params[name] = p
            elif config.bias == "c3a_only" and name.endswith("base_layer.bias"):
                params[name] = p
            elif config.modules_to_save and any(
                _name_matches(module_name, m) or f".{m}." in f".{module_name}." for m in config.modules_to_save
            ):
                params[name] = p
        return params

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Activate one adapter or several (their deltas add up); active kernels become trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.c3a_layers():
            layer.unmerge()
            layer.active_adapters = [n for n in names if n in layer.c3a_kernel]
            for n, kernel in layer.c3a_kernel.items():
                kernel.requires_grad_(n in names and not self.peft_config[n].inference_mode)
        for n in names:
            if not self.peft_config[n].inference_mode:
                for p in self._extra_trainable(self.peft_config[n]).values():
                    p.requires_grad_(True)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for name, layer in list(self.c3a_layers()):
            if adapter_name in layer.c3a_kernel:
                layer.unmerge()
                layer.delete_adapter(adapter_name)
            if not layer.c3a_kernel:
                self._replace(name, layer.base_layer)
        del self.peft_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def _replace(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent), child, module)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block; merged adapters are restored after."""
        layers = [layer for _, layer in self.c3a_layers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers}
        for layer in layers:
            layer.unmerge()
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False
                layer.merge(merged[id(layer)])

    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the (active or named) adapters into the base weights; forward then costs nothing extra."""
        for _, layer in self.c3a_layers():
            layer.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.c3a_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge and return the plain model, with no C³A modules left."""
        self.merge_adapter(adapter_names)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the plain model without merging (merged weights stay merged)."""
        for name, layer in list(self.c3a_layers()):
            self._replace(name, layer.base_layer)
        return self.model

    # -- counting ---------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- save / load ------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's key names."""
        state = {}
        for name, layer in self.c3a_layers():
            if adapter_name in layer.c3a_kernel:
                state[f"{PREFIX}{name}.c3a_kernel"] = layer.c3a_kernel[adapter_name]
        for name, p in self._extra_trainable(self.peft_config[adapter_name]).items():
            state[PREFIX + name] = p
        return {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None) -> None:
        """Write each adapter as PEFT does: ``default`` in ``save_directory``, others in a sub-folder.

        Every file is written to a temporary name and renamed into place.
        """
        for adapter in selected_adapters or list(self.peft_config):
            if adapter not in self.peft_config:
                raise ValueError(f"unknown adapter {adapter!r}; adapters: {sorted(self.peft_config)}")
            out = save_directory if adapter == "default" else os.path.join(save_directory, adapter)
            os.makedirs(out, exist_ok=True)
            with atomic_path(os.path.join(out, WEIGHTS_NAME)) as tmp:
                save_file(self.adapter_state_dict(adapter), tmp, metadata={"format": "pt"})
            config = dataclasses.replace(self.peft_config[adapter], inference_mode=True)
            config.save_pretrained(out)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **hub_kwargs,
    ) -> "C3AModel":
        """Load a C³A adapter (ours or PEFT's) from a folder or a hub id onto ``model``."""
        path = _resolve(model_id, **hub_kwargs)
        config = C3AConfig.from_pretrained(path)
        self = cls(model)
        self._load(path, config, adapter_name, is_trainable)
        self.set_adapter(adapter_name)
        if not is_trainable:
            self.eval()
        return self

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **hub_kwargs) -> None:
        """Load another adapter beside the existing ones (activate it with :meth:`set_adapter`)."""
        path = _resolve(model_id, **hub_kwargs)
        self._load(path, C3AConfig.from_pretrained(path), adapter_name, is_trainable)

    def _load(self, path: str, config: C3AConfig, adapter_name: str, is_trainable: bool) -> None:
        state = _load_weights(path)
        init_weights = config.init_weights
        config = dataclasses.replace(config, init_weights="zeros", inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            expected = {}
            for name, layer in self.c3a_layers():
                if adapter_name in layer.c3a_kernel:
                    expected[f"{PREFIX}{name}.c3a_kernel"] = layer.c3a_kernel[adapter_name]
            params = dict(self.model.named_parameters())
            for key in state:
                if key not in expected and key.startswith(PREFIX) and key[len(PREFIX):] in params:
                    expected[key] = params[key[len(PREFIX):]]
            unexpected = sorted(set(state) - set(expected))
            missing = sorted(k for k in expected if "c3a_kernel" in k and k not in state)
            if unexpected:
                raise ValueError(f"checkpoint key {unexpected[0]!r} has no place in the model ({len(unexpected)} such keys)")
            if missing:
                raise ValueError(f"checkpoint lacks key {missing[0]!r} ({len(missing)} kernels missing)")
            for key, tensor in state.items():
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise ValueError(
                        f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(expected[key].shape)}"
                    )
        except ValueError:
            self.delete_adapter(adapter_name)  # nothing half-applied
            raise
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor.to(expected[key].device, expected[key].dtype))
        self.peft_config[adapter_name].init_weights = init_weights


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, C3ALinear) else module


def _concrete_block_sizes(block_sizes: dict[str, int]) -> tuple[int, dict[str, int]]:
    """Most common size as ``block_size``; per-layer exceptions by full name (PEFT resolves those)."""
    values = list(block_sizes.values())
    default = max(set(values), key=values.count)
    return default, {name: b for name, b in block_sizes.items() if b != default}


def _resolve(model_id: str, **hub_kwargs) -> str:
    if os.path.isdir(model_id):
        return model_id
    if os.path.exists(model_id):
        raise ValueError(f"{model_id} is a file; pass the adapter folder")
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME], **hub_kwargs)


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return load_file(os.path.join(path, WEIGHTS_NAME))
    if os.path.isfile(os.path.join(path, LEGACY_WEIGHTS_NAME)):
        return torch.load(os.path.join(path, LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")


def get_c3a_model(model: nn.Module, config: C3AConfig, adapter_name: str = "default") -> C3AModel:
    """Freeze ``model``, inject C³A layers as ``config`` says, and return the wrapper."""
    return C3AModel(model, config, adapter_name)
