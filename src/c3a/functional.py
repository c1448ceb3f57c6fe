"""The C³A operator: block-circular convolution with exact real-FFT autograd.

Conventions (paper §3.2, same as PEFT's C3A): a kernel ``k`` of shape ``(m, n, b)`` describes the
``(m·b) × (n·b)`` block matrix whose block ``(i, j)`` is the circulant ``C(k[i, j])`` with first row
``k[i, j]`` and every next row shifted right by one, i.e. ``C(v)[r, c] = v[(c - r) mod b]``.

So ``y = C x`` is a circular *cross-correlation*; with real FFTs over the last axis
``Y_i = Σ_j conj(K_ij) ∘ X_j``. The input gradient is the transpose, ``G_x,j = Σ_i K_ij ∘ G_i``
(a convolution, no conjugate), and the kernel gradient is ``irfft(Σ_tokens conj(G_i) ∘ X_j)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.fft import irfft, rfft

__all__ = ["add_block_circular_conv", "block_circular_conv", "block_circulant_linear", "circulant_matrix"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # FFTs in half precision are inexact and need power-of-two sizes: compute in fp32 (or fp64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix(spec: torch.Tensor, k_spec: torch.Tensor) -> torch.Tensor:
    """Per-frequency matrix product: ``(T, p, F) x (F, p, q) -> (T, q, F)``.

    One batched complex GEMM over the ``F`` frequencies (BLAS), instead of an einsum over tokens.
    """
    return torch.matmul(spec.permute(2, 0, 1), k_spec).permute(1, 2, 0)


def _check(x: torch.Tensor, kernel: torch.Tensor) -> None:
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (m, n, b), got {tuple(kernel.shape)}")
    _, n, b = kernel.shape
    if x.shape[-1] != n * b:
        raise ValueError(
            f"input's last dimension {x.shape[-1]} does not match the kernel: n·b = {n}·{b} = {n * b}"
        )


class _BlockCircularConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        m, n, b = kernel.shape
        dtype = _compute_dtype(torch.promote_types(x.dtype, kernel.dtype))
        k_spec = rfft(kernel.to(dtype), dim=-1)  # (m, n, F)
        x_spec = rfft(x.reshape(-1, n, b).to(dtype), dim=-1)  # (T, n, F)
        y_spec = _mix(x_spec, k_spec.conj().permute(2, 1, 0))  # (T, m, F)
        y = irfft(y_spec, n=b, dim=-1)
        # Only x (in its own dtype, usually shared with the frozen base layer) and the small kernel
        # spectrum are kept for backward: no fp32 or frequency-domain copy of the activation.
        ctx.save_for_backward(x, k_spec)
        ctx.kernel_dtype = kernel.dtype
        return y.reshape(*x.shape[:-1], m * b).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, k_spec = ctx.saved_tensors
        m, n, F = k_spec.shape
        b = x.shape[-1] // n
        dtype = k_spec.real.dtype
        g_spec = rfft(grad_y.reshape(-1, m, b).to(dtype), dim=-1)  # (T, m, F)
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            gx_spec = _mix(g_spec, k_spec.permute(2, 0, 1))  # (T, n, F)
            grad_x = irfft(gx_spec, n=b, dim=-1).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_k = _kernel_grad(x, g_spec, n, b).to(ctx.kernel_dtype)
        return grad_x, grad_k


def _kernel_grad(x: torch.Tensor, g_spec: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """``irfft(Σ_t conj(G_i) ∘ X_j)``: the (real) correlation of output gradient and input, ``(m, n, b)``."""
    x_spec = rfft(x.reshape(-1, n, b).to(g_spec.real.dtype), dim=-1)  # (T, n, F)
    # One batched GEMM over frequencies: (F, m, T) @ (F, T, n) -> (F, m, n)
    gk_spec = torch.matmul(g_spec.conj().permute(2, 1, 0), x_spec.permute(2, 0, 1))
    return irfft(gk_spec.permute(1, 2, 0), n=b, dim=-1)


def block_circular_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Apply the block-circulant matrix of ``kernel`` to the last axis of ``x``.

    Args:
        x: ``(..., n·b)`` input, any leading dims, any float dtype.
        kernel: ``(m, n, b)`` kernels.

    Returns:
        ``(..., m·b)`` equal to ``x @ circulant_matrix(kernel).T``, in ``x``'s dtype. Half-precision
        inputs are computed in fp32. Gradients for ``x`` and ``kernel`` are exact (real FFTs both ways).
    """
    _check(x, kernel)
    return _BlockCircularConv.apply(x, kernel)


