"""The C³A operator: block-circular convolution with exact autograd, by real FFT or, in half precision, by GEMMs.

Conventions (paper §3.2, same as PEFT's C3A): a kernel ``k`` of shape ``(m, n, b)`` describes the
``(m·b) × (n·b)`` block matrix whose block ``(i, j)`` is the circulant ``C(k[i, j])`` with first row
``k[i, j]`` and every next row shifted right by one, i.e. ``C(v)[r, c] = v[(c - r) mod b]``.

So ``y = C x`` is a circular *cross-correlation*; with real FFTs over the last axis
``Y_i = Σ_j conj(K_ij) ∘ X_j``. The input gradient is the transpose, ``G_x,j = Σ_i K_ij ∘ G_i``
(a convolution, no conjugate), and the kernel gradient is ``irfft(Σ_tokens conj(G_i) ∘ X_j)``.

Three ways to compute it:

- **FFT** (:func:`block_circular_conv`): ``rfft`` → one batched complex GEMM over frequencies → ``irfft``, in
  fp32 (fp64 for fp64 inputs). Exact to the compute precision; memory-bound in half precision (fp32 copies,
  complex spectra, layout copies).
- **DFT as GEMM** (half precision, even ``b`` up to :func:`dft_max_block`): the per-block real DFT is a dense
  ``b×b`` real matrix, so the whole operator is three GEMMs with half-precision operands and fp32
  accumulation, no layout copy, the inverse accumulated straight into the frozen layer's output. Its
  transforms are scaled so that no intermediate outgrows the data (fp16's range); what precision each dtype
  gets is listed in :func:`add_block_circular_conv`.

- **Dense delta** (half precision, narrow layers): the delta's own ``(m·b) × (n·b)`` matrix, its entries the
  kernel's rounded once, in one GEMM per product (three per training step); the kernel gradient is the weight
  gradient summed along the circulant diagonals. Cheaper than the DFT path's many small GEMMs when the layer is
  narrow (SmolLM2's 576→192 projections on a CPU).

:func:`add_block_circular_conv` is the one entry point of the layer's unfolded path and picks between them.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.fft import irfft, rfft

__all__ = [
    "DENSE_MAX_SIZE",
    "DFT_MAX_BLOCK",
    "DFT_SLOWDOWN",
    "add_block_circular_conv",
    "add_block_circular_conv_rows",
    "autocast_half_dtype",
    "block_circular_conv",
    "block_circulant_linear",
    "circulant_matrix",
    "dft_max_block",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Largest block size for which half precision takes the DFT-as-GEMM path, per device type. Its transforms
# cost 2·b FLOPs per input and output element (the FFT's ~5·log2(b), but memory-bound and in fp32), so the
# GEMM path stops paying for large b. Measured (docs/performance.md): between b = 256 and 512 on a 2-core
# x86-64 CPU; on an H200 the GEMM path is still ahead at b = 1024 (2048 unmeasured). Other devices: the CPU's.
DFT_MAX_BLOCK = {"cpu": 256, "cuda": 1024}


# Half-precision path by shape. The dense path costs 3·d_in·d_out multiply-adds per token in three GEMMs of the
# frozen layer's own size; the DFT path (3·d_in + 2·d_out)·b in its transforms (GEMMs with inner dimension b) and
# 6·d_in·d_out/b in its mixing (batches of (d_in/b × d_out/b) blocks). On a CPU small GEMMs run far below a large
# one's rate and each carries a fixed cost, so the DFT path's work is weighted by DFT_SLOWDOWN: its transforms
# always, its mixing when the blocks are small (a side under 64). Fitted to forward+backward timings of one layer
# under bf16 autocast on a 2-core x86-64 CPU (docs/performance.md): the dense path wins for SmolLM2's v_proj
# (576→192) and loses for 576×576 at b ≥ 48. Only narrow layers (d_in·d_out ≤ DENSE_MAX_SIZE, the measured range):
# against the FFT path (odd or large b) the dense GEMMs' quadratic cost was measured up to 1024×1024 only. Devices
# not listed (CUDA: not measured) keep the DFT/FFT paths.
DFT_SLOWDOWN = {"cpu": 4.5}
DENSE_MAX_SIZE = 1024 * 1024


def _half_path(b: int, d_in: int, d_out: int, device: torch.device) -> str:
    """The half-precision path for a ``(d_out × d_in)`` layer with blocks of ``b`` on ``device``."""
    slowdown = DFT_SLOWDOWN.get(device.type)
    if slowdown is not None and d_in * d_out <= DENSE_MAX_SIZE:
        transforms, mixing = (3 * d_in + 2 * d_out) * b, 6 * d_in * d_out / b
        small_blocks = min(d_in, d_out) < 64 * b
        if 3 * d_in * d_out <= slowdown * transforms + (slowdown if small_blocks else 1) * mixing:
            return "dense"
    return "dft" if b % 2 == 0 and b <= dft_max_block(device) else "fft"


def dft_max_block(device: torch.device | str) -> int:
    """The largest even block size that takes the DFT path in half precision on ``device``."""
    return DFT_MAX_BLOCK.get(torch.device(device).type, DFT_MAX_BLOCK["cpu"])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # FFTs in half precision are inexact and need power-of-two sizes: compute in fp32 (or fp64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix_spectra(spec: torch.Tensor, k_spec: torch.Tensor) -> torch.Tensor:
    """Per-frequency matrix product: ``(T, p, F) x (F, p, q) -> (T, q, F)``.

    One batched complex GEMM over the ``F`` frequencies (BLAS), instead of an einsum over tokens; its operands
    frequency-major in memory (:func:`_frequency_major`).
    """
    return torch.bmm(_frequency_major(spec, (2, 0, 1)), _frequency_major(k_spec)).permute(1, 2, 0)


def _frequency_major(t: torch.Tensor, dims: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """``t.permute(dims)`` as one contiguous batch of matrices: a complex ``bmm`` on CPU copies every batch slice of
    a strided operand separately (F small copies, much slower than one contiguous copy first)."""
    return (t if dims is None else t.permute(dims)).contiguous()


def _check(x: torch.Tensor, kernel: torch.Tensor) -> None:
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (m, n, b), got {tuple(kernel.shape)}")
    _, n, b = kernel.shape
    if x.shape[-1] != n * b:
        raise ValueError(
            f"input's last dimension {x.shape[-1]} does not match the kernel: n·b = {n}·{b} = {n * b}"
        )
    if x.device != kernel.device:  # e.g. a meta-device input: the result would land on the kernel's device
        raise ValueError(f"input is on {x.device} and the kernel on {kernel.device}; put both on one device")


class _BlockCircularConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        m, n, b = kernel.shape
        dtype = _compute_dtype(torch.promote_types(x.dtype, kernel.dtype))
        # 1/b of the inverse transform folded into the small kernel spectrum: irfft(norm="forward") then
        # skips its separate scaling pass over the (tokens, d_out) output.
        k_spec = rfft(kernel.to(dtype), dim=-1) / b  # (m, n, F)
        if x.numel() == 0:  # no tokens: FFT libraries reject empty transforms
            y = x.new_zeros(0, m, b, dtype=dtype)
        else:
            x_spec = rfft(x.reshape(-1, n, b).to(dtype), dim=-1)  # (T, n, F)
            y_spec = _mix_spectra(x_spec, k_spec.conj().permute(2, 1, 0))  # (T, m, F)
            y = irfft(y_spec, n=b, dim=-1, norm="forward")
        # Only x (in its own dtype, usually shared with the frozen base layer) and the small kernel
        # spectrum are kept for backward: no fp32 or frequency-domain copy of the activation.
        ctx.save_for_backward(x, k_spec)
        ctx.kernel_dtype = kernel.dtype
        return y.reshape(*x.shape[:-1], m * b).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, k_spec = ctx.saved_tensors
        m, n, F = k_spec.shape
        b = x.shape[-1] // n
        if x.numel() == 0:
            return torch.zeros_like(x), x.new_zeros(m, n, b, dtype=ctx.kernel_dtype), None
        dtype = k_spec.real.dtype
        g_spec = rfft(grad_y.reshape(-1, m, b).to(dtype), dim=-1)  # (T, m, F)
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            gx_spec = _mix_spectra(g_spec, k_spec.permute(2, 0, 1))  # (T, n, F), k_spec carries the 1/b
            grad_x = irfft(gx_spec, n=b, dim=-1, norm="forward").reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_k = _kernel_grad(x, g_spec, n, b).to(ctx.kernel_dtype)
        return grad_x, grad_k, None


def _kernel_grad(x: torch.Tensor, g_spec: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """``irfft(Σ_t conj(G_i) ∘ X_j)``: the (real) correlation of output gradient and input, ``(m, n, b)``."""
    x_spec = rfft(x.reshape(-1, n, b).to(g_spec.real.dtype), dim=-1)  # (T, n, F)
    # One batched GEMM over frequencies: (F, m, T) @ (F, T, n) -> (F, m, n)
    gk_spec = torch.bmm(_frequency_major(g_spec.conj(), (2, 1, 0)), _frequency_major(x_spec, (2, 0, 1)))
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
    return _BlockCircularConv.apply(x, kernel, x.dtype)


# -- half precision: the real DFT as a GEMM ----------------------------------------------------------------------
#
# For even b the real spectrum of a block is b real numbers: Re X_s and Im X_s for the inner frequencies
# s = 1 … S−1 (S = b/2), and the two real ones, DC and Nyquist, which share slot 0 (as its "re" and "im").
# With the transform matrix R below, X = R @ x_blockᵀ holds Re X_s in row s and Im X_s in row S + s. In slot s ≥ 1
# the mixing Y_s = Σ_j conj(K_ij,s) X_j,s is, with K = Kr + i·Ki and the blocks transposed (tokens are rows),
#     Re Y = Re X · Krᵀ + Im X · Kiᵀ,        Im Y = Im X · Krᵀ − Re X · Kiᵀ;
# in slot 0, DC and Nyquist are mixed by their own real blocks and do not interact. The inverse (irfft) is R again,
# with weights w_s/b (w_s = 1 for DC and Nyquist, 2 for the others): y_c = Σ_s (w_s/b)(Re Y_s cos θ − Im Y_s sin θ),
# θ = 2π s c / b.
#
# Scaling: every intermediate stays within the size of what it represents, whatever b (fp16's largest number,
# 65504, is the constraint; bf16 has fp32's range). The forward transform is F = R/b, the inverse G = 2R:
#   spectra   X̂ = F x = X/b: each entry at most max|x| (|R| ≤ 1, b terms);
#   mixing    Ŷ = (w_s/2)·conj(K) X̂ = (w_s/2)·Y/b, the output delta's own spectrum over b, so |Ŷ| ≤ mean|y|;
#             its diagonal term, rounded before the cross term is added, is at most ‖ΔW‖_∞·max|x|, the bound
#             on the delta itself;
#   inverse   y = Gᵀ Ŷ, accumulated into the frozen output (its rounding is the output's).
# Sums inside a GEMM run in fp32; only each GEMM's output is rounded to the half format. (cuBLAS may reduce
# split-K partial sums in fp16 unless torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is off;
# those of the inverse can reach √(2b)·max|y|, by Parseval.)
# (R/√b both ways would let a spectrum reach √b·max|x| — the DC of a block of equal entries: fp16 overflowed at
# b = 256 for inputs near 5000 that the frozen layer handled.) In fp16, F's entries would fall below its
# normal range (2^-14) for large b, so there the matrix is R/√b (normal up to b = 1024, the largest the dispatch
# sends here) and the remaining factors 1/√b and 2√b are the GEMMs' alpha, applied to the fp32 accumulator before
# the output is rounded; other dtypes fold them into the matrices (on CPU an alpha ≠ 1 costs a pass).
# The price in fp16: for incoherent data the spectra are ~1/√b of the entries, so they reach fp16's subnormals for
# entries below ~2^-14·√b; those roundings are absolute, ≤ 2^-25 per spectrum entry, at most b·2^-24 on an output
# entry (2^-14 at b = 1024; typically √b·2^-25). The backward pass runs the same chain on the output gradient; the
# blocks' gradient Σ_tokens Ĝᵀ X̂ is formed in fp32 (fp16's range cannot hold a sum over all tokens).
#
# Mixing blocks: Re K_s and Im K_s are rows of R applied to the kernel, so all blocks are one GEMM P @ kᵀ with a
# constant (3S × b) P, and the kernel's gradient one GEMM with 2b·P: a handful of launches per call, where an rfft
# of the kernel and its slicing into slots cost a dozen ops each way.
#
# Layout: R @ x2ᵀ gives X̂ as (2, S, T, n) — re/im outermost, so Re X̂ and Im X̂ are each a contiguous batch
# of (T, n) matrices and every mixing GEMM reads and writes whole contiguous tensors (strided batch views
# cost a hidden copy on CPU). The mixed spectrum (2, S, T, m) is read by the inverse GEMM as a transposed
# operand that lands directly in the (T, m·b) layout of the layer's output. No permute copy anywhere.


@functools.lru_cache(maxsize=64)
def _real_dft_matrix(b: int, dtype: torch.dtype, device: torch.device, scale: float) -> torch.Tensor:
    """``scale·R`` of shape ``(b, b)``: row ``s`` of ``R`` is ``cos(2π s c / b)``, row ``S + s`` is
    ``−sin(2π s c / b)``, except slot 0, whose rows are DC (all ones) and Nyquist ``(−1)^c``.
    Built in float64, then rounded once."""
    s = torch.arange(b // 2, dtype=torch.int64)[:, None]
    c = torch.arange(b, dtype=torch.int64)[None, :]
    angle = (2 * math.pi / b) * ((s * c) % b).to(torch.float64)  # reduce s·c mod b first: exact angles
    cos, sin = torch.cos(angle), -torch.sin(angle)
    sin[0] = 1 - 2 * (c[0] % 2)  # Nyquist row shares slot 0 with DC
    return (torch.cat([cos, sin]) * scale).to(dtype=dtype, device=device)


def _dft_transforms(b: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[torch.Tensor, float], ...]:
    """``((F, α), (G, β))`` with ``α·F = R/b`` (forward) and ``β·G = 2R`` (inverse), the matrices in ``dtype``.

    fp16: ``F = G = R/√b``, whose entries are normal fp16 numbers, and the rest in the alphas; other dtypes:
    everything in the matrices, alphas 1."""
    if dtype == torch.float16:
        root = math.sqrt(b)
        dft = _real_dft_matrix(b, dtype, device, 1 / root)
        return (dft, 1 / root), (dft, 2 * root)
    return (_real_dft_matrix(b, dtype, device, 1 / b), 1.0), (_real_dft_matrix(b, dtype, device, 2.0), 1.0)


@functools.lru_cache(maxsize=64)
def _mixing_matrix(b: int, dtype: torch.dtype, device: torch.device, scale: float) -> torch.Tensor:
    """``scale·P`` of shape ``(3S, b)``: the per-slot real mixing blocks of a kernel are one GEMM, ``P @ kᵀ``.

    Rows ``s < S`` give the blocks acting re→re, rows ``S + s`` im→im (both ``Re K_s``, except slot 0: DC/2 and
    Nyquist/2, which do not interact), rows ``2S + s`` the cross blocks ``Im K_s`` (``+`` im→re, ``−`` re→im; zero
    in slot 0). ``K = rfft(k)``, so these are rows of ``R``; each carries ``w_s/2`` of the inverse DFT's weight (1/2
    for DC and Nyquist, 1 otherwise), the inverse transform ``2R`` the rest."""
    S = b // 2
    R = _real_dft_matrix(b, torch.float64, torch.device("cpu"), 1.0)
    re_re, im_im, cross = R[:S].clone(), R[:S].clone(), R[S:].clone()
    re_re[0], im_im[0], cross[0] = R[0] / 2, R[S] / 2, 0
    return (torch.cat([re_re, im_im, cross]) * scale).to(dtype=dtype, device=device)


def _gemm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha·(a @ b)``, the scale applied to the fp32 accumulator before the output is rounded (no overflow of
    the unscaled product)."""
    if alpha == 1:
        return torch.mm(a, b)
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


