"""Training plumbing shared by the experiments: one `fit` over the Hugging Face `Trainer`.

What every experiment needs and no method should know about: two learning rates (the task head and the
method's own parameters), evaluation after every epoch, the best epoch's weights put back at the end, and
the peak memory of training. Because it is the stock `Trainer`, `torchrun` / `accelerate launch` give DDP
(and FSDP through `training_args`) without changes here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments

from c3a.experiments.methods import METHODS, MethodOptions, is_head_param
from c3a.io import atomic_write_text
from c3a.paper_models import SHORTCUT_HUB_IDS


def name_as_given(model: nn.Module, name: str) -> nn.Module:
    """``model`` naming itself as the user named it: a shortcut's hub id, not this machine's install path, so that
    saved adapters (``base_model_name_or_path``) and PEFT's model cards carry no local path."""
    if name in SHORTCUT_HUB_IDS:
        model.config._name_or_path = model.name_or_path = SHORTCUT_HUB_IDS[name]
    return model


def head_modules(model: nn.Module) -> list[str]:
    """Names of the top-level modules outside ``model.base_model``: the task head that produces the logits
    (``classifier`` for BERT/RoBERTa, ``score`` for decoder models, ...)."""
    inside = {id(p) for p in model.base_model.parameters()}
    names = sorted({name.split(".")[0] for name, p in model.named_parameters() if id(p) not in inside})
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameters outside its base model: no task head found")
    return names


@dataclass
class TrainConfig:
    output_dir: str
    lr: float  # the method's parameters
    head_lr: float  # the task head's parameters
    weight_decay: float = 0.0  # both groups; biases and norm weights get none, as in the Trainer's default
    epochs: float = 3
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    warmup_ratio: float = 0.06
    seed: int = 0
    training_args: dict[str, Any] = field(default_factory=dict)  # any other `TrainingArguments` field


@dataclass
class FitResult:
    trainer: Trainer
    best: dict[str, float]  # validation metrics (and "epoch") of the best epoch, whose weights the model now holds
    history: list[dict]  # per epoch: {"epoch", "train_loss", "validation": metrics}
    train_seconds: float
    step_seconds: list[float]  # wall time of each optimizer step (StepClock)
    peak_memory_bytes: int
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss"


class _Trainer(Trainer):
    def __init__(self, *args, head: list[str], head_lr: float, **kwargs):
        self.head, self.head_lr = head, head_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (``TrainingArguments.optim``, AdamW by default), the head on its own learning rate."""
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((is_head_param(name, self.head), name in decay), []).append(p)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(
                [
                    {
                        "params": params,
                        "lr": self.head_lr if is_head else self.args.learning_rate,
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                    for (is_head, decays), params in groups.items()
                ],
                **kwargs,
            )
        return self.optimizer


class KeepBest(TrainerCallback):
    """Snapshot the trainable parameters whenever the validation metric improves; restore the best at the end.

    Lighter than ``load_best_model_at_end`` (no checkpoints on disk, the same for PEFT and plain models); frozen
    weights never change, so they need no copy.
    """

    def __init__(self, metric: str, greater_is_better: bool = True):
        self.key = f"eval_{metric}"
        self.sign = 1 if greater_is_better else -1  # compare sign·value: higher is better
        self.best: Optional[dict[str, float]] = None
        self.snapshot: dict[str, torch.Tensor] = {}

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        value = (metrics or {}).get(self.key)
        if value is None:  # an evaluation outside training (another prefix)
            return
        score = -self.sign * math.inf if math.isnan(value) else value
        if self.best is None or self.sign * score > self.sign * self.best[self.key]:
            self.best = {**metrics, self.key: score, "eval_epoch": state.epoch}
            self.snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.snapshot:
                    p.copy_(self.snapshot[name])
        self.snapshot = {}


class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step: forward, backward and update, without data loading, logging or
    validation. Their median is a speed figure that a validation pass, a slow first step or a pause of the
    process does not move, as they move the total."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


_SPEED_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{prefix}name`` entries as ``name``, throughput figures left out."""
    names = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return {k: v for k, v in names.items() if k not in _SPEED_KEYS}


class PeakMemory:
    """Peak memory of the block: CUDA's allocator high-water mark, else the process's peak RSS (which also
    counts everything the process did before — run one measurement per process)."""

    def __enter__(self):
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            self.bytes = torch.cuda.max_memory_allocated()
        else:  # ru_maxrss is in KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.bytes = rss if sys.platform == "darwin" else rss * 1024


