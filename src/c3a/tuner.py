"""c3a's C3A tuner (a PEFT ``BaseTuner``) and its registration as PEFT's ``peft_type="C3A"``.

After :func:`register` (done by ``import c3a``) every PEFT entry point builds c3a's layers: ``get_peft_model``
with ``c3a.C3AConfig`` or ``peft.C3AConfig``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``,
``inject_adapter_in_model``, transformers' ``load_adapter``, and Trainer/TRL/accelerate on top. Checkpoints
keep PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``...<module>.c3a_kernel``).
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper, PeftType
from torch import nn

from .config import C3AConfig
from .layer import BASE_ADAPTER, C3ALayer, C3ALinear, block_size_problem, linear_features


def pattern_block_size(config: peft.C3AConfig, name: str) -> int:
    """The block size ``config`` gives module ``name`` (full name or ``.*\\.key$`` in ``block_size_pattern``,
    as PEFT resolves it), else ``config.block_size``."""
    patterns = config.block_size_pattern or {}
    if name in patterns:
        return patterns[name]
    key = next((k for k in patterns if re.match(rf".*\.{k}$", name)), None)
    return patterns[key] if key is not None else config.block_size


def _set_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class C3AModel(BaseTuner):
    """Injects :class:`~c3a.layer.C3ALinear` layers as a :class:`~c3a.C3AConfig` (or ``peft.C3AConfig``) says.

    On top of PEFT's tuner machinery: every target's block size is checked (and ``"auto"`` resolved) before
    any module is replaced, so a bad config leaves the model as it was; ``adapter_names`` routes rows of a
    batch through different adapters in ``forward`` and ``generate``.
    """

    prefix: str = "c3a_"
    tuner_layer_cls = C3ALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING

    def _prepare_model(self, peft_config: peft.C3AConfig, model: nn.Module) -> None:
        """Match every target, resolve ``block_size="auto"``, validate all block sizes — before any change."""
        _maybe_include_all_linear_layers(peft_config, model)  # idempotent; PEFT calls it again after this hook
        inside_tuners = tuple(n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
        shapes = {}
        for name, module in model.named_modules():
            if not name or name.startswith(inside_tuners) or not self._check_target_module_exists(peft_config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            try:
                shapes[name] = linear_features(base)
            except TypeError as e:
                raise TypeError(f"target {name!r}: {e}") from None
        if not shapes:
            return  # PEFT's injection reports the unmatched targets
        sizes = {name: pattern_block_size(peft_config, name) for name in shapes}
        auto = {name: shapes[name] for name, b in sizes.items() if b == "auto"}
        if auto:
            from .analysis import choose_block_sizes

            chosen = choose_block_sizes(
                auto, budget=getattr(peft_config, "budget", None), lora_rank=getattr(peft_config, "lora_rank", None)
            )
            sizes.update({name: c.block_size for name, c in chosen.items()})
        errors = [f"{name} {problem}" for name, b in sizes.items() if (problem := block_size_problem(b, *shapes[name]))]
        if errors:
            raise ValueError("invalid block size for " + "; ".join(errors))
        if auto:  # concrete sizes in the config: what is saved loads anywhere, PEFT's reference included
            default = Counter(sizes.values()).most_common(1)[0][0]
            peft_config.block_size = default
            peft_config.block_size_pattern = {n: b for n, b in sizes.items() if b != default}
            peft_config.budget = peft_config.lora_rank = None

    def _create_and_replace(
        self, c3a_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs: Any
    ) -> None:
        block_size = pattern_block_size(c3a_config, current_key)
        if isinstance(target, C3ALayer):
            target.update_layer(adapter_name, block_size, c3a_config.init_weights, inference_mode=c3a_config.inference_mode)
            return
        new_module = C3ALinear(
            target, adapter_name, block_size=block_size, init_weights=c3a_config.init_weights,
            inference_mode=c3a_config.inference_mode,
        )
        if adapter_name not in self.active_adapters:  # an added adapter is not trainable until activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``adapter_names=[...]`` (one per batch row, ``"__base__"`` for none) reaches every C³A layer and
        ``modules_to_save`` wrapper of this forward or ``generate`` call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names is for inference; call model.eval() first")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names, got {type(adapter_names).__name__}")
        known = set()
        for module in self.modules():
            if isinstance(module, C3ALayer):
                known |= set(module.c3a_kernel)
        unknown = sorted(set(adapter_names) - known - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"unknown adapter(s) in adapter_names: {', '.join(unknown)}; adapters: {sorted(known)}")
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:  # generate repeats every row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(beams)]
        hook = partial(_set_adapter_names, adapter_names=list(adapter_names))
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.modules()
            if isinstance(module, (C3ALayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


_REFERENCE = (PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.C3A], PEFT_TYPE_TO_TUNER_MAPPING[PeftType.C3A])


def register() -> None:
    """Make c3a's config and tuner PEFT's implementation of ``peft_type="C3A"`` (``import c3a`` does this)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.C3A] = C3AConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.C3A] = C3AModel


def unregister() -> None:
    """Give ``peft_type="C3A"`` back to PEFT's reference implementation (``peft.tuners.c3a``)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.C3A], PEFT_TYPE_TO_TUNER_MAPPING[PeftType.C3A] = _REFERENCE


def is_registered() -> bool:
    return PEFT_TYPE_TO_TUNER_MAPPING[PeftType.C3A] is C3AModel


@contextmanager
def peft_reference() -> Iterator[None]:
    """Within the block, PEFT entry points build PEFT's own C3A (the ``peft-c3a`` baseline); restored after."""
    was_registered = is_registered()
    unregister()
    try:
        yield
    finally:
        if was_registered:
            register()
