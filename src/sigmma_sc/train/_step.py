"""One optimiser step of one process: loss, backward (whole batch or GradCache micro-batches), clipping, statistics.

On CUDA out-of-memory the micro-batch is halved and the step retried from the same random state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _noise as N
from ._gradcache import grad_cache_backward
from ._noise import GlobalBatchNoise

logger = logging.getLogger(__name__)


def rng_states(device: torch.device) -> dict[str, Any]:
    """The CPU random state and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def _samplers(model: Any) -> dict[str, torch.nn.Module]:
    return dict(getattr(model.st_encoder, "samplers", None) or {})


def step_stats(model: Any, max_grad_norm: float | None) -> dict[str, Tensor]:
    """After ``backward``: the edge samplers' statistics and gradient norms, then clip (all on the device)."""
    stats: dict[str, Tensor] = {}
    for s, sampler in _samplers(model).items():
        grads = [p.grad for p in sampler.parameters() if p.grad is not None]
        if grads:
            stats[f"edge_grad_{s}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
        last = getattr(sampler, "last_stats", None) or {}
        if "sampled" in last:
            stats[f"edge_sampled_{s}"] = last["sampled"].detach().float()
        if "prob" in last:
            stats[f"edge_prob_{s}"] = last["prob"].detach().float()
        if "candidates" in last:
            stats[f"edge_candidates_{s}"] = torch.as_tensor(float(last["candidates"]))
    params = [p for p in model.parameters() if p.grad is not None]
    if params:
        if max_grad_norm is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            stats["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params])
    return stats


def _backward(
    model: Any,
    data: Any,
    idx: Tensor,
    micro_batch: int | None,
    amp: Callable[[], contextlib.AbstractContextManager],
    noise: GlobalBatchNoise | None,
) -> Tensor:
    """The loss of the batch ``idx`` and its gradients: at once, or over micro-batches with the batch's draws."""

    def micro_batched(noise: GlobalBatchNoise) -> Tensor:
        noise.start_step(idx)  # each micro-batch's draws are its rows of the whole batch's draw
        try:
            embed_positions = N.batch_embedder(model, data, idx, amp, noise)
            chunks = list(torch.arange(idx.numel()).split(micro_batch))
            return grad_cache_backward(embed_positions, chunks, model.loss_from_embeddings)
        finally:
            noise.end_step()

    if micro_batch is None or micro_batch >= idx.numel():
        with amp():
            emb = model.embed_batch(data.select(idx))
        loss = model.loss_from_embeddings(emb)
        loss.backward()
        return loss
    if noise is not None:
        return micro_batched(noise)
    with N.rank_noise(model, data._host_counts) as step_noise:
        return micro_batched(step_noise)


def train_step(
    model: Any,
    data: Any,
    idx: Tensor,
    optimizer: Any,
    state: dict[str, Any],
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    noise: GlobalBatchNoise | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimiser step on the tiles ``idx`` (CPU); halves the micro-batch and retries on CUDA OOM.

    ``amp`` makes the context of the forward passes (:func:`~sigmma_sc.train._device.autocast_for`). The global
    gradient norm is clipped to ``config.max_grad_norm``. With micro-batches (GradCache), every random draw
    (dropout, edge sampling) is taken from the draw of the whole batch (``noise``,
    :func:`~sigmma_sc.train._noise.rank_noise`; one is made for the step if not given), so the step does not
    depend on the micro-batch size: the same seed trains the same model whether the batch fits in memory or is
    split. Returns the detached loss and the step's statistics (:func:`step_stats`) on the device (no host
    synchronisation).
    """
    device = data.device
    rng = rng_states(device)
    while True:
        optimizer.zero_grad(set_to_none=True)
        oom = False
        try:
            loss = _backward(model, data, idx, state["micro_batch"], amp, noise)
            stats = step_stats(model, model.config.max_grad_norm)
            optimizer.step()
            return loss.detach(), stats
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block, so the traceback's tensors can be freed
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            _halve_micro_batch(state, idx.numel())
            set_rng_states(rng, device)


def _halve_micro_batch(state: dict[str, Any], n: int) -> None:
    """After a CUDA OOM: half the tiles per forward pass, or an error naming the fixes at 1 tile."""
    current = state["micro_batch"] or n
    if current <= 1:
        raise RuntimeError(
            "CUDA out of memory with a micro-batch of 1 tile: the model or tiles are too large for this GPU. "
            "Reduce `hidden`/`out_dim`, the node feature width or the cells per tile, or train on the CPU."
        )
    state["micro_batch"] = max(current // 2, 1)
    logger.warning(
        "CUDA out of memory with %d tiles per forward pass; retrying the step with micro_batch=%d "
        "(GradCache accumulation keeps all %d tiles as negatives).",
        current,
        state["micro_batch"],
        n,
    )
