"""One registry of fine-tuning methods: C³A (ours), PEFT's baselines, and the classic ones.

``build_method(model, name, options)`` freezes what the method freezes, injects what it injects and
returns the model to train. Experiments only ever go through this module; no method knows about them.
A method is one :class:`Method` entry of :data:`METHODS`: its builder, its defaults and grids, the suites it is a
default row of, and its time/space terms per adapted layer (paper Table 1, for ``c3a params``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:  # the registry itself needs no torch: `c3a <command> --help` lists the methods without it
    from torch import nn


@dataclass
class MethodOptions:
    """Knobs shared by all experiments. ``None`` means the method's or the model's default."""

    targets: Optional[list[str]] = None  # adapted modules; default: PEFT's per-model-type default
    head: list[str] = field(default_factory=list)  # task head trained by every method, excluded from counts
    block_size: object = "auto"  # C³A block size: an int, or "auto" (per layer, LoRA rank `rank`'s budget)
    rank: int = 8  # LoRA / VeRA rank
    alpha: Optional[float] = None  # LoRA alpha (default: 2·rank)
    dropout: float = 0.0  # LoRA dropout
    boft_block_size: int = 8
    boft_butterfly_factor: int = 1
    init_weights: object = "xavier_uniform"  # C³A kernel init


Grid = tuple[tuple[str, tuple[str, ...]], ...]  # (command-line option, values) pairs


@dataclass(frozen=True)
class Defaults:
    """A method's defaults in one kind of experiment."""

    lr: float  # learning rate of the method's own parameters
    weight_decay: float = 0.0
    grid: Grid = ()  # what a suite row that sets no lr chooses from on validation: (option, values)
    options: tuple[tuple[str, object], ...] = ()  # MethodOptions fields the setting changes, e.g. (("rank", 32),)


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
    options: tuple[str, ...] = ()  # the MethodOptions fields the terms depend on, reported with the counts


PAPER = "paper, Table 1"

# Counts trainable parameters per layer from {name: (d_in, d_out)}, for a method the meta device cannot build.
ShapeCount = Callable[[Mapping[str, tuple[int, int]], MethodOptions], dict[str, int]]


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, MethodOptions], nn.Module]
    lr: float  # default learning rate for the method's own parameters (sequence classification, `c3a glue`)
    weight_decay: float
    summary: str
    head_lr: Optional[float] = None  # default learning rate for the task head; None: the same as lr
    # default grid of a suite row that sets no lr: (`c3a glue` option, values), chosen per task on validation
    grid: Grid = ()
    causal_lm: Optional[Defaults] = None  # instruction tuning a causal LM (`c3a sft`), where it differs
    trains: bool = True  # False: the model is evaluated as built (the untuned floor)
    complexity: Optional[Complexity] = None  # Table 1's terms; `c3a params` offers the methods that have them
    count_from_shapes: Optional[ShapeCount] = None  # None: counted on the model built on the meta device
    # (suite, row): the method is a default row of that suite's table (`c3a glue-suite`), at that position
    default_rows: tuple[tuple[str, int], ...] = ()

    def defaults(self, setting: str = "classification") -> Defaults:
        """The defaults of ``setting``: ``"classification"`` (the fields above) or ``"causal-lm"``."""
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
        if setting == "causal-lm" and self.causal_lm is not None:
            return self.causal_lm
        return Defaults(self.lr, self.weight_decay, self.grid)


SETTINGS = ("classification", "causal-lm")


def default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(f"no default target modules for model type {model_type!r}; pass targets explicitly")
    return list(defaults[model_type])


def _targets(model: nn.Module, opts: MethodOptions) -> list[str]:
    return list(opts.targets) if opts.targets else default_targets(model)


def _set_trainable(model: nn.Module, keep: Callable[[str], bool]) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
    return model


def is_head_param(name: str, head: list[str]) -> bool:
    parts = name.split(".")
    return any(h in parts for h in head)