def fit(
    model: nn.Module,
    train_dataset,
    eval_dataset,
    *,
    config: TrainConfig,
    head: list[str],
    metric: str,
    compute_metrics: Optional[Callable[[EvalPrediction], dict[str, float]]],
    data_collator=None,
    callbacks: tuple[TrainerCallback, ...] = (),
    greater_is_better: bool = True,
) -> FitResult:
    """Train ``model`` (already prepared by ``build_method``), evaluate every epoch, keep the epoch with the
    highest validation ``metric`` (lowest with ``greater_is_better=False``) and return with its weights loaded.
    ``compute_metrics=None`` with ``metric="loss"``: the validation loss only, no logits gathered."""
    defaults = dict(
        output_dir=config.output_dir,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the training steps
        lr_scheduler_type="linear",
        seed=config.seed,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only warns
    )
    if not torch.cuda.is_available() and (int(os.environ.get("WORLD_SIZE", 1)) > 1 or config.training_args.get("bf16")):
        # without use_cpu, `torchrun` on a CPU-only machine trains every rank on its own (no DDP at all), and
        # Trainer refuses bf16 (CPU autocast needs it)
        defaults["use_cpu"] = True
    args = TrainingArguments(**{**defaults, **config.training_args})  # training_args may override defaults
    keep_best, clock = KeepBest(metric, greater_is_better), StepClock()
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        callbacks=[keep_best, clock, *callbacks],
        head=head,
        head_lr=config.head_lr,
    )
    # The Trainer multiplies the loss by the world size when the forward takes **kwargs, expecting a loss summed
    # and divided by the global `num_items_in_batch`; PeftModel and most HF heads take **kwargs yet return a
    # per-device mean, so DDP gradients would come out world-size times too large. Plain per-device means it is.
    trainer.model_accepts_loss_kwargs = False
    with PeakMemory() as memory:
        start = time.perf_counter()
        if any(p.requires_grad for p in model.parameters()):
            trainer.train()
        else:  # a method that trains nothing (the untuned floor): its validation score as it is
            trainer.evaluate()
        seconds = time.perf_counter() - start
    history: dict[float, dict] = {}  # the Trainer logs training loss and validation metrics separately
    for log in trainer.state.log_history:
        row = history.setdefault(log.get("epoch", 0), {"epoch": log.get("epoch", 0)})
        if f"eval_{metric}" in log:
            row["validation"] = {k: v for k, v in _strip(log, "eval_").items() if k != "epoch"}
        elif "loss" in log:
            row["train_loss"] = log["loss"]
    try:  # nothing is saved there (save_strategy "no"): leave no empty folder behind
        os.rmdir(args.output_dir)
    except OSError:
        pass
    if keep_best.best is None:
        raise RuntimeError(f"validation produced no {metric!r}; metrics were {trainer.evaluate()}")
    return FitResult(
        trainer=trainer,
        best=_strip(keep_best.best, "eval_"),
        history=[row for row in history.values() if len(row) > 1],
        train_seconds=seconds,
        step_seconds=clock.seconds,
        peak_memory_bytes=memory.bytes,
        memory_kind=memory.kind,
    )


def evaluate(trainer: Trainer, dataset, prefix: str = "test") -> dict[str, float]:
    """Metrics of the trainer's current model on ``dataset``, without the key prefix."""
    return _strip(trainer.evaluate(dataset, metric_key_prefix=prefix), f"{prefix}_")


def end_distributed(trainer: Trainer) -> None:
    """Leave a (possibly) distributed run cleanly; call on every rank once its last collective is done.

    Gloo (PyTorch's CPU backend) can hang when its process group dies inside the DDP reducer's destructor (the
    GIL held while joining threads that need it) and abort when it dies at interpreter exit. So: release the DDP
    wrapper while the group lives on, meet the other ranks, destroy the group. A no-op in a single process."""
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group


def results_record(args, result: FitResult, *, task: str, main_metric: str, trainable_params: int, test: dict,
                   samples: dict[str, int], config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The one ``results.json`` schema of every experiment (what :mod:`c3a.experiments.report` reads)."""
    return {
        "task": task, "method": args.method, "model": args.model, "seed": args.seed, "main_metric": main_metric,
        "trainable_params": trainable_params, "validation": result.best, "test": test,
        "peak_memory_bytes": result.peak_memory_bytes, "memory_kind": result.memory_kind,
        "train_seconds": result.train_seconds, "step_seconds": [round(s, 4) for s in result.step_seconds],
        "samples": samples, "history": result.history, **extra,
        "config": {**{k: v for k, v in vars(args).items() if k != "command"}, **config},
    }


def save_adapter(model, out: str) -> None:
    """``<out>/adapter``: PEFT's adapter-only checkpoint of a PEFT method's model (nothing for the other methods).
    Embedding layers are never saved: no method here resizes the vocabulary, and PEFT's "auto" check for that
    looks the base model up on the hub (a warning, or a wait, offline)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(os.path.join(out, "adapter"), save_embedding_layers=False)


def write_results(path: str, results: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")


# -- from command-line options (declared in c3a.experiments.options) ------------------------------------
def method_options(args: argparse.Namespace, head: list[str], setting: str = "classification") -> MethodOptions:
    """The options given on the command line, else ``args.method``'s defaults in ``setting``, else MethodOptions'."""
    given = {"targets": args.targets, "block_size": args.block_size, "rank": args.rank, "alpha": args.alpha,
             "dropout": args.dropout, "init_weights": args.init_weights}
    defaults = dict(METHODS[args.method].defaults(setting).options)
    return MethodOptions(head=head, **{**defaults, **{k: v for k, v in given.items() if v is not None}})


def train_config(args: argparse.Namespace, output_dir: str, setting: str = "classification", **training_args) -> TrainConfig:
    """:class:`TrainConfig` from :func:`c3a.experiments.options.add_training_arguments`' options and ``args.method``'s defaults in
    ``setting`` (:meth:`Method.defaults`)."""
    method = METHODS[args.method]
    defaults = method.defaults(setting)
    lr = args.lr if args.lr is not None else defaults.lr
    head_lr = getattr(args, "head_lr", None)
    extra = {"gradient_accumulation_steps": args.grad_accum, "bf16": args.bf16}
    if args.max_steps:
        extra["max_steps"] = args.max_steps
    if args.group_by_length:  # transformers >= 5 names it a sampling strategy
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        extra.update({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields else {"group_by_length": True})
    if args.gradient_checkpointing:  # non-reentrant: adapters get gradients although the embeddings are frozen
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainConfig(
        output_dir=output_dir,
        lr=lr,
        head_lr=head_lr if head_lr is not None else (method.head_lr or lr),
        weight_decay=args.weight_decay if args.weight_decay is not None else defaults.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        training_args={**extra, **training_args},
    )
