"""c3a's C3A tuner (a PEFT ``BaseTuner``) and its registration as PEFT's ``peft_type="C3A"``.

After :func:`register` (done by ``import c3a``) every PEFT entry point builds c3a's layers: ``get_peft_model``
with ``c3a.C3AConfig`` or ``peft.C3AConfig``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``,
``inject_adapter_in_model``, transformers' ``load_adapter``, and Trainer/TRL/accelerate on top. Checkpoints
keep PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``...<module>.c3a_kernel``).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, Iterator, Optional

import peft
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers
from peft.utils import (
    CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING, WEIGHTS_NAME,
    AuxiliaryTrainingWrapper, PeftType,
)
from torch import nn

from .blocksize import as_block_size_config, choose_block_sizes
from .config import C3AConfig, block_size_key_pattern, note_saved_state
from .io import IncompleteCheckpointError, check_kernel_dtypes, verify_checkpoint, weight_dtypes, weight_shapes, weights_files
from .layer import BASE_ADAPTER, C3ALayer, block_size_problem, c3a_layers, layer_class_for, targeted_shapes


def pattern_block_size(config: peft.C3AConfig, name: str) -> int:
    """The block size ``config`` gives module ``name`` (full name or ``.*\\.key$`` in ``block_size_pattern``,
    as PEFT resolves it), else ``config.block_size``."""
    patterns = config.block_size_pattern or {}
    if name in patterns:
        return patterns[name]
    key = next((k for k in patterns if block_size_key_pattern(k).match(name)), None)
    return patterns[key] if key is not None else config.block_size


def check_adapter_name(name: Any) -> None:
    """Adapter names become folder names in ``save_pretrained`` and parameter keys: refuse those that would
    escape the folder or break the keys, before anything is changed or written."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0"):  # "/" and "\\": any OS's separators
        raise ValueError(
            f"invalid adapter name {name!r}: it must be a non-empty name without '.', '/' or '\\' (it becomes a "
            "sub-folder of the save folder and part of parameter names)"
        )


