"""Train a tiny random BERT + C³A for a few SGD steps, sharded with FSDP2 (``fully_shard``) when run under
``torchrun --nproc_per_node N`` (gloo on CPU), plainly otherwise; save the adapter once (rank 0, gathered full
state) and each rank's trained kernels.

Usage: fsdp_worker.py OUT
Writes ``OUT/adapter/`` (the PEFT adapter folder) and ``OUT/rank<r>.pt`` (initial and trained kernels, world size).
"""

import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from c3a import C3AConfig

STEPS, GLOBAL_BATCH, LENGTH, LR = 3, 4, 12, 2000.0


def base():
    """The frozen model: a 2-layer random BERT classifier, no dropout (the runs must not depend on random streams)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config)


def build():
    peft_config = C3AConfig(block_size=8, target_modules=["query", "value"], init_weights="xavier_uniform")
    return get_peft_model(base(), peft_config)


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    model = build()
    kernels = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (STEPS, GLOBAL_BATCH, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (STEPS, GLOBAL_BATCH), generator=generator)
    share = GLOBAL_BATCH // world  # each rank its slice of the global batch; the mean over ranks is the global mean
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        rows = slice(rank * share, (rank + 1) * share)
        model(input_ids=ids[step, rows], labels=labels[step, rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank takes part in the gather; rank 0 alone receives the full tensors and writes
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    trained = {n: state[n].detach().clone() for n in kernels} if rank == 0 else {}
    if rank == 0:
        model.save_pretrained(os.path.join(out, "adapter"), state_dict=state)
    torch.save({"initial": kernels, "trained": trained, "world_size": world}, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
