"""LoRA export: the best rank-``R`` ``B·A`` of each C³A layer's ΔW, written as a PEFT LoRA adapter.

Truncating per frequency is optimal for the dense matrix because ΔW is unitarily similar to the block-diagonal
matrix of its frequency blocks (:mod:`c3a.rank`); nothing of size ``d_out × d_in`` is formed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .adapters import KERNEL_SUFFIX, PREFIX, adapter_kernels, load_adapter
from .io import atomic_path, atomic_write_text
from .rank import frequency_blocks, kernel_delta_shape, layer_rank


class LowRank(NamedTuple):
    A: torch.Tensor  # (R, d_in)
    B: torch.Tensor  # (d_out, R)
    relative_error: float  # ‖scale·C − B·A‖_F / ‖scale·C‖_F, the Eckart–Young optimum


def low_rank_factors(kernel: torch.Tensor, rank: int, scale: float = 1.0) -> LowRank:
    """The best rank-``rank`` approximation ``B·A`` of ``scale · circulant_matrix(kernel)`` (Frobenius).

    Truncated SVD done per frequency: each ``conj(K_f)`` is decomposed and the globally largest ``rank``
    singular values are kept. A singular triplet ``(s, a, v)`` of a frequency ``f ∉ {0, b/2}`` meets its
    conjugate at ``b - f``; the two add up to ``2s·Re(a vᴴ) = s·(√2 Re a)(√2 Re v)ᵀ + s·(√2 Im a)(√2 Im v)ᵀ``,
    two real triplets with the same ``s`` (``Re a ⟂ Im a``, each of norm ``1/√2``). So every real singular
    triplet of the dense matrix is available, and a cut between the two halves of a pair is still optimal.
    ``f = 0`` and ``b/2`` have real blocks and real vectors. ``s`` is split evenly between ``B`` and ``A``;
    ranks beyond ``min(d_out, d_in)`` are zero-padded.
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    m, n, b = kernel.shape
    blocks, counts = frequency_blocks(kernel)
    blocks = blocks.conj()  # the matrix applies conj(K_f): a cross-correlation
    paired = counts == 2
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    # Self-conjugate frequencies: a real SVD, so the vectors carry no arbitrary complex phase.
    Ur, Sr, Vhr = torch.linalg.svd(blocks[~paired].real, full_matrices=False)
    U[~paired], S[~paired], Vh[~paired] = Ur.to(U.dtype), Sr, Vhr.to(Vh.dtype)

    F, k = S.shape
    freq = torch.arange(F).repeat_interleave(k)
    index = torch.arange(k).repeat(F)
    values = S.flatten()
    second = paired[freq]  # the imaginary halves of the pairs, listed after all real ones
    freq, index = torch.cat([freq, freq[second]]), torch.cat([index, index[second]])
    imag = torch.cat([torch.zeros(values.numel(), dtype=torch.bool), torch.ones(int(second.sum()), dtype=torch.bool)])
    values = torch.cat([values, values[second]])
    order = torch.argsort(values, descending=True, stable=True)
    keep, drop = order[:rank], order[rank:]
    total = values.square().sum()
    error = float((values[drop].square().sum() / total).sqrt()) if total > 0 else 0.0

    f, j, s = freq[keep], index[keep], values[keep]
    phase = torch.exp(2j * math.pi * f[:, None] * torch.arange(b)[None, :] / b) / math.sqrt(b)  # conj(e_f)
    left = (U[f, :, j][:, :, None] * phase[:, None, :]).reshape(-1, m * b)
    right = (Vh[f, j, :].conj()[:, :, None] * phase[:, None, :]).reshape(-1, n * b)
    gain = torch.where(paired[f], math.sqrt(2.0), 1.0)[:, None]
    left = gain * torch.where(imag[keep][:, None], left.imag, left.real)
    right = gain * torch.where(imag[keep][:, None], right.imag, right.real)
    root = (s * scale).sqrt()[:, None]
    A = torch.zeros(rank, n * b, dtype=torch.float64)
    B = torch.zeros(m * b, rank, dtype=torch.float64)
    A[: len(keep)] = root * right
    B[:, : len(keep)] = (root * left).T
    return LowRank(A.float(), B.float(), error)


LORA_BIAS = {"none": "none", "all": "all", "c3a_only": "lora_only"}


@dataclass
class LoraExport:
    """A PEFT LoRA adapter (``config``: ``adapter_config.json``; ``state_dict``: PEFT's key names)."""

    config: dict
    state_dict: dict[str, torch.Tensor]
    layers: list[dict]  # per adapted layer: name, shape, rank of ΔW, relative_error, exact

    def save_pretrained(self, directory: str) -> None:
        """Write the adapter so that ``directory`` always holds one complete save or none that loads.

        Writers take an exclusive lock on ``directory`` itself (two exports into one folder run one after the other,
        and no lock file is left behind); the old config is removed first, each file is written atomically, the
        config last: a crash leaves either the previous adapter, or weights without a config (which PEFT refuses to load), never a
        config beside weights of another save.
        """
        import fcntl

        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        lock = os.open(directory, os.O_RDONLY)  # flock on the folder's own descriptor: released when it closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            config_path = os.path.join(directory, CONFIG_NAME)
            if os.path.exists(config_path):
                os.remove(config_path)
            if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):  # PEFT would load it if ours went missing
                os.remove(os.path.join(directory, WEIGHTS_NAME))
            with atomic_path(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)) as tmp:
                save_file({k: v.contiguous() for k, v in self.state_dict.items()}, tmp, metadata={"format": "pt"})
            atomic_write_text(config_path, json.dumps(self.config, indent=2, sort_keys=True))
        finally:
            os.close(lock)


def to_lora(source: Any, rank: int, adapter_name: str = "default", progress: bool = False) -> LoraExport:
    """A PEFT LoRA adapter of rank ``rank`` whose ``B·A`` is the best rank-``rank`` approximation of each ΔW.

    ``source`` as in :func:`load_adapter`. ``lora_alpha = r`` (scaling 1); ``lora_A.weight`` is ``(r, d_in)``,
    ``lora_B.weight`` ``(d_out, r)``. The adapter's other tensors (``modules_to_save`` such as a classifier,
    trained biases) are carried over under the same keys, with LoRA's matching ``bias`` setting, so the
    export reproduces the C³A model exactly when ``rank`` ≥ every layer's rank. Save it with
    ``.save_pretrained(dir)``; load it with ``peft.PeftModel.from_pretrained(base_model, dir)``.
    """
    from peft import LoraConfig
    from tqdm.auto import tqdm

    config, state = load_adapter(source, adapter_name)
    kernels = adapter_kernels(state)
    out = {k: v for k, v in state.items() if not k.endswith(KERNEL_SUFFIX)}
    layers = []
    for name, kernel in tqdm(kernels.items(), desc="layers", disable=not progress):
        d_in = kernel_delta_shape(kernel)[1]
        factors = low_rank_factors(kernel, rank, scale=1.0 / d_in)
        out[f"{PREFIX}{name}.lora_A.weight"] = factors.A
        out[f"{PREFIX}{name}.lora_B.weight"] = factors.B
        info = layer_rank(name, kernel)
        layers.append({**info.to_dict(), "relative_error": factors.relative_error, "exact": rank >= info.rank})
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(kernels),
        bias=LORA_BIAS[config.get("bias", "none")],
        modules_to_save=config.get("modules_to_save"),
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        inference_mode=True,
    ).to_dict()
    lora = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.items()}
    return LoraExport(json.loads(json.dumps(lora)), out, layers)
