"""Analysis of C³A adapters: exact rank and spectrum of ΔW, parameter and complexity counts, block-size
advice, and export to a PEFT LoRA adapter.

Everything spectral rests on one fact. With ``K_f`` the ``m×n`` matrix of the kernels' DFT coefficients at
frequency ``f`` (``K_f[i, j] = FFT(kernel[i, j])[f]``), the block-circulant ``C_blk(kernel)`` is unitarily
similar to the block-diagonal matrix of the ``conj(K_f)``, ``f = 0..b-1``::

    C_blk(kernel) = Σ_f (I_m ⊗ ē_f) conj(K_f) (I_n ⊗ e_fᵀ),   e_f[c] = exp(-2πi·f·c/b) / √b

so its singular values are those of all ``K_f`` together and ``rank = Σ_f rank(K_f)``. For a real kernel
``K_{b-f} = conj(K_f)``: only the ``b//2 + 1`` blocks of the real FFT are decomposed, the others counted twice.
Nothing of size ``d_out × d_in`` is ever formed.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights

from .config import C3AConfig
from .io import CHECKPOINT_KEY, IncompleteCheckpointError, atomic_path, atomic_write_text, read_weights, verify_checkpoint
from .layer import c3a_layers, common_divisors, targeted_shapes

PREFIX = "base_model.model."  # PEFT's key prefix in adapter files

KERNEL_SUFFIX = ".c3a_kernel"
DEFAULT_LORA_RANK = 8  # block_size="auto" with no budget matches LoRA r=8, the paper's usual baseline
HEAD_MODULES = ["pooler"]  # pre-training heads of bare encoders; never trained for the paper's tasks

# -- spectrum and rank ------------------------------------------------------------------------------------


def _frequency_blocks(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    blocks, counts = _frequency_blocks(kernel)
    values = torch.linalg.svdvals(blocks).repeat_interleave(counts, dim=0).flatten()
    return values.sort(descending=True).values


def _rank(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """How many singular ``values`` exceed numpy/torch.linalg.matrix_rank's default tolerance for a dense matrix
    of ``shape`` stored in ``dtype`` (half-precision weights are exact in fp32, so fp32's eps)."""
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    tol = values.max() * max(shape) * eps if values.numel() else 0.0
    return int((values > tol).sum())


def _delta_shape(kernel: torch.Tensor) -> tuple[int, int]:
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
    return _rank(_singular_values(kernel), _delta_shape(kernel), kernel.dtype)


# -- adapters on disk or in memory ------------------------------------------------------------------------


def _peft_type(config: Mapping[str, Any]) -> str:
    """An adapter config's ``peft_type`` as a string (a ``PeftType`` in memory, a string on disk; C3A if absent)."""
    value = config.get("peft_type", "C3A")
    return str(getattr(value, "value", value))


def _check_type(config: dict, where: str, peft_types: tuple[str, ...]) -> None:
    peft_type = _peft_type(config)
    if peft_type not in peft_types:
        raise ValueError(f"{where} is a {peft_type} adapter, not {' or '.join(peft_types)}")


def load_adapter(
    source: Any, adapter_name: str = "default", peft_types: tuple[str, ...] = ("C3A",)
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter config as a dict, state dict with PEFT's key names)`` of a C³A adapter (or of another of
    ``peft_types``).

    ``source`` is a ``peft.PeftModel`` with C³A adapters (its adapter ``adapter_name``), a folder written by
    ``save_pretrained`` (a non-default adapter's sub-folder may be passed directly), or a hub id.
    """
    if isinstance(source, nn.Module):
        from peft import get_peft_model_state_dict

        configs = getattr(source, "peft_config", {})
        if adapter_name not in configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(configs)}")
        _check_type(configs[adapter_name].to_dict(), f"adapter {adapter_name!r}", peft_types)
        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
        if not state.keys() or next(iter(state)).startswith(PREFIX):  # a PeftModel; a bare tuned model lacks the prefix
            return configs[adapter_name].to_dict(), state
        return configs[adapter_name].to_dict(), {PREFIX + k: v for k, v in state.items()}
    path = _adapter_folder(str(source))
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = f"; adapters in its sub-folders: {', '.join(subs)} (pass one of them)" if subs else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}{hint}")
    config = C3AConfig.from_json_file(os.path.join(path, CONFIG_NAME))  # a cut file: IncompleteCheckpointError
    if not isinstance(config, dict):
        raise IncompleteCheckpointError(f"{os.path.join(path, CONFIG_NAME)} is not an adapter config (not a JSON object)")
    _check_type(config, path, peft_types)
    if not any(os.path.isfile(os.path.join(path, w)) for w in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} in {path}")
    checked = verify_checkpoint(path, config.pop(CHECKPOINT_KEY, None))  # one save, or a mixed/partial error
    if checked is not None:
        return config, read_weights(checked)
    try:
        return config, load_peft_weights(path, device="cpu")
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:
        raise IncompleteCheckpointError(f"{path}: the adapter weights cannot be read ({type(e).__name__}: {e}): a "
                                        "partial or damaged save") from None


def _looks_like_path(source: str) -> bool:
    """A source meant as a local path rather than a hub id (``org/name`` or ``name``)."""
    if os.path.isabs(source) or source.startswith(("./", "../", "~", "." + os.sep, ".." + os.sep)) or source in (".", ".."):
        return True
    if source.endswith(("/", os.sep)) or "\\" in source or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def _adapter_folder(source: str) -> str:
    """``source`` as a local folder, fetching a hub id's adapter files."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise NotADirectoryError(f"{source} is a file; pass the adapter folder")
    if _looks_like_path(source):
        raise FileNotFoundError(f"adapter folder {source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=[CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME])
    except Exception as e:  # not a folder here, and not fetchable as a hub id
        raise FileNotFoundError(f"{source} is not an adapter folder, nor an adapter on the hub: {e}") from None


def adapter_kernels(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: kernel}`` from an adapter state dict (keys ``base_model.model.<module>.c3a_kernel``);
    ``ValueError`` naming the layers whose kernels hold NaN/inf values."""
    kernels = {k.removeprefix(PREFIX)[: -len(KERNEL_SUFFIX)]: v for k, v in state.items() if k.endswith(KERNEL_SUFFIX)}
    if not kernels:
        raise ValueError(f"no C3A kernels (keys ending in {KERNEL_SUFFIX!r}) in the adapter")
    bad = [name for name, k in kernels.items() if not torch.isfinite(k).all()]
    if bad:
        raise ValueError(f"the adapter's kernels hold NaN/inf values in {len(bad)} layer(s): {', '.join(bad)}")
    return kernels


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
    m, n, b = kernel.shape
    values = _singular_values(kernel)
    shape = _delta_shape(kernel)
    return LayerRank(name, shape, b, _rank(values, shape, kernel.dtype), values / (n * b))


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
    return layers


def adapter_ranks(source: Any, adapter_name: str = "default") -> list[LayerRank]:
    """Exact rank and spectrum of every adapted layer's ΔW (see :func:`load_adapter` for ``source``), for C³A
    adapters and, for comparison, PEFT LoRA adapters (:func:`lora_layer_ranks`)."""
    config, state = load_adapter(source, adapter_name, peft_types=("C3A", "LORA"))
    if _peft_type(config) == "LORA":
        return lora_layer_ranks(config, state)
    return [layer_rank(name, kernel) for name, kernel in adapter_kernels(state).items()]


# -- best low-rank approximation and LoRA export ----------------------------------------------------------


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
    blocks, counts = _frequency_blocks(kernel)
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

        Writers take an exclusive lock on ``directory/.c3a-save.lock`` (two exports into one folder run one after
        the other); the old config is removed first, each file is written atomically, the config last: a crash
        leaves either the previous adapter, or weights without a config (which PEFT refuses to load), never a
        config beside weights of another save.
        """
        import fcntl

        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, ".c3a-save.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            config_path = os.path.join(directory, CONFIG_NAME)
            if os.path.exists(config_path):
                os.remove(config_path)
            if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):  # PEFT would load it if ours went missing
                os.remove(os.path.join(directory, WEIGHTS_NAME))
            with atomic_path(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)) as tmp:
                save_file({k: v.contiguous() for k, v in self.state_dict.items()}, tmp, metadata={"format": "pt"})
            atomic_write_text(config_path, json.dumps(self.config, indent=2, sort_keys=True))


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
        d_in = kernel.shape[1] * kernel.shape[2]
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


# -- block-size advice ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSizeChoice:
    block_size: int
    params: int  # d_in·d_out / block_size
    allowance: float  # this layer's parameter allowance
    reason: str


def choose_block_sizes(
    shapes: Mapping[str, tuple[int, int]], budget: Optional[int] = None, lora_rank: Optional[int] = None
) -> dict[str, BlockSizeChoice]:
    """Per layer ``{name: (d_in, d_out)}``, the smallest common divisor ``b`` whose ``d_in·d_out/b`` fits.

    A smaller ``b`` means more parameters, so this is the most expressive C³A within the allowance:

    * ``lora_rank=r``: each layer may have what LoRA rank ``r`` gives it, ``r·(d_in + d_out)``;
    * ``budget=N``: a total for all layers, shared in proportion to ``d_in + d_out`` (as LoRA shares it),
      i.e. the fractional rank ``N / Σ(d_in + d_out)``; the total then never exceeds ``N``;
    * neither: ``lora_rank=8`` (:data:`DEFAULT_LORA_RANK`).

    Raises ``ValueError`` when a layer cannot fit even at its largest block size ``gcd(d_in, d_out)``.
    """
    if budget is not None and lora_rank is not None:
        raise ValueError("give at most one of budget and lora_rank")
    for label, value in (("budget", budget), ("lora_rank", lora_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not shapes:
        return {}
    if budget is None:
        lora_rank = lora_rank or DEFAULT_LORA_RANK
    total = sum(d_in + d_out for d_in, d_out in shapes.values())
    chosen = {}
    for name, (d_in, d_out) in shapes.items():
        # The allowance as an exact fraction num/den, so that d_in·d_out/b ≤ num/den is tested in integers.
        if budget is None:
            num, den = lora_rank * (d_in + d_out), 1
            why = f"LoRA r={lora_rank}'s r·(d_in+d_out) = {num:,}"
        else:
            num, den = budget * (d_in + d_out), total
            why = f"this layer's share {num / den:,.0f} of the budget {budget:,} (split by d_in+d_out)"
        fits = [b for b in common_divisors(d_in, d_out) if d_in * d_out * den <= num * b]
        if not fits:
            largest = math.gcd(d_in, d_out)
            raise ValueError(
                f"{name} ({d_in}→{d_out}) needs at least {d_in * d_out // largest:,} parameters (block size "
                f"{largest}), more than {why}"
            )
        b = fits[0]
        smaller = [d for d in common_divisors(d_in, d_out) if d < b]
        reason = f"smallest common divisor of {d_in} and {d_out} with d_in·d_out/b = {d_in * d_out // b:,} ≤ {why}"
        if smaller:
            reason += f"; b={smaller[-1]} would need {d_in * d_out // smaller[-1]:,}"
        chosen[name] = BlockSizeChoice(b, d_in * d_out // b, num / den, reason)
    return chosen


def as_block_size_config(sizes: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """Per-layer block sizes as PEFT's C3A config spells them: ``(block_size, block_size_pattern)``, the most
    common size the default and the others by full module name (which PEFT's pattern matching takes too)."""
    default = Counter(sizes.values()).most_common(1)[0][0]
    return default, {name: b for name, b in sizes.items() if b != default}


def target_shapes(
    model: nn.Module, target_modules: Optional[Union[list[str], str]] = None
) -> dict[str, tuple[int, int]]:
    """``{name: (d_in, d_out)}`` of the layers C³A would adapt (PEFT's matching; its default targets when ``None``)."""
    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(f"no default target modules for model type {model_type!r}; name the layers to adapt")
        target_modules = list(defaults[model_type])
    config = C3AConfig(target_modules=target_modules)
    shapes = targeted_shapes(model, config)
    if not shapes:
        raise ValueError(f"target_modules {config.target_modules!r} match no module of the model")
    return shapes


def suggest_block_size(
    model: nn.Module,
    target_modules: Optional[Union[list[str], str]] = None,
    *,
    budget: Optional[int] = None,
    lora_rank: Optional[int] = None,
) -> dict[str, int]:
    """``{layer name: block size}`` for ``model``'s targets (PEFT's defaults when ``None``); the rule is
    :func:`choose_block_sizes`'s. ``C3AConfig(block_size="auto", budget=..., lora_rank=...)`` uses the same."""
    shapes = target_shapes(model, target_modules)
    return {name: c.block_size for name, c in choose_block_sizes(shapes, budget, lora_rank).items()}


# -- parameter and complexity counts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Complexity:
    """Extra work per token a method adds to one adapted ``d1×d2`` layer (``d1`` out, ``d2`` in), and the
    trainable parameters it keeps there: formulas as text and as functions of ``(d1, d2, k)``, with ``k``
    holding ``b`` (C³A block size), ``r`` (rank), ``s``/``m`` (BOFT block size / butterfly factors)."""

    time: str
    space: str
    source: str
    time_of: Callable[[int, int, dict], float] = field(repr=False)
    space_of: Callable[[int, int, dict], float] = field(repr=False)


PAPER = "paper, Table 1"
COMPLEXITY: dict[str, Complexity] = {
    "c3a": Complexity("(d1+d2)·log2(b) + d1·d2/b", "d1·d2/b", PAPER,
                      lambda d1, d2, k: (d1 + d2) * math.log2(k["b"]) + d1 * d2 / k["b"],
                      lambda d1, d2, k: d1 * d2 / k["b"]),
    "lora": Complexity("r·(d1+d2)", "r·(d1+d2)", PAPER,
                       lambda d1, d2, k: k["r"] * (d1 + d2), lambda d1, d2, k: k["r"] * (d1 + d2)),
    "vera": Complexity("r·(d1+d2)", "d1 + r", PAPER + "; the frozen random matrices are shared and not trained",
                       lambda d1, d2, k: k["r"] * (d1 + d2), lambda d1, d2, k: d1 + k["r"]),
    "boft": Complexity("m·d2·s + d1", "m·d2·s + d1",
                       "not in the paper's table: m butterfly factors of d2/s blocks (s×s) applied to a token, "
                       "then one scale per output; PEFT stores the full s×s blocks",
                       lambda d1, d2, k: k["m"] * d2 * k["s"] + d1, lambda d1, d2, k: k["m"] * d2 * k["s"] + d1),
    "ia3": Complexity("d1", "d1", "not in the paper's table: one scale per output",
                      lambda d1, d2, k: d1, lambda d1, d2, k: d1),
    "bitfit": Complexity("0", "d1", "not in the paper's table: the layer's bias, which is added anyway",
                         lambda d1, d2, k: 0, lambda d1, d2, k: d1),
    "full": Complexity("0", "d1·d2", "not in the paper's table: the weight itself is trained",
                       lambda d1, d2, k: 0, lambda d1, d2, k: d1 * d2),
}


@dataclass
class ParamReport:
    """What ``c3a params`` prints: the total and, per adapted layer, the counted parameters and Table 1's terms."""

    model: str
    method: str
    trainable_params: int
    counted: str  # how the total was obtained
    options: dict
    complexity: Complexity
    layers: list[dict]  # name, d1, d2, params, time, space (+ block_size for C³A)
    block_size_choices: dict[str, BlockSizeChoice] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "trainable_params": self.trainable_params,
            "counted": self.counted,
            "options": self.options,
            "complexity": {"time": self.complexity.time, "space": self.complexity.space,
                           "source": self.complexity.source},
            "layers": self.layers,
            "block_size_choices": {n: {"block_size": c.block_size, "params": c.params, "reason": c.reason}
                                   for n, c in self.block_size_choices.items()},
        }


def _layer_params(model: nn.Module, name: str) -> int:
    key = f".{name}."
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and key in f".{n}.")


def count_parameters(
    model: str,
    method: str,
    block_size: Union[int, str] = "auto",
    rank: int = 8,
    targets: Optional[list[str]] = None,
    boft_block_size: int = 8,
    boft_butterfly_factor: int = 1,
) -> ParamReport:
    """Trainable parameters of ``method`` on ``model`` (a name of :data:`c3a.paper_models.PAPER_MODELS`, a
    shortcut of :data:`c3a.paper_models.MODEL_SHORTCUTS`, or anything ``AutoConfig`` loads), heads excluded, with
    Table 1's time/space terms per adapted layer.

    The bare model (``AutoModel``: no task head; its pre-training ``pooler`` is excluded too) is built on the
    meta device — no weights, no memory, no download — and the method is applied through
    :func:`c3a.experiments.methods.build_method`, so counts are the real implementations'. BOFT is the
    exception: PEFT builds dense ``d_in × d_in`` permutation matrices with ``.item()`` calls that the meta
    device cannot run, so its count is ``Σ (m·d_in·s + d_out)`` from the shapes (what PEFT trains: the
    ``boft_R`` blocks and the ``boft_s`` scale; PEFT itself drops to one butterfly factor ``m`` when its CUDA
    extension is missing). ``block_size="auto"`` picks C³A block sizes matching LoRA rank ``rank``
    (:func:`choose_block_sizes`); the choices and their reasons are in the report.
    """
    from transformers import AutoModel

    from .experiments.methods import METHODS, MethodOptions, build_method, default_targets, trainable_parameters
    from .paper_models import model_config, query_value_targets

    if method not in COMPLEXITY or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(COMPLEXITY)}")
    with torch.device("meta"):
        net = AutoModel.from_config(model_config(model))
    targets = list(targets or query_value_targets(net) or default_targets(net))
    shapes = target_shapes(net, targets)
    options = {"targets": targets}
    choices: dict[str, BlockSizeChoice] = {}
    k = {"r": rank, "s": boft_block_size, "m": boft_butterfly_factor}
    if method in ("lora", "vera"):
        options["rank"] = rank
    if method == "boft":
        options.update(boft_block_size=boft_block_size, boft_butterfly_factor=boft_butterfly_factor)
        for name, (d_in, _) in shapes.items():
            if d_in % (boft_block_size * 2 ** (boft_butterfly_factor - 1)):
                raise ValueError(f"BOFT block size {boft_block_size} does not fit {name} (in_features={d_in})")
        per_layer = {n: boft_butterfly_factor * d_in * boft_block_size + d_out for n, (d_in, d_out) in shapes.items()}
        total, counted = sum(per_layer.values()), "counted from the shapes: BOFT cannot be built on the meta device"
    else:
        opts = MethodOptions(targets=targets, block_size=block_size, rank=rank,
                             boft_block_size=boft_block_size, boft_butterfly_factor=boft_butterfly_factor)
        with torch.device("meta"):
            net = build_method(net, method, opts)
        total = trainable_parameters(net, HEAD_MODULES)
        per_layer = {n: _layer_params(net, n) for n in shapes}
        counted = "counted on the model built on the meta device through c3a.experiments.methods"
    if method == "c3a":
        options["block_size"] = block_size
        built = {name: layer.block_size["default"] for name, layer in c3a_layers(net)}
        if block_size == "auto":
            options["lora_rank"] = rank
            choices = choose_block_sizes(shapes, lora_rank=rank)
            if any(built[n] != c.block_size for n, c in choices.items()):
                raise RuntimeError(
                    f"the method registry's C³A block sizes differ from the advice for LoRA rank {rank}: "
                    "c3a.experiments.methods must pass MethodOptions.rank on as C3AConfig.lora_rank"
                )
    layers = []
    for name, (d_in, d_out) in shapes.items():
        if method == "c3a":
            k["b"] = built[name]
        time, space = COMPLEXITY[method].time_of(d_out, d_in, k), COMPLEXITY[method].space_of(d_out, d_in, k)
        row = {"name": name, "d1": d_out, "d2": d_in, "params": per_layer[name], "time": time, "space": space}
        layers.append({**row, "block_size": built[name]} if method == "c3a" else row)
    return ParamReport(model, method, total, counted, options, COMPLEXITY[method], layers, choices)