def _to_slots(t2: torch.Tensor, transform: tuple[torch.Tensor, float], p: int) -> torch.Tensor:
    """``(T, p·b)`` rows of blocks → their real spectra over b, ``(2, S, T, p)``: one GEMM ``(R/b) @ blocksᵀ``."""
    dft, alpha = transform
    b = dft.shape[0]
    return _gemm(dft, t2.reshape(-1, b).to(dft.dtype).T, alpha).view(2, b // 2, -1, p)


def _mix_slots(spec: torch.Tensor, blocks: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """``(2, S, T, p)`` spectra × per-slot real blocks ``(3S, q, p)`` (each block transposed, as ``P @ kᵀ``
    lays them out) → ``(2, S, T, q)``: one batched GEMM for the diagonal blocks, then the two cross terms
    accumulated in place (GEMM epilogue, beta = 1), all on contiguous halves. ``adjoint``: the transposed
    operator (blocks untransposed, cross term negated), for the input gradient."""
    _, S, T, p = spec.shape
    diag, cross = blocks[: 2 * S], blocks[2 * S:]
    if not adjoint:
        diag, cross = diag.mT, cross.mT
    sign = -1 if adjoint else 1
    out = torch.bmm(spec.view(2 * S, T, p), diag).view(2, S, T, diag.shape[-1])
    out[0].baddbmm_(spec[1], cross, alpha=sign)
    out[1].baddbmm_(spec[0], cross, alpha=-sign)
    return out


def _from_slots(spec: torch.Tensor, b: int) -> torch.Tensor:
    """``(2, S, T, q)`` spectra as the ``(T·q, b)`` operand of the inverse GEMM ``· @ G`` (a transposed view)."""
    return spec.view(b, -1).T


def _writes_fp32(t: torch.Tensor) -> bool:
    """Whether half-precision GEMMs on ``t``'s device write an fp32 result (``out_dtype``: CUDA, recent torch)."""
    return t.dtype in HALF_DTYPES and t.device.type == "cuda" and _out_dtype_supported(t.dtype, t.device)


@functools.lru_cache(maxsize=8)
def _out_dtype_supported(dtype: torch.dtype, device: torch.device) -> bool:
    one = torch.ones(1, 1, dtype=dtype, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without out_dtype for this backend
        return False
    return True


def _block_grads(g_spec: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """``Σ_tokens Ĝᵀ X̂`` per slot as the mixing blocks' gradient ``(3S, m, n)`` in fp32: the diagonal blocks, then
    the cross blocks (im→re minus re→im), from spectra ``(2, S, T, m)`` and ``(2, S, T, n)``.

    Half-precision operands straight into an fp32 result where the backend offers it (CUDA); else bf16 GEMMs
    write bf16 (the cross blocks' two products summed in the GEMM epilogue), widened once — bf16 has fp32's
    range — and fp16 is computed from fp32 operands (fp16's range may not hold a sum over all tokens)."""
    _, S, T, m = g_spec.shape
    n = spec.shape[-1]
    gt = g_spec.view(2 * S, T, m).mT
    if _writes_fp32(spec):
        wide = functools.partial(torch.bmm, out_dtype=torch.float32)
        return torch.cat([wide(gt, spec.view(2 * S, T, n)), wide(gt[:S], spec[1]) - wide(gt[S:], spec[0])])
    if spec.dtype == torch.float16:
        gt, spec = gt.float(), spec.float()
    out = spec.new_empty(3 * S, m, n)
    torch.bmm(gt, spec.view(2 * S, T, n), out=out[: 2 * S])
    torch.bmm(gt[:S], spec[1], out=out[2 * S:])
    out[2 * S:].baddbmm_(gt[S:], spec[0], alpha=-1)
    return out.float() if out.dtype == torch.bfloat16 else out  # fp64 stays fp64


def _dft_forward(
    result: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype, inplace: bool
) -> torch.Tensor:
    """``result + x @ C(kernel)ᵀ`` from the mixing blocks already in ``dtype``; with ``inplace`` (and ``result``
    contiguous and in ``dtype``) the inverse GEMM accumulates into ``result`` itself."""
    S, m, n = blocks.shape[0] // 3, blocks.shape[1], blocks.shape[2]
    b = 2 * S
    transform, (inverse, alpha) = _dft_transforms(b, dtype, x.device)
    with torch.autocast(x.device.type, enabled=False):
        delta_rows = _from_slots(_mix_slots(_to_slots(x.reshape(-1, n * b), transform, n), blocks), b)
        return _add_product(result, delta_rows, inverse, alpha, dtype, inplace)


def _add_product(
    result: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype, inplace: bool
) -> torch.Tensor:
    """``result + alpha·(a @ b)``, the product's rows laid over ``result``'s. With ``result`` in ``dtype`` the GEMM
    accumulates into it (no add pass), into ``result`` itself when ``inplace``; otherwise (e.g. an fp32 frozen
    output) the product is added in ``result``'s precision."""
    if result.dtype != dtype:
        return torch.add(result, _gemm(a, b, alpha).view(result.shape)).to(result.dtype)
    out = result if inplace else result.clone(memory_format=torch.contiguous_format)
    out.view(-1, b.shape[1]).addmm_(a, b, alpha=alpha)
    return out


def _dft_blocks(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mixing blocks ``(3S, m, n)`` of ``kernel`` ``(m, n, b)``, formed in the kernel's precision (one GEMM
    with the cached ``P``), rounded once to ``dtype``."""
    m, n, b = kernel.shape
    kernel = kernel.to(torch.promote_types(kernel.dtype, torch.float32))
    P = _mixing_matrix(b, kernel.dtype, kernel.device, 1.0)
    with torch.autocast(kernel.device.type, enabled=False):  # formed in fp32 (autocast would round P and k first)
        return torch.mm(P, kernel.reshape(m * n, b).T).view(3 * (b // 2), m, n).to(dtype)


def _writes_in_place(result: torch.Tensor, dtype: torch.dtype, inplace: bool) -> bool:
    return inplace and result.dtype == dtype and result.is_contiguous()


class _DftBlockCircularConv(torch.autograd.Function):
    """``result + x @ C(kernel)ᵀ`` through the real DFT as GEMMs, in ``dtype`` (operands) with fp32 accumulation.

    Saved for backward: ``x`` as it came (no spectrum: backward recomputes it, one GEMM) and the small blocks.
    The kernel gradient is formed from the blocks' gradient with one GEMM (``2b·P``, cached), so the blocks'
    construction leaves no autograd graph of its own. ``inplace``: the inverse GEMM accumulates into ``result``
    itself (marked dirty for autograd) when it is contiguous; otherwise into a copy. Under ``torch.compile``
    never in place: the compiler fuses the add, and traced in-place writes on views of a graph input break its
    backward.
    """

    @staticmethod
    def forward(ctx, result, x, kernel, dtype, inplace):
        blocks = _dft_blocks(kernel, dtype)
        inplace = _writes_in_place(result, dtype, inplace) and not torch.compiler.is_compiling()
        out = _dft_forward(result, x, blocks, dtype, inplace)
        if inplace:
            ctx.mark_dirty(result)
        ctx.save_for_backward(x, blocks)
        ctx.dtype, ctx.kernel_dtype = dtype, kernel.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, blocks = ctx.saved_tensors
        S, m, n = blocks.shape[0] // 3, blocks.shape[1], blocks.shape[2]
        b = 2 * S
        transform, (inverse, alpha) = _dft_transforms(b, ctx.dtype, x.device)
        needs = ctx.needs_input_grad
        grad_x = grad_k = None
        with torch.autocast(x.device.type, enabled=False):
            g_spec = _to_slots(grad_out.reshape(-1, m * b), transform, m)  # (2, S, T, m), over b like the forward's
            if needs[1]:
                gx_spec = _mix_slots(g_spec, blocks, adjoint=True)
                grad_x = _gemm(_from_slots(gx_spec, b), inverse, alpha).view(x.shape).to(x.dtype)
            if needs[2]:
                spec = _to_slots(x.reshape(-1, n * b), transform, n)  # recomputed, not saved
                # ∂L/∂Ŷ = G g = 2b·Ĝ, and the kernel's gradient is the blocks' through Pᵀ: both in one GEMM, 2b·Pᵀ.
                grad_blocks = _block_grads(g_spec, spec)
                P = _mixing_matrix(b, grad_blocks.dtype, grad_blocks.device, 2.0 * b)
                grad_k = torch.mm(grad_blocks.view(3 * S, m * n).T, P).view(m, n, b).to(ctx.kernel_dtype)
        return grad_out if needs[0] else None, grad_x, grad_k, None, None


# -- half precision, narrow layers: the delta as one dense GEMM ----------------------------------------------------
#
# The DFT path costs ~2.5·b·(d_in + d_out) multiply-adds per token in fourteen GEMMs per training step, most of them
# small; on a CPU each half-precision GEMM also carries a fixed cost of tens of µs. For a narrow layer one GEMM with
# the delta's own (d_out × d_in) matrix per product is cheaper (three per step: d_in·d_out each, at the frozen GEMM's
# efficiency). The matrix holds the kernel's entries rounded once to the half format (building it moves numbers, no
# arithmetic); each product accumulates in fp32; the delta is a GEMM of its own, never folded into the frozen
# weight. The kernel's gradient is the weight gradient's circulant projection (the adjoint of the build),
# Σ_r Gw[i·b + r, j·b + (r + c) mod b], summed in fp32 from the weight gradient formed as the DFT path forms its
# blocks' gradient (fp32 where the backend writes it, else rounded once to bf16; fp16 from fp32 operands).


def _circulant_projection(grad_w: torch.Tensor, m: int, n: int, b: int) -> torch.Tensor:
    """The kernel gradient ``(m, n, b)`` from the dense delta's gradient ``(m·b, n·b)``, the adjoint of
    :func:`circulant_matrix`: ``Σ_r Gw[i·b + r, j·b + (r + c) mod b]``. Each block row's columns wrapped once more
    (one copy) make every circulant diagonal a strided view, summed over rows."""
    wrapped = torch.cat([grad_w.view(m, b, n, b)] * 2, dim=-1)  # (m, b, n, 2b): [..., t] = Gw[..., t mod b]
    diagonals = wrapped.as_strided((m, n, b, b), (b * n * 2 * b, 2 * b, 1, n * 2 * b + 1))  # [i, j, c, r]
    return diagonals.sum(-1)


def _weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``Σ_tokens gᵀ x`` ``(m·b, n·b)`` summed in fp32 and returned in fp32 (fp64 stays fp64)."""
    if _writes_fp32(g2):
        return torch.mm(g2.T, x2, out_dtype=torch.float32)
    if g2.dtype == torch.float16:  # fp16's range may not hold a sum over all tokens
        g2, x2 = g2.float(), x2.float()
    out = torch.mm(g2.T, x2)
    return out.float() if out.dtype == torch.bfloat16 else out


def _dense_delta(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block-circulant ``(m·b, n·b)`` matrix of ``kernel`` with its entries rounded once to ``dtype`` (rounded
    before the build: the build only moves entries, so its copies move half-precision bytes)."""
    return circulant_matrix(kernel.to(dtype))


def _dense_forward(
    result: torch.Tensor, x: torch.Tensor, delta_w: torch.Tensor, dtype: torch.dtype, inplace: bool
) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return _add_product(result, x.reshape(-1, delta_w.shape[1]).to(dtype), delta_w.T, 1.0, dtype, inplace)


class _DenseBlockCircularConv(torch.autograd.Function):
    """``result + x @ C(kernel)ᵀ`` as one GEMM with the dense delta matrix in ``dtype``, fp32 accumulation.

    Saved for backward: ``x`` as it came and the kernel (the matrix is rebuilt: ``d_out·d_in`` moves, no
    activation-sized memory). ``inplace`` as in :class:`_DftBlockCircularConv`.
    """

    @staticmethod
    def forward(ctx, result, x, kernel, dtype, inplace):
        inplace = _writes_in_place(result, dtype, inplace) and not torch.compiler.is_compiling()
        out = _dense_forward(result, x, _dense_delta(kernel, dtype), dtype, inplace)
        if inplace:
            ctx.mark_dirty(result)
        ctx.save_for_backward(x, kernel)
        ctx.dtype = dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        m, n, b = kernel.shape
        needs = ctx.needs_input_grad
        grad_x = grad_k = None
        with torch.autocast(x.device.type, enabled=False):
            g2 = grad_out.reshape(-1, m * b).to(ctx.dtype)
            if needs[1]:
                grad_x = (g2 @ _dense_delta(kernel, ctx.dtype)).view(x.shape).to(x.dtype)
            if needs[2]:
                grad_w = _weight_grad(g2, x.reshape(-1, n * b).to(ctx.dtype))
                grad_k = _circulant_projection(grad_w, m, n, b).to(kernel.dtype)
        return grad_out if needs[0] else None, grad_x, grad_k, None, None


# path → (autograd Function, its forward without a graph, the kernel's form that forward takes)
_GEMM_PATHS = {
    "dft": (_DftBlockCircularConv, _dft_forward, _dft_blocks),
    "dense": (_DenseBlockCircularConv, _dense_forward, _dense_delta),
}


def _gemm_conv_add(
    path: str, result: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, dtype: torch.dtype, inplace: bool
) -> torch.Tensor:
    function, forward, prepare = _GEMM_PATHS[path]
    kernel = kernel.to(torch.float64 if dtype == torch.float64 else kernel.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (result, x, kernel)):
        return function.apply(result, x, kernel, dtype, inplace)
    # Inference: no autograd node, nothing saved (and torch.compile traces the in-place accumulation plainly).
    return forward(result, x, prepare(kernel, dtype), dtype, _writes_in_place(result, dtype, inplace))


def autocast_half_dtype(device_type: str) -> Optional[torch.dtype]:
    """The half-precision dtype autocast is running in on ``device_type``, or ``None`` (off, fp32, or a device
    without autocast such as ``meta``)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in HALF_DTYPES else None


def _half_dtype(result: torch.Tensor, x: torch.Tensor) -> Optional[torch.dtype]:
    """The half-precision dtype this call runs in (autocast's, else x's or result's), or ``None``."""
    return autocast_half_dtype(x.device.type) or next((t.dtype for t in (x, result) if t.dtype in HALF_DTYPES), None)


def add_block_circular_conv(
    result: torch.Tensor,
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    *,
    exact_delta: bool = False,
    path: Optional[str] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``result + Σ_k block_circular_conv(x, k)`` in ``result``'s dtype: the adapters' deltas added to a frozen
    layer's output ``result``. The one entry point of the layer's unfolded path.

    Kernels with the same block size are summed first (``Σ_k C(k) = C(Σ_k k)``), so several adapters cost
    one. Per block size ``b`` the path is:

    - when the call runs in half precision (``x`` or ``result`` bf16/fp16, or autocast active):
      ``"dense"`` for narrow layers on CPU (:data:`DFT_SLOWDOWN`, any ``b``): one GEMM with the delta's own
      ``(d_out × d_in)`` matrix in the half format, accumulating into ``result``; else ``"dft"`` when ``b`` is even
      and at most :func:`dft_max_block` (256 on CPU, 1024 on CUDA): three GEMMs with half-precision operands and
      fp32 accumulation, the last one accumulating into ``result``;
    - ``"fft"`` otherwise (fp32/fp64; odd or large ``b``): :func:`block_circular_conv`, computed in fp32/fp64.

    Args:
        result: ``(..., m·b)``, the frozen layer's output.
        x: ``(..., n·b)``, the layer's input.
        kernels: ``(m, n, b)`` kernels (already scaled), possibly of different ``b``.
        exact_delta: compute the delta entirely in fp32 (fp64 for fp64 inputs) and add it to ``result`` in
            fp32, so that the output is rounded to ``result``'s dtype once. Slower (fp32 GEMMs); the default
            rounds the half-precision spectra, a relative error of order the format's unit roundoff *of the
            delta*, which is small against the rounding of the output itself.
        path: force ``"dft"``, ``"dense"`` or ``"fft"`` (benchmarks, tests); ``None`` picks as above. ``"dft"``
            with an odd block size is an error.
        inplace: the DFT path may accumulate into ``result``'s own storage (autograd-aware), saving a copy
            of it — for a caller that owns ``result``, as the layer owns its frozen output.

    Gradients (``result``, ``x``, every kernel) are exact to the compute precision on both paths.

    Precision, by the dtype the call runs in (unit roundoff ``u``):

    - fp32 / fp64: the FFT path in that precision (the layer folds the delta into the weight instead when that
      is cheaper, :func:`block_circulant_linear`).
    - bf16 (``u = 2^-8``) and fp16 (``u = 2^-11``), DFT path: operands (transform matrices, spectra, mixing
      blocks) rounded to the format, every product accumulated in fp32, the kernel gradient's sum over tokens
      returned in fp32 (on CPU, where no GEMM writes fp32 from bf16, rounded to bf16 once, the cross blocks
      twice). The delta's relative error is a few ``u`` (normwise; the tests derive the bound), on top of the output's own rounding.
      Whatever ``b``, no half-precision tensor it forms (each GEMM's output; sums run in fp32) exceeds
      ``max|x|`` or the delta's worst-case size ``‖ΔW‖_∞·max|x|``
      (backward: ``max|g|`` and ``‖ΔWᵀ‖_∞·max|g|`` for the output gradient ``g``), so fp16 cannot overflow
      unless one of those exceeds its range (65504). Below fp16's normal range (2^-14) spectra round to
      subnormals: an absolute error of at most ``b·2^-24`` per output entry.
    - bf16/fp16, dense path: the delta matrix's entries (the kernel's) rounded once to the format, each product
      accumulated in fp32; the kernel gradient is the weight gradient (rounded once to bf16 on CPU, formed in fp32
      for fp16) summed along the circulant diagonals in fp32. Same order of error as the DFT path; the same
      overflow bounds (no intermediate beyond ``max|x|``, the delta's or the input gradient's own size).
    - half precision, FFT path (odd ``b``, or ``b`` above :func:`dft_max_block`): computed in fp32, one rounding
      of the delta to the output's dtype.
    - ``exact_delta=True``: the delta entirely in fp32 (fp64 for fp64 inputs), the output rounded once.
    """
    if path not in (None, "dft", "dense", "fft"):
        raise ValueError(f"path must be None, 'dft', 'dense' or 'fft', got {path!r}")
    by_block: dict[int, torch.Tensor] = {}
    for kernel in kernels:
        _check(x, kernel)
        b = kernel.shape[-1]
        by_block[b] = by_block[b] + kernel if b in by_block else kernel
    if not by_block:
        return result
    half = _half_dtype(result, x)
    out_dtype = result.dtype
    if exact_delta:  # one fp32 (fp64) accumulator, rounded once at the end
        wide = torch.float64 if torch.float64 in (x.dtype, result.dtype) else torch.float32
        inplace = inplace or result.dtype != wide  # the converted copy is ours
        result = result.to(wide)
    for b, kernel in by_block.items():
        chosen = path or ("fft" if half is None else _half_path(b, x.shape[-1], result.shape[-1], x.device))
        if chosen == "dft" and b % 2:
            raise ValueError(f"the DFT path needs an even block size, got {b}")
        if chosen in _GEMM_PATHS:
            dtype = result.dtype if exact_delta or half is None else half
            result = _gemm_conv_add(chosen, result, x, kernel, dtype, inplace)
        else:
            result = result + _BlockCircularConv.apply(x, kernel, result.dtype)
        inplace = True  # a fresh tensor from here on: ours to accumulate into
    return result.to(out_dtype)


def add_block_circular_conv_rows(
    result: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``result`` plus each batch row ``r`` of ``x`` through ``kernels[index[r]]`` (no delta where ``index[r] < 0``):
    the deltas of many adapters in one call, as a mixed-adapter batch needs when serving. Inference only (no
    autograd graph): training keeps the per-adapter calls and their exact backward.

    Args:
        result: ``(R, ..., m·b)``, the frozen layer's output.
        x: ``(R, ..., n·b)``.
        kernels: ``(N, m, n, b)``, one (scaled) kernel per adapter.
        index: ``(R,)`` integer, the kernel of each row, negative for none.

    The FFT path in fp32 (fp64 for fp64 inputs): one ``rfft`` of the rows and one of the kernels, one batched
    complex product per (row, frequency), one ``irfft``; the delta is rounded once to ``result``'s dtype. Exact to
    the compute precision, as :func:`block_circular_conv` (whose arithmetic it repeats per row).
    """
    if kernels.dim() != 4:
        raise ValueError(f"kernels must have shape (N, m, n, b), got {tuple(kernels.shape)}")
    _check(x, kernels[0])
    if index.shape != (x.shape[0],):
        raise ValueError(f"index must have one entry per row of x ({x.shape[0]}), got shape {tuple(index.shape)}")
    _, m, n, b = kernels.shape
    dtype = _compute_dtype(torch.promote_types(x.dtype, kernels.dtype))
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        k_spec = (rfft(kernels.to(dtype), dim=-1) / b).conj()  # (N, m, n, F), 1/b as in block_circular_conv
        chosen = k_spec[index.clamp(min=0)] * (index >= 0).view(-1, 1, 1, 1)  # (R, m, n, F)
        x_spec = rfft(x.reshape(x.shape[0], -1, n, b).to(dtype), dim=-1)  # (R, T, n, F)
        y_spec = torch.einsum("rtnf,rmnf->rtmf", x_spec, chosen)
        delta = irfft(y_spec, n=b, dim=-1, norm="forward").reshape(result.shape)
        return result + delta.to(result.dtype)


def circulant_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The dense ``(m·b, n·b)`` block-circulant matrix of ``kernel`` (for tests, merging and analysis).

    Block ``(i, j)`` is ``C(kernel[i, j])`` with ``C(v)[r, c] = v[(c - r) mod b]``. Differentiable.
    """
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (m, n, b), got {tuple(kernel.shape)}")
    m, n, b = kernel.shape
    # two contiguous copies (the flip keeps the view's block order; the reshape lays blocks out as rows): measured
    # faster than one index_select into the final layout
    return _hankel(kernel).permute(0, 2, 1, 3).flip(1).reshape(m * b, n * b)


def _hankel(kernel: torch.Tensor) -> torch.Tensor:
    """``(m, n, b, b)`` view ``H[..., s, c] = v[(s + c + 1) mod b]`` of the wrapped kernel: ``C(v)`` is ``H`` with its
    rows reversed (a Toeplitz matrix has no view with non-negative strides; reversing a Hankel one is a flip, a
    contiguous copy far cheaper than a gather)."""
    b = kernel.shape[-1]
    return torch.cat([kernel[..., 1:], kernel], dim=-1).unfold(-1, b, 1)


def _circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """``(m, n, b, b)`` circulant blocks ``C(kernel[i, j])``."""
    return _hankel(kernel).flip(-2)


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
            if g2.shape[0] == 0:  # no tokens, no gradient (and no empty FFT)
                grad_ks.append(torch.zeros_like(kernel))
                continue
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