class _ModelState:
    """What an adapter injection may change in a model — module attributes and children, parameter tensors and
    ``requires_grad`` — kept (shallowly: no weight is copied) so that a failed injection can put it all back."""

    def __init__(self, tuner: BaseTuner, model: nn.Module) -> None:
        self.modules = []
        for module in model.modules():
            attrs = {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
            self.modules.append((module, attrs))
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.tuner = {k: copy.copy(getattr(tuner, k)) for k in ("active_adapter", "targeted_module_names",
                                                                "targeted_parameter_names") if hasattr(tuner, k)}
        self.tuner_obj = tuner

    def restore(self) -> None:
        for module, attrs in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
        for p, data, requires_grad in self.params:
            if p.data_ptr() != data.data_ptr() or p.shape != data.shape or p.dtype != data.dtype:
                p.data = data  # replaced by an unmerge (PEFT's set_base_weight assigns .data)
            p.requires_grad_(requires_grad)
        for k, v in self.tuner.items():
            setattr(self.tuner_obj, k, v)


# The ``adapter_names`` of the mixed-batch calls running in this thread (or task), by ``id`` of their tuner: per
# context, so concurrent calls on one model never see each other's routing (each call's hooks read it here, not
# from the hook: all hooks of concurrent calls do the same), and a call of another c3a model made inside one
# (from a hook, say) is not routed by it. Never mutated: each call sets a new dict.
_ROUTING: ContextVar[dict[int, list[str]]] = ContextVar("c3a_adapter_names", default={})


def _route(module, args, kwargs, key: int):
    names = _ROUTING.get().get(key)
    if names is None:  # a call without adapter_names, concurrent with one that has them
        return None
    kwargs["adapter_names"] = names
    return args, kwargs


class C3AModel(BaseTuner):
    """Injects C³A layers (for each target the class :data:`~c3a.layer.LAYER_CLASSES` names for its type) as a
    :class:`~c3a.C3AConfig` (or ``peft.C3AConfig``) says.

    On top of PEFT's tuner machinery: every target's block size is checked (and ``"auto"`` resolved) before
    any module is replaced, so a bad config leaves the model as it was; ``adapter_names`` routes rows of a
    batch through different adapters in ``forward`` and ``generate`` (per call: threads may share the model);
    :meth:`add_weighted_adapter` combines adapters exactly.
    """

    prefix: str = "c3a_"
    tuner_layer_cls = C3ALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, all or nothing: the adapter name is checked first, and if anything fails midway
        (a target, ``modules_to_save``, ...) the model is put back as it was — modules, parameters,
        ``requires_grad``, merged state — before the error propagates."""
        check_adapter_name(adapter_name)
        config = self.peft_config.get(adapter_name)
        if type(config) is peft.C3AConfig:  # ours adds the saved-weights digest and the atomic config write
            config.__class__ = C3AConfig
        state = _ModelState(self, model)
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            state.restore()
            raise

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection; the dict is noted so that the config saved next records the digest of what was saved
        (PEFT adds ``modules_to_save`` and embeddings to this very dict before writing it)."""
        state = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        note_saved_state(config, adapter_name, state, cls._remove_adapter_name_from_key)
        return state

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # Loads that skipped the check before injection (transformers' load_adapter, set_peft_model_state_dict):
        # refuse here, before the tensors are cast into the kernels.
        check_kernel_dtypes({k: v.dtype for k, v in state.items() if torch.is_tensor(v)}, f"adapter {adapter_name!r}")
        bad = [k for k, v in state.items() if ".c3a_kernel" in k and torch.is_tensor(v) and v.is_floating_point()
               and v.device.type != "meta" and not torch.isfinite(v).all()]
        if bad:
            layers = ", ".join(k.split(".c3a_kernel")[0].removeprefix("base_model.model.") for k in bad)
            warnings.warn(
                f"C3A adapter {adapter_name!r}: the checkpoint's kernels hold NaN/inf values in {len(bad)} layer(s): "
                f"{layers}; these layers will output NaN/inf", UserWarning,
            )
        return state

    def _prepare_model(self, peft_config: peft.C3AConfig, model: nn.Module) -> None:
        """Match every target, resolve ``block_size="auto"``, validate all block sizes — before any change.

        When PEFT is loading a saved adapter (``PeftModel.from_pretrained`` / ``load_adapter`` with a config
        from :meth:`C3AConfig.from_pretrained`), the checkpoint is checked here too: digest, readability, and
        every tensor's shape against the model, so a mixed/partial save or an adapter of another model fails
        before the model is touched.
        """
        source = peft_config.__dict__.pop("_load_source", None)
        for key in peft_config.block_size_pattern or {}:  # PEFT's own config class, or one changed since it was built
            block_size_key_pattern(key)
        _maybe_include_all_linear_layers(peft_config, model)  # idempotent; PEFT calls it again after this hook
        shapes = targeted_shapes(model, peft_config)
        if not shapes:
            return  # PEFT's injection reports the unmatched targets
        sizes = {name: pattern_block_size(peft_config, name) for name in shapes}
        auto = {name: shapes[name] for name, b in sizes.items() if b == "auto"}
        if auto:
            chosen = choose_block_sizes(
                auto, budget=getattr(peft_config, "budget", None), lora_rank=getattr(peft_config, "lora_rank", None)
            )
            sizes.update({name: c.block_size for name, c in chosen.items()})
        errors = [f"{name} {problem}" for name, b in sizes.items() if (problem := block_size_problem(b, *shapes[name]))]
        if errors:
            raise ValueError("invalid block size for " + "; ".join(errors))
        if source is not None and _loading_weights_now():
            _check_checkpoint(peft_config, source, model, shapes, sizes)
        if auto:  # concrete sizes in the config: what is saved loads anywhere, PEFT's reference included
            peft_config.block_size, peft_config.block_size_pattern = as_block_size_config(sizes)
            peft_config.budget = peft_config.lora_rank = None

    def _create_and_replace(
        self, c3a_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs: Any
    ) -> None:
        block_size = pattern_block_size(c3a_config, current_key)
        exact_delta = getattr(c3a_config, "exact_delta", False)  # ours; PEFT's config lacks it
        if isinstance(target, C3ALayer):
            target.update_layer(adapter_name, block_size, c3a_config.init_weights,
                                inference_mode=c3a_config.inference_mode, exact_delta=exact_delta)  # fmt: skip
            return
        new_module = layer_class_for(target)(
            target, adapter_name, block_size=block_size, init_weights=c3a_config.init_weights,
            inference_mode=c3a_config.inference_mode, exact_delta=exact_delta,
        )
        if adapter_name not in self.active_adapters:  # an added adapter is not trainable until activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``adapter_names=[...]`` (one per batch row, ``"__base__"`` for none) reaches every C³A layer and
        ``modules_to_save`` wrapper of this forward or ``generate`` call — of this call only: concurrent calls
        (threads) with other names or none each get their own routing; no hook outlives the call."""
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
        token = _ROUTING.set({**_ROUTING.get(), id(self): list(adapter_names)})
        hook = partial(_route, key=id(self))
        handles = []
        try:
            for module in self.modules():
                if isinstance(module, (C3ALayer, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            _ROUTING.reset(token)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, refusing names that are not adapters of this model before changing anything
        (PEFT's would point every layer at a missing adapter: the model silently runs none)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {', '.join(map(repr, unknown))}; the model's adapters are "
                f"{sorted(self.peft_config)}; nothing was changed"
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear",
        svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None, density: Optional[float] = None, majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, whose ΔW is ``Σ wᵢ·ΔWᵢ`` in every layer, exactly: ΔW is linear in the kernel,
        so its kernel is ``Σ wᵢ·kernelᵢ`` (summed in fp64, stored in the kernels' dtype). No SVD: the result
        is an adapter of the same block sizes, not an approximation.

        PEFT's ``LoraModel.add_weighted_adapter`` call shape; only ``combination_type="linear"`` is supported
        (the SVD and pruning types would approximate what is exact here; "cat" would need a wider kernel, which
        a block-circulant layer does not have), so the ``svd_*``, ``density`` and ``majority_sign_method``
        arguments of those types are unused. The adapters must adapt the same layers with the same block sizes
        and have no ``modules_to_save`` (whole modules do not combine exactly). The new adapter is inactive and
        frozen, as PEFT's; any refusal (a ``ValueError`` saying what differs) changes nothing.
        """
        if combination_type != "linear":
            raise ValueError(
                f"combination_type {combination_type!r} is not supported for C3A adapters, only 'linear': ΔW is linear "
                "in the kernels, so the weighted sum of the kernels is the exact combination"
            )
        self._check_weighted_combination(adapters, weights, adapter_name)
        config = copy.deepcopy(self.peft_config[adapters[0]])
        config.init_weights = True  # zeros, overwritten below (and no random numbers drawn)
        config.exact_delta = any(getattr(self.peft_config[a], "exact_delta", False) for a in adapters)
        for loaded in ("_checkpoint_record", "_load_source"):  # the digest of another adapter's file; its folder
            config.__dict__.pop(loaded, None)
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except BaseException:
            del self.peft_config[adapter_name]  # inject_adapter has put the model back
            raise
        layers = [layer for _, layer in c3a_layers(self.model) if adapter_name in layer.c3a_kernel]
        wanted = [layer for _, layer in c3a_layers(self.model) if adapters[0] in layer.c3a_kernel]
        if layers != wanted or any(layer.block_size[adapter_name] != layer.block_size[adapters[0]] for layer in layers):
            self.delete_adapter(adapter_name)  # the config did not rebuild the same layers: never a near-miss
            raise ValueError(f"adapter {adapters[0]!r}'s config does not rebuild its own layers and block sizes in "
                             "this model; nothing was added")
        with torch.no_grad():
            for layer in layers:
                total = sum(float(w) * layer.c3a_kernel[a].double() for a, w in zip(adapters, weights))
                layer.c3a_kernel[adapter_name].copy_(total)
                layer.c3a_kernel[adapter_name].requires_grad_(False)

    def _check_weighted_combination(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        if isinstance(adapters, str) or not adapters:
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; the model's adapters are "
                             f"{sorted(self.peft_config)}")
        for a in adapters:
            if getattr(self.peft_config[a], "peft_type", None) != PeftType.C3A:
                raise ValueError(f"adapter {a!r} is not a C3A adapter")
            wrapped = [n for n, m in self.model.named_modules()
                       if isinstance(m, AuxiliaryTrainingWrapper) and a in m._get_available_adapters()]
            if wrapped:
                raise ValueError(f"adapter {a!r} trains whole modules ({', '.join(wrapped)}: modules_to_save or trainable "
                                 "tokens), which do not combine exactly; only C3A kernels do")
        problems = []
        for name, layer in c3a_layers(self.model):
            having = [a for a in adapters if a in layer.c3a_kernel]
            if having and len(having) < len(adapters):
                lacking = [a for a in adapters if a not in having]
                problems.append(f"{name} is adapted by {', '.join(map(repr, having))} but not by "
                                f"{', '.join(map(repr, lacking))}")
            elif having and len({layer.block_size[a] for a in adapters}) > 1:
                sizes = ", ".join(f"{layer.block_size[a]} ({a!r})" for a in adapters)
                problems.append(f"{name} has block sizes {sizes}")
        if problems:
            raise ValueError("the adapters cannot be combined exactly (they must adapt the same layers with the same "
                             "block sizes): " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def _loading_weights_now() -> bool:
    """Whether this injection is PEFT's ``from_pretrained`` / ``load_adapter`` about to load the config's weights
    (and not a config loaded from a folder and reused as a template for a fresh adapter)."""
    codes = {peft.PeftModel.from_pretrained.__func__.__code__, peft.PeftModel.load_adapter.__code__}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _checkpoint_folder(source: tuple) -> Optional[str]:
    """The local folder holding the adapter files of ``(model id or folder, subfolder, hub kwargs)``; hub files are
    fetched (PEFT would fetch them next); ``None`` when they cannot be had (PEFT then reports it)."""
    model_id, subfolder, hub = source
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return folder
    from huggingface_hub import hf_hub_download

    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        try:
            return os.path.dirname(hf_hub_download(model_id, name, subfolder=subfolder, **hub))
        except Exception:
            continue
    return None


def _check_checkpoint(config, source: tuple, model: nn.Module, shapes: dict, sizes: dict) -> None:
    folder = _checkpoint_folder(source)
    if folder is None:
        return
    path = verify_checkpoint(folder, getattr(config, "_checkpoint_record", None))
    if path is None:
        present = weights_files(folder)
        if not present:
            raise IncompleteCheckpointError(
                f"{folder} has {CONFIG_NAME} but no adapter weights ({SAFETENSORS_WEIGHTS_NAME}): a partial save")
        path = os.path.join(folder, present[0])
    check_kernel_dtypes(weight_dtypes(path), path, outcome="nothing was loaded and the model is unchanged")
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return  # PEFT renames this model's checkpoint keys while loading: names cannot be compared here
    problems = []
    kernels = {}
    for key, shape in weight_shapes(path).items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".c3a_kernel"):
            kernels[name[: -len(".c3a_kernel")]] = shape
            continue
        try:
            tensor = model.get_parameter(name)
        except AttributeError:
            try:
                tensor = model.get_buffer(name)
            except AttributeError:
                continue
        if tuple(tensor.shape) != shape:
            problems.append(f"{name} is {list(shape)} in the checkpoint but {list(tensor.shape)} in the model")
    for name, shape in kernels.items():
        if name not in shapes:
            problems.append(f"the checkpoint has a kernel for {name}, which the config does not target in this model")
            continue
        (d_in, d_out), b = shapes[name], sizes[name]
        if shape != (d_out // b, d_in // b, b):
            problems.append(f"{name}'s kernel is {list(shape)} in the checkpoint; block size {b} on this {d_out}×{d_in} "
                            f"layer needs {[d_out // b, d_in // b, b]}")
    missing = sorted(set(shapes) - set(kernels))
    if missing:
        problems.append(f"the checkpoint has no kernel for {len(missing)} targeted layer(s): {', '.join(missing[:5])}"
                        + (", ..." if len(missing) > 5 else ""))
    if problems:
        raise ValueError(f"the adapter in {folder} does not fit this model (nothing was changed): " + "; ".join(problems))


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
