"""Data-parallel training on torch.distributed: process-group setup, batch sharding, gradient averaging.

One process per device (``torchrun --nproc-per-node N``, or one SLURM task per GPU). Every rank holds the
whole bundle and draws the same shuffled global batches (same seed); rank ``r`` embeds its contiguous shard
of each batch, the shards are all-gathered with gradients (:func:`sigmma_sc.nn.gather_embeddings`) so each
rank's InfoNCE sees the global batch's negatives, and parameter gradients are averaged over ranks before the
optimiser step. The result equals one process training on the global batch (up to float rounding; dropout
and Gumbel noise are drawn per rank, so stochastic layers see other draws than in one process).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..nn._distributed import gather_embeddings
from ..nn._loss import grad_cache_backward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank and world of this process.

    Attributes
    ----------
    rank
        Global rank (0 writes checkpoints and the model).
    world_size
        Number of processes.
    local_rank
        Rank on this node (its GPU index).
    """

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def current() -> DistContext | None:
    """The context of an initialised process group with more than one process, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return None


def init_from_env(device: str | torch.device | None = None) -> tuple[DistContext | None, torch.device | None]:
    """Join the process group that the launcher describes in the environment, if any.

    Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (torchrun), else ``SLURM_NTASKS``/``SLURM_PROCID``/
    ``SLURM_LOCALID`` (``srun``, with ``MASTER_ADDR`` and ``MASTER_PORT`` exported by the job script). With one
    process, nothing happens. Otherwise the backend is NCCL on CUDA (device ``cuda:LOCAL_RANK``) and gloo on the
    CPU (``device='cpu'``, or no GPU).

    Parameters
    ----------
    device
        ``'cpu'`` forces CPU training with gloo; ``None``/``'cuda'``: one GPU per process when CUDA is available.

    Returns
    -------
    The context (``None`` for one process) and the device this process trains on (``None``: the default).
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    if world < 2:
        return None, None if device is None else torch.device(device)
    rank = _env_int("RANK", "SLURM_PROCID")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if rank is None:
        raise RuntimeError("WORLD_SIZE > 1 but no RANK in the environment; launch with `torchrun` or `srun`.")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"{name} is not set; torchrun sets it, a SLURM job script must export it.")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    ctx = DistContext(rank, world, local)
    logger.info("Rank %d of %d on %s (%s).", rank, world, dev, dist.get_backend())
    return ctx, dev


def shard(idx: Tensor, ctx: DistContext) -> Tensor:
    """The contiguous part of a global batch for this rank (parts differ by at most one tile; rank order = batch order)."""
    return idx.tensor_split(ctx.world_size)[ctx.rank]


def merge_small_last(batches: list[Tensor], ctx: DistContext) -> list[Tensor]:
    """Merge a last batch with fewer tiles than ranks into the one before (every rank needs a tile)."""
    if len(batches) > 1 and batches[-1].numel() < ctx.world_size:
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return batches


def average_gradients(params: Iterable[torch.nn.Parameter], ctx: DistContext) -> None:
    """All-reduce and average ``.grad`` over ranks in one flat buffer.

    A parameter keeps ``grad=None`` only when it has no gradient on any rank (as in one process over the
    global batch, so AdamW skips it alike); otherwise missing gradients count as zeros.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for p in live:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (one consistent start, as DDP does)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def check_same(value: Any, what: str, ctx: DistContext) -> None:
    """Raise on every rank when ``value`` (JSON-able) differs between ranks."""
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"The ranks disagree on {what}: {values}. Every rank must load the same bundle and config.")


def all_gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """``value`` of every rank, in rank order."""
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def distributed_backward(
    encode: Callable[[Tensor], Mapping[str, Tensor]],
    idx: Tensor,
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Iterable[torch.nn.Parameter],
    ctx: DistContext,
    *,
    micro_batch: int | None = None,
) -> Tensor:
    """Gradient of the global-batch loss on every rank, from this rank's shard of the batch ``idx``.

    The rank embeds :func:`shard` ``(idx)`` (at once, or in micro-batches of ``micro_batch`` tiles with
    GradCache), gathers every rank's embeddings with gradients, computes ``loss_fn`` on the global batch (all
    negatives), backpropagates, and averages the parameter gradients over ranks. Afterwards ``.grad`` equals
    that of one process running ``loss_fn(encode(idx)).backward()`` (up to float rounding).

    Parameters
    ----------
    encode
        Maps tile indices to a dict of ``(n, D)`` embeddings (rows in index order).
    idx
        The global batch (the same on every rank).
    loss_fn
        Loss of a dict of global-batch embeddings.
    params
        Parameters whose gradients are averaged.
    ctx
        This process's rank and world.
    micro_batch
        Tiles per forward pass (GradCache); ``None``: the whole shard.

    Returns
    -------
    The detached global-batch loss (the same on every rank).
    """
    local = shard(idx, ctx)
    if micro_batch is None or micro_batch >= local.numel():
        loss = loss_fn(gather_embeddings(encode(local)))
        loss.backward()
        loss = loss.detach()
    else:
        loss = grad_cache_backward(encode, list(local.split(micro_batch)), loss_fn, gather=gather_embeddings)
    average_gradients(params, ctx)
    return loss


def distributed_loss(
    encode: Callable[[Tensor], Mapping[str, Tensor]],
    idx: Tensor,
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    ctx: DistContext,
) -> Tensor:
    """The global-batch loss without gradients (validation): each rank embeds its shard, the shards are gathered.

    Returns
    -------
    The loss, the same on every rank.
    """
    return loss_fn(gather_embeddings(encode(shard(idx, ctx))))
