"""`c3a demo`: the paper's synthetic expressiveness experiment (Figure 3).

Eight overlapping Gaussian clusters on a circle are classified by a 2 → 128 → 128 → 8 ReLU MLP whose
middle layer is a dense 128×128 matrix (``linear``), a rank-1 product B·A (``lora``, 256 weights) or a
block-circulant matrix with block size 64 (``c3a``, 256 weights). Everything is trained from scratch with
the same optimiser, learning rate, steps and seeds; only the middle layer differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch
from torch import nn
from tqdm.auto import tqdm

from c3a.functional import block_circular_conv
from c3a.io import atomic_path, atomic_write_text

METHODS = ("linear", "lora", "c3a")
CLASSES, POINTS_PER_CLASS = 8, 30
RADIUS, NOISE = 1.0, 0.3  # adjacent centres are 0.77 apart, so neighbouring clusters overlap
WIDTH, BLOCK_SIZE = 128, 64
LR = 3e-3  # full-batch Adam, the same for every method (its steps: `c3a demo --steps`)
LABELS = {"linear": "linear (dense)", "lora": "lora (rank 1)", "c3a": f"c3a (block {BLOCK_SIZE})"}


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``POINTS_PER_CLASS`` Gaussian points around each of ``CLASSES`` centres on a circle."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(CLASSES) * (2 * math.pi / CLASSES)
    centres = RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    y = torch.arange(CLASSES).repeat_interleave(POINTS_PER_CLASS)
    x = centres[y] + NOISE * torch.randn(len(y), 2, generator=g)
    return x, y


class BlockCirculant(nn.Module):
    """``y = C_blk(kernel) x`` with a ``(d/b, d/b, b)`` kernel: ``d·d/b`` weights, applied with FFTs.

    Trained from scratch here, so no 1/d_in scale and no zero init (those suit a delta on a frozen
    layer): the kernel is drawn like ``nn.Linear``'s default weight, U(±1/√d), which gives the
    block-circulant matrix exactly the entry distribution of a default dense layer.
    """

    def __init__(self, features: int, block_size: int) -> None:
        super().__init__()
        blocks = features // block_size
        bound = 1 / math.sqrt(features)
        self.kernel = nn.Parameter(torch.empty(blocks, blocks, block_size).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_circular_conv(x, self.kernel)


def middle_layer(method: str) -> nn.Module:
    """The bias-free 128×128 middle map of ``method``."""
    if method == "linear":
        return nn.Linear(WIDTH, WIDTH, bias=False)
    if method == "lora":
        # B·A through a width-1 bottleneck: rank 1, 2·128 weights. A is drawn like nn.Linear, U(±1/√d),
        # and B with unit variance, so B·A has a default dense layer's entry variance 1/(3d).
        down, up = nn.Linear(WIDTH, 1, bias=False), nn.Linear(1, WIDTH, bias=False)
        nn.init.uniform_(up.weight, -math.sqrt(3), math.sqrt(3))
        return nn.Sequential(down, up)
    if method == "c3a":
        return BlockCirculant(WIDTH, BLOCK_SIZE)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


class MLP(nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.first = nn.Linear(2, WIDTH)
        self.middle = middle_layer(method)
        self.middle_bias = nn.Parameter(torch.zeros(WIDTH))  # shared by all methods, not counted
        self.last = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = torch.relu(self.middle(h) + self.middle_bias)
        return self.last(h)


def middle_weights(method: str) -> int:
    return sum(p.numel() for p in middle_layer(method).parameters())


def train(method: str, seed: int, steps: int, device: str, progress=None) -> dict:
    """Full-batch Adam from scratch; returns the run's record with the accuracy after each update."""
    x, y = (t.to(device) for t in make_data(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # first and last layers start identical across methods
        model = MLP(method).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    correct = []  # on device; read back once at the end
    for _ in range(steps):
        logits = model(x)
        correct.append((logits.argmax(-1) == y).sum())
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update()
    with torch.no_grad():
        correct.append((model(x).argmax(-1) == y).sum())
    curve = [round(c / len(y), 4) for c in torch.stack(correct).tolist()]
    return {
        "method": method,
        "seed": seed,
        "trainable_params": sum(p.numel() for p in model.middle.parameters()),
        "train_accuracy": curve,  # index i: accuracy after i updates
        "final_train_accuracy": curve[-1],
    }


def markdown_table(runs: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    final = {(r["method"], r["seed"]): r["final_train_accuracy"] for r in runs}
    lines = [
        "| middle layer | weights | final train accuracy (mean ± std) | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in seeds) + " |",
    ]
    for method in METHODS:
        accs = [final[method, s] for s in seeds]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {method} | {middle_weights(method)} | {statistics.mean(accs):.3f} ± {std:.3f} | "
            + " | ".join(f"{a:.3f}" for a in accs)
            + " |"
        )
    caught_up = [s for s in seeds if final["lora", s] >= final["linear", s] - 0.03]
    if caught_up:
        lines.append(
            f"\nNote: lora (rank 1) comes within 0.03 of linear on seed(s) {', '.join(map(str, caught_up))}."
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    seed = min(r["seed"] for r in runs)
    x, y = make_data(seed)
    left.scatter(x[:, 0], x[:, 1], c=y, cmap="tab10", s=14)
    left.set(title=f"data (seed {seed}): {CLASSES} classes", aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    for method in METHODS:
        curves = torch.tensor([r["train_accuracy"] for r in runs if r["method"] == method])
        mean = curves.mean(0)
        std = curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
        steps = range(len(mean))
        label = f"{LABELS[method]}: {middle_weights(method)} weights"
        (line,) = right.plot(steps, mean, label=label)
        right.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    right.set(
        title=f"training accuracy, mean ± std over {len(curves)} seed(s)",
        xlabel="step (full batch)",
        ylabel="train accuracy",
        ylim=(0, 1.02),
    )
    right.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    """`c3a demo` (its options: :mod:`c3a.experiments.demo`)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    runs = []
    jobs = [(m, s) for s in range(args.seeds) for m in METHODS]
    threads = torch.get_num_threads()
    # 240×128 products are too small to split: on a busy CPU thread hand-offs made steps ~30× slower.
    torch.set_num_threads(1)
    try:
        with tqdm(total=len(jobs) * args.steps, desc="c3a demo", unit="step") as progress:
            for method, seed in jobs:
                progress.set_postfix(method=method, seed=seed)
                runs.append(train(method, seed, args.steps, args.device, progress))
    finally:
        torch.set_num_threads(threads)
    table = markdown_table(runs)
    results = {"experiment": "synthetic", "runs": runs}
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    plot(runs, os.path.join(args.out, "demo.png"))
    print(table)
    print(f"wrote {args.out}/results.json, table.md, demo.png")
    return 0
