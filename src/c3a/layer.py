"""The C³A tuner layers: a frozen linear layer plus one or more block-circulant deltas (PEFT tuner layers).

One class per kind of base layer, found through :data:`LAYER_CLASSES`: a new kind is one class (how to read its
``(d_in, d_out)``, how its weight is laid out, whether its forward is a plain GEMM) and one entry there.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .functional import (
    add_block_circular_conv,
    add_block_circular_conv_rows,
    autocast_half_dtype,
    block_circulant_linear,
    circulant_matrix,
)

# Fold the delta into the weight when tokens·(d_in + d_out)·FOLD_RATIO ≥ d_in·d_out (measured crossover,
# see docs/performance.md).
FOLD_RATIO = 2
BASE_ADAPTER = "__base__"  # in ``adapter_names``: this row runs the base model alone (PEFT's name)


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer, as its C³A layer class reads them (see
    :func:`layer_class_for`), else ``TypeError``."""
    return layer_class_for(layer).base_features(layer)


def common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


def block_size_problem(block_size: int, in_features: int, out_features: int) -> Optional[str]:
    """Why ``block_size`` cannot serve a layer of this shape, or ``None`` when it can."""
    if block_size >= 1 and in_features % block_size == 0 and out_features % block_size == 0:
        return None
    side, size = ("input", in_features) if block_size < 1 or in_features % block_size else ("output", out_features)
    return (  # PEFT's sentence first (its tests and users match on it), then what to choose instead
        f"(in_features={in_features}, out_features={out_features}): The block size should be a factor of the {side} "
        f"size. However, the {side} size is {size} and the block size is {block_size}; valid block sizes: "
        f"{common_divisors(in_features, out_features)}"
    )


def init_kernel_(kernel: torch.Tensor, init_weights: Any, in_features: int, out_features: int) -> None:
    """PEFT's C3A initialisations: ``True`` zeros, ``"xavier_uniform"``/``False``, ``"kaiming_uniform"``, ``"gaussian"``."""
    with torch.no_grad():
        if init_weights is True or init_weights == "zeros":
            kernel.zero_()
        elif init_weights in ("xavier_uniform", False):
            bound = math.sqrt(6.0 / (in_features + out_features))
            kernel.uniform_(-bound, bound)
        elif init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / in_features)
            kernel.uniform_(-bound, bound)
        elif init_weights == "gaussian":
            kernel.normal_()
        else:
            raise ValueError(f"unknown init_weights {init_weights!r}")