def add_block_circular_conv(result: torch.Tensor, x: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``result + Σ_k block_circular_conv(x, k)`` in ``result``'s dtype: the adapters' deltas added to a frozen
    layer's output ``result``. The one entry point of the layer's unfolded path."""
    for kernel in kernels:
        result = result + block_circular_conv(x, kernel).to(result.dtype)
    return result


def circulant_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The dense ``(m·b, n·b)`` block-circulant matrix of ``kernel`` (for tests, merging and analysis).

    Block ``(i, j)`` is ``C(kernel[i, j])`` with ``C(v)[r, c] = v[(c - r) mod b]``. Differentiable.
    """
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (m, n, b), got {tuple(kernel.shape)}")
    m, n, b = kernel.shape
    return _circulant_blocks(kernel).permute(0, 2, 1, 3).reshape(m * b, n * b)


def _circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """``(m, n, b, b)`` circulant blocks. Windows of the wrapped kernel form a Hankel matrix
    ``H[s, c] = v[(s + c) mod b]`` as a view; taking its rows in the order ``(b - r) mod b`` gives
    ``C[r, c] = v[(c - r) mod b]`` with a single row-contiguous copy (much cheaper than a gather)."""
    b = kernel.shape[-1]
    hankel = torch.cat([kernel, kernel[..., :-1]], dim=-1).unfold(-1, b, 1)
    rows = (b - torch.arange(b, device=kernel.device)) % b
    return hankel[:, :, rows]


def _effective_weight(weight: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``weight + Σ circulant_matrix(k)`` as ``(out, in)``, each add one strided pass."""
    out = weight
    for kernel in kernels:
        m, n, b = kernel.shape
        blocks = _circulant_blocks(kernel.to(weight.dtype)).permute(0, 2, 1, 3)
        out = torch.add(out.view(m, b, n, b), blocks).view(m * b, n * b)
    return out


class _BlockCirculantLinear(torch.autograd.Function):
    """``F.linear(x, weight + Σ_k C(k), bias)`` in one GEMM; kernel gradients by FFT correlation.

    The dense delta costs ``d_out·d_in`` to build, independent of the number of tokens, and the GEMM is
    the one the frozen layer runs anyway; the kernel gradient never forms the ``d_out×d_in`` weight
    gradient. Saved for backward: ``x``, the weight, the kernels, and the folded weight when it is no larger
    than ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, *kernels):
        effective = _effective_weight(weight, kernels)
        # Keep the folded weight for backward when it is no larger than the input activation (saves
        # rebuilding it); for wide layers and few tokens rebuild it instead, so memory stays lean.
        keep = weight.shape[0] * x.shape[-1] <= x.numel()
        ctx.save_for_backward(x, weight, effective if keep else None, *kernels)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, effective, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, effective, *kernels = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if needs[0]:
            effective = _effective_weight(weight, kernels) if effective is None else effective
            grad_x = (g2 @ effective).view(x.shape)
        if needs[1]:
            grad_w = g2.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and needs[2]:
            grad_b = g2.sum(0)
        grad_ks = []
        for kernel, need in zip(kernels, needs[3:]):
            if not need:
                grad_ks.append(None)
                continue
            m, n, b = kernel.shape
            dtype = _compute_dtype(kernel.dtype)
            g_spec = rfft(g2.reshape(-1, m, b).to(dtype), dim=-1)
            grad_ks.append(_kernel_grad(x, g_spec, n, b).to(kernel.dtype))
        return (grad_x, grad_w, grad_b, *grad_ks)


def block_circulant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernels: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + Σ_k block_circular_conv(x, k)``, computed as one dense GEMM.

    For full-precision weights and many tokens this is the fast path: the block-circulant delta is
    folded into the weight (``d_out·d_in`` work, independent of tokens). Not for half-precision weights:
    rounding ``weight + delta`` to bf16/fp16 would swallow the small delta. Exact gradients for all inputs.
    """
    if weight.dtype in (torch.float16, torch.bfloat16):
        raise ValueError("block_circulant_linear needs fp32/fp64 weights; use block_circular_conv")
    for kernel in kernels:
        _check(x, kernel)
        if kernel.shape[0] * kernel.shape[2] != weight.shape[0]:
            raise ValueError(f"kernel {tuple(kernel.shape)} does not fit weight {tuple(weight.shape)}")
    return _BlockCirculantLinear.apply(x, weight, bias, *kernels)
