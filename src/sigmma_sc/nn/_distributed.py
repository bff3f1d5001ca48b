"""A differentiable all-gather for contrastive losses over the global batch of several processes.

With one process per device, each rank embeds its shard of a batch; gathering the shards *with gradients*
lets every rank compute InfoNCE over the whole global batch (all negatives), as HESCAPE and open_clip do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


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
