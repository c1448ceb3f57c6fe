"""Trainable parameters of any registered method on a model, and Table 1's time/space terms per adapted layer
(what ``c3a params`` prints). The terms are the registry's (:attr:`c3a.experiments.methods.Method.complexity`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from c3a.experiments.methods import (
    METHODS, PAPER, Complexity, MethodOptions, build_method, default_targets, trainable_parameters,
)

if TYPE_CHECKING:  # imported where used: `c3a params --help` lists counted_methods() without torch
    from torch import nn

    from c3a.blocksize import BlockSizeChoice

__all__ = [
    "COMPLEXITY", "HEAD_MODULES", "PAPER", "Complexity", "ParamReport", "count_parameters", "counted_methods",
]

HEAD_MODULES = ["pooler"]  # pre-training heads of bare encoders; never trained for the paper's tasks


def counted_methods() -> list[str]:
    """The registry's methods that have Table 1's terms: those ``c3a params`` counts."""
    return [name for name, m in METHODS.items() if m.complexity is not None]


# c3a.analysis's name for the terms, kept for one release: the registry's as this module was imported.
COMPLEXITY: dict[str, Complexity] = {name: METHODS[name].complexity for name in counted_methods()}


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
    :func:`c3a.experiments.methods.build_method`, so counts are the real implementations'. A method the meta
    device cannot build (BOFT) is counted from the shapes by its registry entry's ``count_from_shapes``.
    ``block_size="auto"`` picks C³A block sizes matching LoRA rank ``rank`` (:func:`c3a.blocksize.choose_block_sizes`);
    the choices and their reasons are in the report.
    """
    import torch
    from transformers import AutoModel

    from c3a.blocksize import choose_block_sizes, target_shapes
    from c3a.layer import c3a_layers
    from c3a.paper_models import model_config, query_value_targets

    if method not in counted_methods():
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(counted_methods())}")
    entry = METHODS[method]
    complexity = entry.complexity
    with torch.device("meta"):
        net = AutoModel.from_config(model_config(model))
    targets = list(targets or query_value_targets(net) or default_targets(net))
    shapes = target_shapes(net, targets)
    opts = MethodOptions(targets=targets, block_size=block_size, rank=rank,
                         boft_block_size=boft_block_size, boft_butterfly_factor=boft_butterfly_factor)
    options = {"targets": targets, **{name: getattr(opts, name) for name in complexity.options}}
    choices: dict[str, BlockSizeChoice] = {}
    k = {"r": rank, "s": boft_block_size, "m": boft_butterfly_factor}
    if entry.count_from_shapes is not None:
        per_layer = entry.count_from_shapes(shapes, opts)
        total = sum(per_layer.values())
        counted = f"counted from the shapes: {method.upper()} cannot be built on the meta device"
    else:
        with torch.device("meta"):
            net = build_method(net, method, opts)
        total = trainable_parameters(net, HEAD_MODULES)
        per_layer = {n: _layer_params(net, n) for n in shapes}
        counted = "counted on the model built on the meta device through c3a.experiments.methods"
    built = {name: layer.block_size["default"] for name, layer in c3a_layers(net)}
    if method == "c3a" and block_size == "auto":
        options["lora_rank"] = rank
        choices = choose_block_sizes(shapes, lora_rank=rank)
        if any(built[n] != c.block_size for n, c in choices.items()):
            raise RuntimeError(
                f"the method registry's C³A block sizes differ from the advice for LoRA rank {rank}: "
                "c3a.experiments.methods must pass MethodOptions.rank on as C3AConfig.lora_rank"
            )
    layers = []
    for name, (d_in, d_out) in shapes.items():
        if name in built:
            k["b"] = built[name]
        time, space = complexity.time_of(d_out, d_in, k), complexity.space_of(d_out, d_in, k)
        row = {"name": name, "d1": d_out, "d2": d_in, "params": per_layer[name], "time": time, "space": space}
        layers.append({**row, "block_size": built[name]} if name in built else row)
    return ParamReport(model, method, total, counted, options, complexity, layers, choices)
