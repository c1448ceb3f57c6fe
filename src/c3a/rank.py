"""Exact rank and singular values of a C³A adapter's ΔW (and, for comparison, of a PEFT LoRA adapter's).

Everything spectral rests on one fact. With ``K_f`` the ``m×n`` matrix of the kernels' DFT coefficients at
frequency ``f`` (``K_f[i, j] = FFT(kernel[i, j])[f]``), the block-circulant ``C_blk(kernel)`` is unitarily
similar to the block-diagonal matrix of the ``conj(K_f)``, ``f = 0..b-1``::

    C_blk(kernel) = Σ_f (I_m ⊗ ē_f) conj(K_f) (I_n ⊗ e_fᵀ),   e_f[c] = exp(-2πi·f·c/b) / √b

so its singular values are those of all ``K_f`` together and ``rank = Σ_f rank(K_f)``. For a real kernel
``K_{b-f} = conj(K_f)``: only the ``b//2 + 1`` blocks of the real FFT are decomposed, the others counted twice.
Nothing of size ``d_out × d_in`` is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from .adapters import PREFIX, adapter_kernels, load_adapter, natural_key, peft_type


def frequency_blocks(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K_f for the real FFT's frequencies (F, m, n), complex128; how often each occurs among all b)``."""
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (m, n, b), got {tuple(kernel.shape)}")
    if not torch.isfinite(kernel).all():
        raise ValueError("kernel has NaN/inf values: ΔW has no rank or spectrum")
    b = kernel.shape[-1]
    blocks = torch.fft.rfft(kernel.detach().to("cpu", torch.float64), dim=-1).permute(2, 0, 1)
    counts = torch.full((blocks.shape[0],), 2, dtype=torch.long)
    counts[0] = 1  # f = 0 is its own conjugate partner ...
    if b % 2 == 0:
        counts[-1] = 1  # ... and so is f = b/2
    return blocks, counts


def _singular_values(kernel: torch.Tensor) -> torch.Tensor:
    blocks, counts = frequency_blocks(kernel)
    values = torch.linalg.svdvals(blocks).repeat_interleave(counts, dim=0).flatten()
    return values.sort(descending=True).values


def _rank(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """How many singular ``values`` exceed numpy/torch.linalg.matrix_rank's default tolerance for a dense matrix
    of ``shape`` stored in ``dtype`` (half-precision weights are exact in fp32, so fp32's eps)."""
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    tol = values.max() * max(shape) * eps if values.numel() else 0.0
    return int((values > tol).sum())


def kernel_delta_shape(kernel: torch.Tensor) -> tuple[int, int]:
    """``(d_out, d_in)`` of the ΔW a kernel ``(m, n, b)`` makes, whatever layout the adapted layer's weight has."""
    m, n, b = kernel.shape
    return m * b, n * b


def delta_singular_values(kernel: torch.Tensor) -> torch.Tensor:
    """Singular values of ``circulant_matrix(kernel)``, sorted descending, from ``b//2 + 1`` small SVDs.

    Equal to ``torch.linalg.svdvals(circulant_matrix(kernel))`` (computed in float64, returned in the
    kernel's dtype, fp32 for half precision). This is the unscaled matrix: a :class:`~c3a.C3ALinear`'s
    actual delta is ``circulant_matrix(kernel) / d_in``, so divide by ``d_in = n·b`` for its singular values
    (:func:`adapter_ranks` and ``c3a rank`` do).
    """
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    return _singular_values(kernel).to(dtype)


def delta_rank(kernel: torch.Tensor) -> int:
    """Exact ``rank(circulant_matrix(kernel))`` as ``Σ_f rank(K_f)``, without forming the matrix.

    The tolerance is ``torch.linalg.matrix_rank``'s default for the dense matrix: the largest singular value
    over all frequencies × ``max(d_out, d_in)`` × the kernel dtype's eps. The ``1/d_in`` scale of the layer
    does not change the rank.
    """
    return _rank(_singular_values(kernel), kernel_delta_shape(kernel), kernel.dtype)


@dataclass
class LayerRank:
    """Rank of one adapted layer's ``ΔW = C_blk(kernel) / d_in``; ``singular_values`` are ΔW's (descending)."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    block_size: Optional[int]  # None for a LoRA layer
    rank: int
    singular_values: torch.Tensor = field(repr=False)
    lora_rank: Optional[int] = None  # r of a LoRA layer (ΔW = scaling · B·A)

    @property
    def full_rank(self) -> bool:
        return self.rank == min(self.shape)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "block_size": self.block_size, "rank": self.rank,
               "full_rank": self.full_rank}
        return out if self.lora_rank is None else {**out, "lora_rank": self.lora_rank}


def layer_rank(name: str, kernel: torch.Tensor) -> LayerRank:
    values = _singular_values(kernel)
    shape = kernel_delta_shape(kernel)
    return LayerRank(name, shape, kernel.shape[-1], _rank(values, shape, kernel.dtype), values / shape[1])


def lora_layer_ranks(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[LayerRank]:
    """Rank and spectrum of each layer's ``ΔW = scaling · B·A`` of a PEFT LoRA adapter, for comparison with C³A.

    Computed from the factors alone: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``B·A`` has the singular values of
    the ``r×r`` matrix ``R_B R_Aᵀ``. Rank tolerance as for C³A (``matrix_rank``'s default for the dense matrix).
    DoRA adapters are refused: their delta depends on the base weight.
    """
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise ValueError("a DoRA adapter's ΔW depends on the base weight, which the adapter does not hold")
    factors = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                factors.setdefault(key.removeprefix(PREFIX)[: -len(f".{part}.weight")], {})[part] = value
    layers = []
    for name, f in factors.items():
        if set(f) != {"lora_A", "lora_B"} or f["lora_A"].dim() != 2:
            continue  # embedding or convolution LoRA layers: not linear maps of this form
        a, b = f["lora_A"].detach().double(), f["lora_B"].detach().double()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"the adapter's LoRA factors hold NaN/inf values in layer {name}")
        r = a.shape[0]
        alphas = config.get("alpha_pattern") or {}
        alpha = alphas.get(get_pattern_key(list(alphas), name), config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        values = torch.linalg.svdvals(torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T) * abs(scaling)  # descending
        shape = (b.shape[0], a.shape[1])
        layers.append(LayerRank(name, shape, None, _rank(values, shape, f["lora_A"].dtype), values, r))
    if not layers:
        raise ValueError("no LoRA factors (keys ending in .lora_A.weight / .lora_B.weight) in the adapter")
    return sorted(layers, key=lambda layer: natural_key(layer.name))


def adapter_ranks(source: Any, adapter_name: str = "default") -> list[LayerRank]:
    """Exact rank and spectrum of every adapted layer's ΔW (see :func:`load_adapter` for ``source``), for C³A
    adapters and, for comparison, PEFT LoRA adapters (:func:`lora_layer_ranks`)."""
    config, state = load_adapter(source, adapter_name, peft_types=("C3A", "LORA"))
    if peft_type(config) == "LORA":
        return lora_layer_ranks(config, state)
    return [layer_rank(name, kernel) for name, kernel in adapter_kernels(state).items()]
