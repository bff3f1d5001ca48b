"""Validation after an epoch (loss and partner rank), eval-mode embeddings, and model selection with early stopping."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _distributed as D
from ._diagnostics import chance_loss, partner_rank
from ._memory import inference_chunks
from ._schedule import batches


def evaluate(
    model: Any,
    data: Any,
    idx: Tensor,
    batch_size: int,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float, float]:
    """Validation scores of the tiles ``idx`` (eval mode, deterministic edges).

    Returns the mean contrastive loss over batches of ``batch_size`` tiles, its chance level, and the mean
    normalised partner rank among all of ``idx`` (:func:`~sigmma_sc.train._diagnostics.partner_rank`).
    """
    was = model.training
    model.eval()
    total, count = torch.zeros((), device=data.device), 0
    chunks = batches(idx, batch_size, merge_last=True)
    parts: dict[str, list[Tensor]] = {}
    with torch.inference_mode():
        for chunk in chunks:
            emb = embed_inference(model, data, chunk, amp)
            total += model.loss_from_embeddings(emb) * chunk.numel()
            count += chunk.numel()
            for k, v in emb.items():
                parts.setdefault(k, []).append(v.float().cpu())
    model.train(was)
    rank = partner_rank({k: torch.cat(v) for k, v in parts.items()}, model.scales)
    return float(total) / max(count, 1), chance_loss([c.numel() for c in chunks], len(model.scales)), rank


def validate(
    model: Any,
    data: Any,
    idx: Tensor | None,
    batch_size: int,
    amp: Callable[[], contextlib.AbstractContextManager],
    ctx: D.DistContext | None,
) -> tuple[float | None, float | None, float | None]:
    """:func:`evaluate` in one process; with several, each rank embeds its shard of every batch (rank 0's scores).

    ``(None, None, None)`` without validation tiles.
    """
    if idx is None:
        return None, None, None
    if ctx is None:
        return evaluate(model, data, idx, batch_size, amp)
    model.eval()
    chunks = batches(idx, batch_size, merge_last=True)
    val, rank = D.evaluate(model, data, chunks, amp, ctx)
    chance = chance_loss([c.numel() for c in chunks], len(model.scales))
    model.train()
    return val, chance, rank


def embed_inference(model: Any, data: Any, idx: Tensor, amp: Callable) -> dict[str, Tensor]:
    """``model.embed_batch`` of the tiles ``idx`` (eval mode), in pieces that fit in a CPU's free memory.

    Each tile's eval-mode embedding does not depend on the others, so the pieces change no result.
    """
    parts = []
    for piece in inference_chunks(model, data, idx, idx.numel()):
        with amp():
            parts.append(model.embed_batch(data.select(piece)))
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def embed_tiles(
    model: Any,
    data: Any,
    idx: Tensor,
    batch_size: int,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Tensor]:
    """Eval-mode embeddings (``"image/{s}"``, ``"st/{s}"`` -> ``(len(idx), out_dim)``, float32 on the CPU)."""
    was = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    with torch.inference_mode():
        for chunk in idx.split(max(batch_size, 2)):
            emb = embed_inference(model, data, chunk, amp)
            for k, v in emb.items():
                parts.setdefault(k, []).append(v.float().cpu())
    model.train(was)
    return {k: torch.cat(v) for k, v in parts.items()}


def cpu_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of the state dict on the host."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class ModelSelection:
    """The weights of the best epoch by the validation criterion, and the early-stopping decision.

    Parameters
    ----------
    select_by
        ``"retrieval"``: the validation partner rank; ``"loss"``: the validation loss (lower is better for both).
    patience
        Stop after this many optimiser steps without improvement (``None``: never), counted after the warm-up.
    warmup_steps
        Steps of learning-rate warm-up, during which training never stops early.
    """

    def __init__(self, select_by: str, patience: int | None, warmup_steps: int):
        self.select_by, self.patience, self.warmup_steps = select_by, patience, warmup_steps
        self.best_state: dict[str, Tensor] | None = None
        self.best_val = math.inf
        self.best_step = 0

    def criterion(self, record: dict[str, Any]) -> float | None:
        """The record's selection criterion (``None`` without validation)."""
        return record["val_rank"] if self.select_by == "retrieval" else record["val_loss"]

    def update(self, record: dict[str, Any], model: torch.nn.Module) -> bool:
        """Keep the weights when the epoch ``record`` is the best so far; whether training should stop early."""
        crit, step = self.criterion(record), record["step"]
        if crit is not None and crit < self.best_val:
            self.best_val, self.best_state, self.best_step = crit, cpu_state(model), step
        return (
            self.patience is not None
            and crit is not None
            and step > self.warmup_steps
            and step - self.best_step >= self.patience
        )
