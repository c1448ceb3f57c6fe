"""`C3ALinear`: a frozen linear layer plus one or more C³A deltas."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .functional import add_block_circular_conv, block_circulant_linear, circulant_matrix

# Fold the delta into the weight when tokens·(d_in + d_out)·FOLD_RATIO ≥ d_in·d_out (measured crossover,
# see docs/performance.md).
FOLD_RATIO = 2


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer, else ``TypeError``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):  # GPT-2 style: weight is (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(
        f"C3A supports torch.nn.Linear and transformers Conv1D layers, not {type(layer).__module__}."
        f"{type(layer).__name__}"
    )


def common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


def block_size_problem(block_size: int, in_features: int, out_features: int) -> Optional[str]:
    """Why ``block_size`` cannot serve a layer of this shape, or ``None`` when it can."""
    if block_size >= 1 and in_features % block_size == 0 and out_features % block_size == 0:
        return None
    return (
        f"(in_features={in_features}, out_features={out_features}): block_size {block_size} does not divide "
        f"both; valid block sizes: {common_divisors(in_features, out_features)}"
    )


def init_kernel_(kernel: torch.Tensor, init_weights: Any, in_features: int, out_features: int) -> None:
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


class C3ALinear(nn.Module):
    """``y = W0 x + Σ_a C_blk(kernel_a) x / d_in`` over the active adapters ``a``.

    ``W0`` is the wrapped ``nn.Linear`` or ``Conv1D`` (kept as ``base_layer``, frozen). Each adapter ``a``
    owns an fp32 kernel of shape ``(d_out/b, d_in/b, b)`` applied with :func:`block_circular_conv`;
    every adapter sees the layer input. The ``1/d_in`` scale is the reference implementation's, so
    kernels are interchangeable with PEFT's C3A.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.c3a_kernel = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    def block_size(self, adapter: str) -> int:
        return self.c3a_kernel[adapter].shape[-1]

    def add_adapter(self, adapter: str, block_size: int, init_weights: Any = "xavier_uniform") -> None:
        problem = block_size_problem(block_size, self.in_features, self.out_features)
        if problem:
            raise ValueError(f"layer {problem}")
        weight = self.base_layer.weight
        kernel = torch.empty(
            self.out_features // block_size,
            self.in_features // block_size,
            block_size,
            dtype=torch.float32,
            device=weight.device,
        )
        init_kernel_(kernel, init_weights, self.in_features, self.out_features)
        self.c3a_kernel[adapter] = nn.Parameter(kernel)

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter!r} is merged; unmerge it before deleting")
        del self.c3a_kernel[adapter]
        if adapter in self.active_adapters:
            self.active_adapters.remove(adapter)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW / d_in`` as ``(out, in)``, in fp32."""
        return circulant_matrix(self.c3a_kernel[adapter].float()) / self.in_features

    def _weight_delta(self, adapter: str) -> torch.Tensor:
        delta = self.delta_weight(adapter)
        return delta.T if isinstance(self.base_layer, Conv1D) else delta

    @torch.no_grad()
    def merge(self, adapters: Optional[Iterable[str]] = None) -> None:
        weight = self.base_layer.weight
        for adapter in self.active_adapters if adapters is None else adapters:
            if adapter in self.merged_adapters or adapter not in self.c3a_kernel:
                continue
            merged = weight.float() + self._weight_delta(adapter).to(weight.device)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {adapter!r} gives non-finite weights")
            weight.copy_(merged)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight.copy_(weight.float() - self._weight_delta(adapter).to(weight.device))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a not in self.merged_adapters]
        # Scaling the small kernel is cheaper than scaling the (tokens, d_out) output.
        kernels = [self.c3a_kernel[a] / self.in_features for a in active]
        if kernels and not args and not kwargs and self._fold_into_weight(x):
            weight = self.base_layer.weight
            weight = weight.T if isinstance(self.base_layer, Conv1D) else weight
            return block_circulant_linear(x, weight, self.base_layer.bias, kernels)
        return add_block_circular_conv(self.base_layer(x, *args, **kwargs), x, kernels)

    def _fold_into_weight(self, x: torch.Tensor) -> bool:
        """Fold the delta into the base GEMM when that is cheaper than the FFTs, and exact enough.

        Folding costs ``d_in·d_out`` per call, the FFT path ``~tokens·(d_in + d_out)``; half-precision
        weights (or autocast) would round the small delta away, and hooked base layers (offloading,
        quantisation) must run their own forward.
        """
        base = self.base_layer
        weight = base.weight
        if weight.dtype not in (torch.float32, torch.float64) or x.dtype != weight.dtype:
            return False
        if torch.is_autocast_enabled(x.device.type):  # autocast would run the folded GEMM in half precision
            return False
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return False
        tokens = x.numel() // self.in_features
        return FOLD_RATIO * tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def extra_repr(self) -> str:
        sizes = {a: self.block_size(a) for a in self.c3a_kernel}
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={sizes}"

