"""The step budget of a run: batch size, batches per epoch, epochs, steps, warm-up, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _distributed as D

#: the cosine schedule decays to this fraction of the peak learning rate
_MIN_LR_RATIO = 0.01


def batches(idx: Tensor, size: int, *, merge_last: bool) -> list[Tensor]:
    """Consecutive chunks of ``size``; a last chunk with < 2 tiles is merged (``merge_last``) or dropped."""
    chunks = list(idx.split(size))
    if chunks and chunks[-1].numel() < 2:
        last = chunks.pop()
        if merge_last and chunks:
            chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def epoch_batches(perm: Tensor, batch: int, ctx: D.DistContext | None) -> list[Tensor]:
    """An epoch's batches; with several processes a last batch with fewer tiles than ranks joins the one before."""
    chunks = batches(perm, batch, merge_last=False)
    return chunks if ctx is None else D.merge_small_last(chunks, ctx)


def budget(
    cfg: Any, n_train: int, epochs: int | None, steps: int | None, ctx: D.DistContext | None = None
) -> dict[str, int]:
    """Batch size, batches per epoch, epoch and step budgets, warm-up steps."""
    batch = cfg.batch_for(n_train)
    per_epoch = max(len(epoch_batches(torch.arange(n_train), batch, ctx)), 1)
    n_epochs = int(epochs) if epochs is not None else math.ceil(int(steps) / per_epoch)
    total = n_epochs * per_epoch if steps is None else min(int(steps), n_epochs * per_epoch)
    return {
        "batch": batch,
        "steps_per_epoch": per_epoch,
        "epochs": n_epochs,
        "steps": total,
        "warmup_steps": round(cfg.warmup * total),
    }


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, steps_per_epoch: int, step_size: int,
    gamma: float,
) -> float:  # fmt: skip
    """Learning-rate multiplier before optimiser step ``step`` (0-based): linear warm-up, then cosine or StepLR."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return gamma ** ((step // steps_per_epoch) // step_size)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return _MIN_LR_RATIO + (1 - _MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_for(optimizer: torch.optim.Optimizer, cfg: Any, plan: dict[str, int]) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step :func:`lr_factor` schedule of ``plan`` as a ``LambdaLR``."""

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps=plan["steps"], warmup_steps=plan["warmup_steps"], schedule=cfg.schedule,
            steps_per_epoch=plan["steps_per_epoch"], step_size=cfg.step_size, gamma=cfg.gamma,
        )  # fmt: skip

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