def _peft(config_factory, reference: bool = False):
    """Build through ``peft.get_peft_model``; ``reference``: with PEFT's own C3A tuner instead of c3a's."""

    def build(model, opts):
        from peft import get_peft_model

        from c3a import peft_reference

        config = config_factory(model, opts)
        config.modules_to_save = list(opts.head) or None
        with peft_reference() if reference else nullcontext():
            return get_peft_model(model, config)

    return build


def check_block_size(model: nn.Module, targets: list[str], block_size) -> None:
    """Refuse an integer C³A block size that does not divide some target's sizes: one sentence per distinct layer
    shape (a model repeats the same few shapes many times), naming the valid sizes."""
    if block_size == "auto":
        return
    from c3a.blocksize import target_shapes
    from c3a.layer import block_size_problem, common_divisors

    misfits: dict[tuple[int, int], list[str]] = {}
    for name, (d_in, d_out) in target_shapes(model, targets).items():
        if block_size_problem(block_size, d_in, d_out):
            misfits.setdefault((d_in, d_out), []).append(name)
    if misfits:
        raise ValueError(f"block size {block_size} does not fit " + "; ".join(
            f"{len(names)} layer(s) of {d_in}→{d_out} (e.g. {names[0]}): valid block sizes {common_divisors(d_in, d_out)}"
            for (d_in, d_out), names in misfits.items()))


def _c3a(model, opts):
    from c3a import C3AConfig

    check_block_size(model, _targets(model, opts), opts.block_size)
    return C3AConfig(
        block_size=opts.block_size,
        lora_rank=opts.rank if opts.block_size == "auto" else None,  # "auto" matches LoRA rank r's budget
        target_modules=_targets(model, opts),
        init_weights=opts.init_weights,
    )


def _lora(model, opts):
    from peft import LoraConfig

    alpha = opts.alpha if opts.alpha is not None else 2 * opts.rank
    return LoraConfig(r=opts.rank, lora_alpha=alpha, lora_dropout=opts.dropout, target_modules=_targets(model, opts))


def _vera(model, opts):
    from peft import VeraConfig

    return VeraConfig(r=opts.rank, target_modules=_targets(model, opts))


def _boft(model, opts):
    from peft import BOFTConfig

    return BOFTConfig(
        boft_block_size=opts.boft_block_size,
        boft_n_butterfly_factor=opts.boft_butterfly_factor,
        target_modules=_targets(model, opts),
    )


def _boft_count(shapes: Mapping[str, tuple[int, int]], opts: MethodOptions) -> dict[str, int]:
    """What PEFT's BOFT trains per layer: ``m`` butterfly factors of ``d_in/s`` blocks ``s×s`` (``boft_R``) and one
    scale per output (``boft_s``). Counted, not built: PEFT builds dense ``d_in × d_in`` permutation matrices with
    ``.item()`` calls that the meta device cannot run (and drops to ``m = 1`` when its CUDA extension is missing)."""
    s, m = opts.boft_block_size, opts.boft_butterfly_factor
    for name, (d_in, _) in shapes.items():
        if d_in % (s * 2 ** (m - 1)):
            raise ValueError(f"BOFT block size {s} does not fit {name} (in_features={d_in})")
    return {name: m * d_in * s + d_out for name, (d_in, d_out) in shapes.items()}


def _ia3(model, opts):
    from peft import IA3Config

    return IA3Config(target_modules=_targets(model, opts), feedforward_modules=[])


def _peft_c3a(model, opts):
    from peft import C3AConfig as PeftC3AConfig

    from c3a.blocksize import as_block_size_config, choose_block_sizes, target_shapes

    targets = _targets(model, opts)
    check_block_size(model, targets, opts.block_size)
    block_size, pattern = opts.block_size, {}
    if block_size == "auto":  # PEFT's C3A has no "auto": the same per-layer sizes c3a's tuner would choose
        chosen = choose_block_sizes(target_shapes(model, targets), lora_rank=opts.rank)
        block_size, pattern = as_block_size_config({name: c.block_size for name, c in chosen.items()})
    init = True if opts.init_weights == "zeros" else opts.init_weights  # PEFT's spelling of a zero init
    return PeftC3AConfig(block_size=block_size, block_size_pattern=pattern, target_modules=targets, init_weights=init)