class C3ALayer(BaseTunerLayer):
    """Adapter bookkeeping: one kernel ``(d_out/b, d_in/b, b)`` per adapter in ``c3a_kernel`` (fp32 through
    ``get_peft_model``, which keeps adapters in fp32 unless ``autocast_adapter_dtype=False``)."""

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size", "exact_delta")

    # What a concrete class says about the base layers it wraps (one class per kind, see LAYER_CLASSES).
    fan_in_fan_out: ClassVar[bool] = False  # the base weight is stored (d_in, d_out), as GPT-2's Conv1D does
    plain_bases: ClassVar[tuple[type, ...]] = ()  # base types whose forward is exactly x·Wᵀ + b (foldable)

    # PEFT's switch (``peft.helpers.disable_input_dtype_casting``, diffusers' layerwise casting). C³A never casts
    # the layer input to the kernels' dtype: the operator reads ``x`` in its own dtype and returns the delta in
    # the base output's dtype, so both settings compute the same; the flag exists so that those helpers work.
    cast_input_dtype_enabled: bool = True
    # What ``enable_adapters(False)`` unmerged, to merge back bit for bit on enable: (adapters in merge order,
    # their kernels as merged, (flat indices, values) of merged-weight entries a re-merge would round otherwise).
    _merged_before_disable: Optional[tuple[list[str], dict[str, torch.Tensor], Optional[tuple]]] = None

    @classmethod
    def base_features(cls, base: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)`` of a base layer of the kind this class wraps."""
        raise NotImplementedError

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.block_size: dict[str, int] = {}
        self.exact_delta: dict[str, bool] = {}  # per adapter: the half-precision delta in fp32 (config flag)
        self.c3a_kernel = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # The kernels as they were merged (fp32 copies, small): unmerge subtracts exactly what was added, even if
        # a kernel changed meanwhile.
        self._merged_kernels: dict[str, torch.Tensor] = {}
        self._merged_before_disable = None
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.in_features, self.out_features = self.base_features(base)
        self.quantization_backend = resolve_quantization_backend(base)

    @property
    def delta_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of this layer's ΔW, whatever the layout of the base weight."""
        return self.out_features, self.in_features

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """A ``(d_out, d_in)`` matrix laid out like the base weight (and back: the transpose is its own inverse)."""
        return matrix.T if self.fan_in_fan_out else matrix

    def update_layer(
        self, adapter_name: str, block_size: int, init_weights: Any = "xavier_uniform", inference_mode: bool = False,
        exact_delta: bool = False, **kwargs: Any,
    ) -> None:
        problem = block_size_problem(block_size, self.in_features, self.out_features)
        if problem:
            raise ValueError(f"layer {problem}")
        weight = self.get_base_layer().weight
        kernel = torch.empty(
            self.out_features // block_size, self.in_features // block_size, block_size,
            dtype=torch.float32, device=weight.device,
        )
        if kernel.device.type != "meta":
            init_kernel_(kernel, init_weights, self.in_features, self.out_features)
        self.block_size[adapter_name] = block_size
        self.exact_delta[adapter_name] = bool(exact_delta)
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel)
        # PEFT's contract: the base layer's device and float dtype; get_peft_model's autocast_adapter_dtype=True
        # (its default) then makes half-precision kernels fp32 again. The operator computes in fp32 either way.
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def get_delta_weight(self, adapter: str, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The adapter's ``ΔW / d_in`` in fp32, laid out like the base weight (:meth:`to_base_layout`)."""
        kernel = self.c3a_kernel[adapter] if kernel is None else kernel
        return self.to_base_layout(circulant_matrix(kernel.float()) / self.in_features)

    def _merged_weight(self, weight: torch.Tensor, adapter: str, kernel: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW(kernel)`` in fp32 (not yet rounded to the weight's dtype): merge's one formula."""
        return weight.float() + self.get_delta_weight(adapter, kernel).to(weight.device)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the (active or named) adapters' deltas to the base weight, in fp32, rounded once to its dtype.

        The merged weight is always formed aside and checked for non-finite values before it replaces the
        base weight (what PEFT's ``safe_merge=True`` does), so a bad kernel never damages the base. A
        quantized base is dequantized, added to and re-quantized: that rounds the merged weight (a warning says so).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.c3a_kernel]
        if not adapter_names:
            return
        self._merged_before_disable = None  # an explicit merge supersedes what disabling would have restored
        if self.quantization_backend is not None:
            warnings.warn(
                f"Merging C3A adapters into a {self.quantization_backend.backend_name} quantized layer: the merged "
                "weight is re-quantized, so outputs differ from the unmerged model by the quantization rounding (for "
                "4-bit, about as large as the adapter's own effect); merge into a full-precision copy of the base "
                "model to keep the adapter exact.",
                UserWarning,
            )
        for adapter in adapter_names:
            weight = self.get_base_weight()
            kernel = self.c3a_kernel[adapter].detach().float().clone()
            merged = self._merged_weight(weight, adapter, kernel)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken: merging it gives "
                    "non-finite weights; the base weight is unchanged"
                )
            self.set_base_weight(merged.to(weight.dtype))
            self._merged_kernels[adapter] = kernel
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added — the kernels as they were then, even if they changed since."""
        self._merged_before_disable = None  # an explicit unmerge: enabling must not merge back
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._unmerge_all()

    def _unmerge_all(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            kernel = self._merged_kernels.pop(adapter)
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter, kernel).to(weight.device)
            self.set_base_weight((weight.float() - delta).to(weight.dtype))

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch, keeping the merged state: disabling unmerges the merged adapters (the base layer alone
        must run) and enabling merges them back, the base weight bit for bit as it was — also when the disabled
        block ended in an exception (``PeftModel.disable_adapter`` enables in a ``finally``)."""
        if not enabled and self.merged:
            self._unmerge_until_enabled()
        super().enable_adapters(enabled)
        if enabled and self._merged_before_disable is not None:
            self._merge_back()

    @torch.no_grad()
    def _unmerge_until_enabled(self) -> None:
        adapters = list(self.merged_adapters)
        kernels = {a: self._merged_kernels[a] for a in adapters}
        merged = self.get_base_weight() if self.quantization_backend is None else None
        self._unmerge_all()
        patch = None
        if merged is not None:
            # Re-merging rounds the same sums again; keep the (rare) entries where it would not give the merged
            # weight back bit for bit, rather than rely on merge∘unmerge being the identity in floating point.
            again = self._remerged(self.get_base_weight(), adapters, kernels)
            bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[merged.element_size()]
            flat = merged.reshape(-1)
            index = (again.reshape(-1).view(bits) != flat.view(bits)).nonzero().squeeze(1)
            patch = (index, flat[index].clone())
        self._merged_before_disable = (adapters, kernels, patch)

    def _remerged(self, weight: torch.Tensor, adapters: list[str], kernels: dict[str, torch.Tensor]) -> torch.Tensor:
        for adapter in adapters:  # as merge does it: one rounding to the weight's dtype per adapter
            weight = self._merged_weight(weight, adapter, kernels[adapter]).to(weight.dtype)
        return weight.contiguous()

    @torch.no_grad()
    def _merge_back(self) -> None:
        adapters, kernels, patch = self._merged_before_disable
        self._merged_before_disable = None
        missing = [a for a in adapters if a not in self.c3a_kernel]
        if missing:
            warnings.warn(f"C3A adapter(s) {missing} were deleted while adapters were disabled; {adapters} stay "
                          "unmerged", UserWarning)
            return
        if patch is None:  # quantized: each merge re-quantizes, as merge() does
            for adapter in adapters:
                weight = self.get_base_weight()
                self.set_base_weight(self._merged_weight(weight, adapter, kernels[adapter]).to(weight.dtype))
        else:
            weight = self._remerged(self.get_base_weight(), adapters, kernels)
            index, values = patch
            weight.view(-1)[index] = values.to(weight.device)
            self.set_base_weight(weight)
        self.merged_adapters = list(adapters)
        self._merged_kernels = dict(kernels)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True  # get_delta_weight is the dense delta in the base weight's layout: PEFT's converter applies


class C3ALinear(nn.Module, C3ALayer):
    """``y = W0 x + Σ_a C_blk(kernel_a) x / d_in`` over the active adapters ``a``.

    ``W0`` is the frozen base layer: ``nn.Linear`` or a subclass, such as a bitsandbytes 8-/4-bit linear layer
    (served through PEFT's quantization backend: dequantized to merge, never folded). ``C3ALinear(base, ...)`` on
    GPT-2's ``Conv1D`` gives a :class:`C3AConv1D`, the class :data:`LAYER_CLASSES` names for it.
    Every adapter sees the layer input; the ``1/d_in`` scale is the reference implementation's, so kernels
    are interchangeable with PEFT's C3A. ``forward(x, adapter_names=[...])`` routes each batch row through its
    own adapter (``"__base__"``: none), as PEFT's mixed-adapter batches do.
    """

    plain_bases = (nn.Linear,)

    def __new__(cls, base_layer: Optional[nn.Module] = None, *args: Any, **kwargs: Any):
        # The documented constructor takes any supported base; copies and unpickling call __new__ without one.
        if cls is C3ALinear and base_layer is not None:
            cls = layer_class_for(base_layer)
        return super().__new__(cls)

    @classmethod
    def base_features(cls, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, block_size: int, init_weights: Any = "xavier_uniform",
        inference_mode: bool = False, exact_delta: bool = False, **kwargs: Any,
    ) -> None:
        super().__init__()
        C3ALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, block_size, init_weights, inference_mode=inference_mode, exact_delta=exact_delta)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:  # merged while disabled: unmerged until enabled, as disabling does
                self._unmerge_until_enabled()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            self._warn_if_merged_kernels_train()
            return self.base_layer(x, *args, **kwargs)
        kernels = [self._scaled_kernel(a) for a in self.active_adapters if a in self.c3a_kernel]
        self._check_meta_input(x, kernels)  # before the base layer's own, less telling, device error
        if kernels and not args and not kwargs and self._fold_into_weight(x):
            base = self.base_layer
            return block_circulant_linear(x, self.to_base_layout(base.weight), base.bias, kernels)
        exact = any(self.exact_delta.get(a, False) for a in self.active_adapters)
        if kernels and not exact:
            x = self._cast_for_autocast(x)
        return self._add_deltas(self.base_layer(x, *args, **kwargs), x, kernels, exact)

    def _cast_for_autocast(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in autocast's half dtype when autocast would cast it for the frozen GEMM anyway (a plain base
        layer, an fp32 input): cast once, the frozen GEMM and the deltas share the copy, the deltas save it for
        backward (as LoRA's first GEMM saves its own), and the two input gradients meet in that dtype, one
        conversion back instead of two and an fp32 add. The frozen output is bit-identical."""
        half = autocast_half_dtype(x.device.type)
        if half is None or x.dtype != torch.float32 or not self._plain_base():
            return x
        return x.to(half)

    def _scaled_kernel(self, adapter: str) -> torch.Tensor:
        """``kernel / d_in`` in fp32 at least (a half-precision kernel, from ``autocast_adapter_dtype=False``, is
        upcast; its gradient flows back in its own dtype). Scaling the small kernel is cheaper than the output."""
        kernel = self.c3a_kernel[adapter]
        return kernel.to(torch.promote_types(kernel.dtype, torch.float32)) / self.in_features

    def _warn_if_merged_kernels_train(self) -> None:
        if self.training and torch.is_grad_enabled() and any(
            self.c3a_kernel[a].requires_grad for a in self.merged_adapters if a in self.c3a_kernel
        ):
            warnings.warn(
                f"C3A adapter(s) {self.merged_adapters} are merged into the base weight, so their kernels get no "
                "gradient and training them changes nothing; call unmerge_adapter() before training (unmerging "
                "restores the base weight exactly as it was)", UserWarning,
            )

    @staticmethod
    def _check_meta_input(x: torch.Tensor, kernels: Sequence[torch.Tensor]) -> None:
        if x.device.type == "meta" and any(k.device.type != "meta" for k in kernels):
            raise ValueError(
                f"C3A layer: the input is on the meta device but the layer's kernels are on {kernels[0].device}; a "
                "meta input needs a layer on the meta device (shapes only), or move the input to the layer's device"
            )

    def _add_deltas(
        self, result: torch.Tensor, x: torch.Tensor, kernels: Sequence[torch.Tensor], exact_delta: bool = False
    ) -> torch.Tensor:
        if not kernels:
            return result
        if self.quantization_backend is not None:  # bnb may hand back a view that autograd must not modify
            result = self.quantization_backend.maybe_clone_base_result(result)
        return add_block_circular_conv(result, x, kernels, exact_delta=exact_delta, inplace=True)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> torch.Tensor:
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; unmerge them first")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows")
        result = self.base_layer(x, *args, **kwargs)
        groups: dict[str, list[int]] = {}  # rows per adapter, in one pass (not one pass per adapter)
        for i, adapter in enumerate(adapter_names):
            groups.setdefault(adapter, []).append(i)
        present = [a for a in groups if a != BASE_ADAPTER and a in self.c3a_kernel]
        if self._serves_in_one_call(present, x):
            index = torch.full((x.shape[0],), -1, dtype=torch.long)
            for position, adapter in enumerate(present):
                index[groups[adapter]] = position
            kernels = torch.stack([self._scaled_kernel(a) for a in present])
            return add_block_circular_conv_rows(result, x, kernels, index.to(x.device))
        parts = []
        for adapter in present:
            rows = torch.tensor(groups[adapter], device=x.device)
            kernel = self._scaled_kernel(adapter)
            parts.append((rows, self._add_deltas(result[rows], x[rows], [kernel], self.exact_delta.get(adapter, False))))
        if parts:
            result = result.clone()
            for rows, out in parts:
                result[rows] = out
        return result

    def _serves_in_one_call(self, adapters: Sequence[str], x: torch.Tensor) -> bool:
        """Whether a mixed batch's deltas run as one call over all its rows: inference (no graph to keep), two
        adapters or more, one block size, none asking for ``exact_delta``, and a plain (unquantized) base output."""
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(self.c3a_kernel[a].requires_grad for a in adapters)
        )
        return (
            len(adapters) > 1 and not needs_graph
            and len({self.c3a_kernel[a].shape for a in adapters}) == 1
            and not any(self.exact_delta.get(a, False) for a in adapters)
            and self.quantization_backend is None
        )

    def _fold_into_weight(self, x: torch.Tensor) -> bool:
        """Fold the delta into the base GEMM when that is cheaper than the FFTs, and exact enough.

        Folding costs ``d_in·d_out`` per call, the FFT path ``~tokens·(d_in + d_out)``; half-precision
        weights (or autocast) would round the small delta away; quantized and hooked base layers
        (offloading) must run their own forward.
        """
        if not self._plain_base():
            return False
        weight = self.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float64) or x.dtype != weight.dtype:
            return False
        device = x.device.type  # autocast would run the folded GEMM in its dtype; meta has none (asking raises)
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            return False
        tokens = x.numel() // self.in_features
        return FOLD_RATIO * tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def _plain_base(self) -> bool:
        """Whether the base layer's forward is its class's own GEMM: not quantized, and no forward replaced on the
        instance or hooked (accelerate's and diffusers' hooks — offloading, layerwise casting — must run: the
        weight may be elsewhere or in a storage dtype)."""
        base = self.base_layer
        if self.quantization_backend is not None or type(base) not in self.plain_bases:
            return False
        return not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook") or "forward" in vars(base))

    def __repr__(self) -> str:
        return "c3a." + super().__repr__()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"


class C3AConv1D(C3ALinear):
    """:class:`C3ALinear` over GPT-2's ``Conv1D``, whose weight is stored ``(d_in, d_out)``."""

    fan_in_fan_out = True
    plain_bases = (Conv1D,)

    @classmethod
    def base_features(cls, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]


# Base layer type → the C³A layer class that wraps it; a subclass of a listed type gets its nearest listed
# ancestor's class. Types of optional packages are named "module.Class": they need not be installed.
# bitsandbytes' layers are nn.Linear subclasses, listed to say that C3ALinear serves them on purpose.
LAYER_CLASSES: dict[Union[type, str], type[C3ALayer]] = {
    nn.Linear: C3ALinear,
    Conv1D: C3AConv1D,
    "bitsandbytes.nn.modules.Linear8bitLt": C3ALinear,
    "bitsandbytes.nn.modules.Linear4bit": C3ALinear,
}


def layer_class_for(base: nn.Module) -> type[C3ALayer]:
    """The C³A layer class :data:`LAYER_CLASSES` gives ``base``'s type (or its nearest listed ancestor), else
    ``TypeError`` naming the type."""
    for kind in type(base).__mro__:
        found = LAYER_CLASSES.get(kind) or LAYER_CLASSES.get(f"{kind.__module__}.{kind.__qualname__}")
        if found is not None:
            return found
    supported = ", ".join(k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k in LAYER_CLASSES)
    raise TypeError(
        f"C3A supports {supported} layers (and their subclasses), not {type(base).__module__}.{type(base).__name__}"
    )


def c3a_layers(model: nn.Module) -> list[tuple[str, C3ALayer]]:
    """``(name, layer)`` of every C³A layer in ``model``; names as in the base model for a ``peft.PeftModel``."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(name, module) for name, module in root.named_modules() if isinstance(module, C3ALayer)]


def targeted_shapes(model: nn.Module, config) -> dict[str, tuple[int, int]]:
    """``{name: (d_in, d_out)}`` of the modules ``config`` targets (PEFT's matching), those inside existing tuner
    layers left out; ``TypeError`` naming a target C³A cannot adapt."""
    inside_tuners = tuple(n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    shapes = {}
    for name, module in model.named_modules():
        if not name or name.startswith(inside_tuners) or not check_target_module_exists(config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        try:
            shapes[name] = linear_features(base)
        except TypeError as e:
            raise TypeError(f"target {name!r}: {e}") from None
    return shapes
