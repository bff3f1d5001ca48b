"""Data-parallel training on torch.distributed: process group, batch shards, gathers, gradient averaging.

One process per device (``torchrun --nproc-per-node N``, or one SLURM task per GPU). Every rank holds the
whole bundle and draws the same shuffled global batches (same seed); rank ``r`` embeds its contiguous shard
of each batch, the shards are all-gathered with gradients (:func:`gather_embeddings`, as HESCAPE and open_clip
do) so each rank's InfoNCE sees the global batch's negatives, and parameter gradients are averaged over ranks
before the optimiser step. Inside a step every random draw (dropout, Gumbel edge noise) is rebuilt from the
draw of the whole global batch (:func:`~sigmma_sc.train._noise.rank_noise`), so the update equals one process
training on the global batch (up to float rounding) and every rank's random state stays equal. The trainer
uses :func:`train_step` and :func:`evaluate` when a process group with more than one process is initialised
(or described by the environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._device import resolve_device
from ._diagnostics import partner_rank
from ._gradcache import grad_cache_backward
from ._noise import GlobalBatchNoise, batch_embedder

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



def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """The row count ``n`` of every rank, in rank order (one small all-gather)."""
    local = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size(group))]
    dist.all_gather(out, local, group=group)
    return [int(o) for o in out]


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows (rank order); backward sums the gradient over ranks and keeps own rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: Sequence[int], group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.group, ctx.rank = list(sizes), group, dist.get_rank(group)
        m = max(sizes)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded.contiguous(), group=group)
        return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(
    x: Tensor, *, sizes: Sequence[int] | None = None, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order, differentiable.

    The backward pass all-reduces (sums) the gradient of the gathered tensor and returns each rank the
    rows it contributed: when every rank computes the same loss of the gathered batch, rank ``r`` receives
    ``world_size x dL/dx_r``, so averaging parameter gradients over ranks (as DDP does) yields exactly the
    gradient of the global-batch loss. Ranks may hold different row counts. Without an initialised process
    group (or with one process) ``x`` is returned unchanged.

    Parameters
    ----------
    x
        ``(n_r, ...)`` this rank's rows.
    sizes
        Row count of every rank (default: gathered first).
    group
        Process group (default: the world).

    Returns
    -------
    ``(sum_r n_r, ...)`` tensor.

    Shapes
    ------
    - input: ``(n_r, D)``
    - output: ``(N, D)`` with ``N = sum_r n_r``
    """
    if world_size(group) == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x, sizes, group)


def gather_embeddings(emb: Mapping[str, Tensor], group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """:func:`all_gather_with_grad` of every value of a dict of ``(n_r, D)`` embeddings (row counts gathered once).

    Parameters
    ----------
    emb
        Key -> this rank's ``(n_r, D)`` embeddings (the same keys and row count for every key).
    group
        Process group (default: the world).

    Returns
    -------
    Key -> ``(N, D)`` embeddings of the global batch, rows in rank order.
    """
    if world_size(group) == 1:
        return dict(emb)
    first = next(iter(emb.values()))
    sizes = gather_sizes(first.shape[0], first.device, group)
    return {k: all_gather_with_grad(v, sizes=sizes, group=group) for k, v in emb.items()}


def train_step(
    model: Any,
    data: Any,
    idx: Tensor,
    optimizer: Any,
    state: dict[str, Any],
    amp: Callable[[], contextlib.AbstractContextManager],
    ctx: DistContext,
    noise: GlobalBatchNoise,
    stats: Callable[[], dict[str, Tensor]],
) -> tuple[Tensor, dict[str, Tensor]]:
    """One distributed optimiser step on the global batch ``idx`` (the same on every rank).

    This rank embeds its shard (in micro-batches of ``state["micro_batch"]`` tiles with GradCache), the shards'
    embeddings are gathered with gradients, the global-batch loss is backpropagated and the gradients
    averaged over ranks (:func:`distributed_backward`); the random draws are those of one process on the
    global batch (:func:`~sigmma_sc.train._noise.rank_noise`). ``stats`` runs after the backward (clipping, statistics). No OOM retry:
    the ranks' collectives would fall out of step.
    """
    positions = torch.arange(idx.numel())  # embed() receives batch positions, so each draw knows its rows
    noise.start_step(idx)
    embed = batch_embedder(model, data, idx, amp, noise)
    optimizer.zero_grad(set_to_none=True)
    try:
        loss = distributed_backward(embed, positions, model.loss_from_embeddings, model.parameters(), ctx,
                                    micro_batch=state["micro_batch"])  # fmt: skip
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(
            f"CUDA out of memory on rank {ctx.rank}. In distributed training the micro-batch is not halved "
            "automatically (the ranks would fall out of step): set `micro_batch` (tiles per forward pass per "
            "process, GradCache) in the config."
        ) from e
    finally:
        noise.end_step()
    out = stats()
    optimizer.step()
    return loss, out


def evaluate(
    model: Any,
    data: Any,
    chunks: list[Tensor],
    amp: Callable[[], contextlib.AbstractContextManager],
    ctx: DistContext,
) -> tuple[float, float]:
    """Mean global-batch loss over the validation ``chunks`` and their partner rank (eval mode).

    Each rank embeds its shard of each chunk. Every chunk's loss is the loss of the whole chunk (the shards are gathered), as in one process, and the
    partner rank (:func:`~sigmma_sc.train._diagnostics.partner_rank`) is taken over the gathered embeddings of
    all chunks; both are broadcast from rank 0 so that every rank takes the same model-selection and
    early-stopping decisions.
    """
    keys = [f"{m}/{s}" for m in ("image", "st") for s in model.scales]
    width = model.config.out_dim
    total, count = torch.zeros((), dtype=torch.float64, device=data.device), 0
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    with torch.inference_mode():
        for chunk in chunks:
            local = shard(chunk, ctx)
            if local.numel():
                with amp():
                    emb = {k: v.float() for k, v in model.embed_batch(data.select(local)).items()}
            else:
                emb = {k: torch.zeros((0, width), device=data.device) for k in keys}
            full = gather_embeddings(emb)
            total += model.loss_from_embeddings(full).double() * chunk.numel()
            count += chunk.numel()
            for k in keys:
                parts[k].append(full[k].float().cpu())
    rank = partner_rank({k: torch.cat(v) for k, v in parts.items()}, model.scales)
    value = torch.tensor([float(total / max(count, 1)), rank], dtype=torch.float64, device=data.device)
    dist.broadcast(value, src=0)
    return float(value[0]), float(value[1])


def join(device: str | torch.device | None) -> tuple[DistContext | None, torch.device]:
    """The process group and this rank's device.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the group is joined when the caller has not; a SLURM task alone is not
    taken as a launch (a notebook inside a multi-task allocation must not wait for other ranks): with ``srun``,
    use ``sigmma train-bundle`` or initialise the process group before ``fit``.
    """
    ctx = current()
    if ctx is None and (_env_int("WORLD_SIZE") or 1) > 1:
        ctx, dev = init_from_env(device)
        return ctx, dev
    device = resolve_device(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    return ctx, device