def _bitfit(model, opts):
    return _set_trainable(model, lambda n: n.endswith("bias") or is_head_param(n, opts.head))


def _head(model, opts):
    if not opts.head:
        raise ValueError("method 'head' needs the names of the head modules (MethodOptions.head)")
    return _set_trainable(model, lambda n: is_head_param(n, opts.head))


def _full(model, opts):
    return _set_trainable(model, lambda n: True)


def _none(model, opts):
    return _set_trainable(model, lambda n: False)


def _grid(option: str, *values: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return ((option, values),)


# Learning rates: `grid` is what a suite row without lr chooses from on validation, `lr` the single-run default.
# Sequence classification (the fields of each entry): the grids and single-run `lr`s come from an early
# learning-rate probe (all-MiniLM-L6-v2 on SST-2, MRPC and CoLA; each method's best and the two values below it
# on the ×3 ladder; the single-run value the one least far from the best across settings). Those runs are not
# stored, so they are defaults, not results: the suite selects on validation over the grid (docs/experiments.md).
# The task head trains at 4e-3 for every method, so heads are treated alike; `head` alone tunes the head's rate.
HEAD_LR = 4e-3
# Instruction tuning a causal LM (`causal_lm`): the paper's Table-3 setting. LoRA r=32 with dropout 0.05; C³A at
# most half of that LoRA's parameters (per layer within LoRA r=16's r·(d_in+d_out)), its kernels starting at zero so
# that both start from the pretrained model. The grids are the Table-3 run's (docs/runs/table3-smollm2/run.sh; the
# suite extends an edge). The single-run point, one rule for both methods: the point that run chose on validation
# (SmolLM2-135M-Instruct, seed 0, validation loss) on the most of its finished datasets. C³A: lr 3 on SQL and on
# ViGGO (0.150 and 0.029; the 0.3 used before: 0.188 and 0.102). LoRA: α = 128 at lr 3e-3 on SQL (0.144; α = 64 at
# 1e-3, used before: 0.177), ViGGO's row being unfinished. Both carry over to fp32, `c3a sft`'s default precision
# (docs/runs/sft-defaults-fp32: SQL validation loss 0.162 / 0.150, test 0.27 / 0.38 against bf16's 0.150 / 0.144,
# 0.28 / 0.39).
CAUSAL_LM_C3A = Defaults(3.0, 0.0, _grid("lr", "0.03", "0.1", "0.3"), (("rank", 16), ("init_weights", "zeros")))
CAUSAL_LM_LORA = Defaults(3e-3, 0.0, _grid("lr", "1e-4", "3e-4", "1e-3"),
                          (("rank", 32), ("alpha", 128.0), ("dropout", 0.05)))
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("c3a", _peft(_c3a), 0.3, 1e-4, "C³A block-circulant adapter (this library)", HEAD_LR,
               _grid("lr", "0.1", "0.3", "1"), CAUSAL_LM_C3A,
               complexity=Complexity("(d1+d2)·log2(b) + d1·d2/b", "d1·d2/b", PAPER,
                                     lambda d1, d2, k: (d1 + d2) * math.log2(k["b"]) + d1 * d2 / k["b"],
                                     lambda d1, d2, k: d1 * d2 / k["b"], options=("block_size",)),
               default_rows=(("glue", 7), ("sft", 3))),
        Method("lora", _peft(_lora), 1e-3, 0.0, "LoRA (PEFT)", HEAD_LR, _grid("lr", "3e-4", "1e-3", "3e-3"),
               CAUSAL_LM_LORA,
               complexity=Complexity("r·(d1+d2)", "r·(d1+d2)", PAPER, lambda d1, d2, k: k["r"] * (d1 + d2),
                                     lambda d1, d2, k: k["r"] * (d1 + d2), options=("rank",)),
               default_rows=(("glue", 4), ("sft", 2))),
        Method("vera", _peft(_vera), 3e-2, 0.0, "VeRA (PEFT)", HEAD_LR, _grid("lr", "1e-2", "3e-2", "1e-1"),
               complexity=Complexity("r·(d1+d2)", "d1 + r",
                                     PAPER + "; the frozen random matrices are shared and not trained",
                                     lambda d1, d2, k: k["r"] * (d1 + d2), lambda d1, d2, k: d1 + k["r"],
                                     options=("rank",)),
               default_rows=(("glue", 5),)),
        Method("boft", _peft(_boft), 3e-4, 0.0, "BOFT (PEFT; not probed)", HEAD_LR,
               complexity=Complexity("m·d2·s + d1", "m·d2·s + d1",
                                     "not in the paper's table: m butterfly factors of d2/s blocks (s×s) applied to "
                                     "a token, then one scale per output; PEFT stores the full s×s blocks",
                                     lambda d1, d2, k: k["m"] * d2 * k["s"] + d1,
                                     lambda d1, d2, k: k["m"] * d2 * k["s"] + d1,
                                     options=("boft_block_size", "boft_butterfly_factor")),
               count_from_shapes=_boft_count, default_rows=(("glue", 6),)),
        Method("ia3", _peft(_ia3), 3e-2, 0.0, "(IA)³ (PEFT)", HEAD_LR, _grid("lr", "1e-2", "3e-2", "1e-1"),
               complexity=Complexity("d1", "d1", "not in the paper's table: one scale per output",
                                     lambda d1, d2, k: d1, lambda d1, d2, k: d1),
               default_rows=(("glue", 3),)),
        Method("peft-c3a", _peft(_peft_c3a, reference=True), 0.3, 1e-4, "PEFT's C3A tuner (reference implementation)",
               HEAD_LR, _grid("lr", "0.1", "0.3", "1"), CAUSAL_LM_C3A),
        Method("bitfit", _bitfit, 1e-3, 0.0, "BitFit: biases only", HEAD_LR, _grid("lr", "3e-4", "1e-3", "3e-3"),
               complexity=Complexity("0", "d1", "not in the paper's table: the layer's bias, which is added anyway",
                                     lambda d1, d2, k: 0, lambda d1, d2, k: d1),
               default_rows=(("glue", 2),)),
        Method("head", _head, 1e-2, 0.0, "the task head only", 1e-2, _grid("head-lr", "1e-3", "3e-3", "1e-2")),
        Method("full", _full, 1e-4, 0.01, "full fine-tuning", HEAD_LR, _grid("lr", "1e-5", "3e-5", "1e-4"),
               complexity=Complexity("0", "d1·d2", "not in the paper's table: the weight itself is trained",
                                     lambda d1, d2, k: 0, lambda d1, d2, k: d1 * d2),
               default_rows=(("glue", 1),)),
        Method("none", _none, 0.0, 0.0, "the pretrained model as it is, nothing trained (the floor)", trains=False,
               default_rows=(("sft", 1),)),
    ]
}


def build_method(model: nn.Module, name: str, options: Optional[MethodOptions] = None) -> nn.Module:
    """Prepare ``model`` for training with method ``name``; returns the (possibly wrapped) model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name].build(model, options or MethodOptions())


def default_methods(suite: str) -> tuple[str, ...]:
    """The methods whose entries make them default rows of ``suite``'s table (e.g. ``"glue"``), in row order."""
    rows = sorted((row, m.name) for m in METHODS.values() for name, row in m.default_rows if name == suite)
    return tuple(name for _, name in rows)


def trainable_parameters(model: nn.Module, head: list[str] = ()) -> int:
    """Trainable parameters, the task head excluded (as the paper counts them)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not is_head_param(n, list(head)))
