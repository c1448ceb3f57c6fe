"""Train a tiny random BERT + C³A for a few steps through `c3a.experiments.train.fit`; save the result.

Run plainly for one process, or under ``torchrun --nproc_per_node N`` for DDP (gloo on CPU); the per-device
batch size times N is the global batch. Writes, for every rank, the trainable parameters before and after and
the gradients the optimizer saw at each step to ``OUT/rank<r>.pt``.
Usage: ddp_worker.py OUT PER_DEVICE_BATCH_SIZE
"""

import os
import sys

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, set_seed

from c3a.experiments.methods import MethodOptions, build_method
from c3a.experiments.train import TrainConfig, fit

STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 12


class RecordGradients(TrainerCallback):
    """The gradients the optimizer is about to apply (after DDP's all-reduce and clipping)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def main(out: str, batch_size: int) -> None:
    set_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,  # the runs must not depend on per-process random streams
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = build_method(BertForSequenceClassification(config), "c3a", MethodOptions(block_size=8, head=["classifier"]))
    generator = torch.Generator().manual_seed(1)
    n = STEPS * GLOBAL_BATCH
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(1, 50, (n, LENGTH), generator=generator).tolist(),
            "labels": torch.randint(0, 2, (n,), generator=generator).tolist(),
        }
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gradients = RecordGradients()
    result = fit(
        model,
        data,
        data.select(range(4)),
        config=TrainConfig(
            output_dir=os.path.join(out, "trainer"),
            lr=0.1,
            head_lr=0.01,
            weight_decay=1e-4,
            epochs=1,
            batch_size=batch_size,
            warmup_ratio=0.0,
            training_args={"disable_tqdm": True},  # CPU DDP over gloo without asking: fit's default
        ),
        head=["classifier"],
        metric="accuracy",
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        callbacks=(gradients,),
    )
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(
        {"initial": initial, "trained": trained, "gradients": gradients.steps, "world_size": result.trainer.args.world_size},
        os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
