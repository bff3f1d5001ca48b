"""Data-parallel training on torch.distributed: process-group setup, batch sharding, gradient averaging.

One process per device (``torchrun --nproc-per-node N``, or one SLURM task per GPU). Every rank holds the
whole bundle and draws the same shuffled global batches (same seed); rank ``r`` embeds its contiguous shard
of each batch, the shards are all-gathered with gradients (:func:`sigmma_sc.nn.gather_embeddings`) so each
rank's InfoNCE sees the global batch's negatives, and parameter gradients are averaged over ranks before the
optimiser step. Inside a step every random draw (dropout, Gumbel edge noise) is rebuilt from the draw of the
whole global batch (:func:`rank_noise`), so the update equals one process training on the global batch (up to
float rounding) and every rank's random state stays equal. :meth:`SigmmaModel.fit` uses :func:`train_step` and
:func:`evaluate` when a process group with more than one process is initialised (or described by the
environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..nn._distributed import GlobalBatchNoise, gather_embeddings
from ..nn._loss import grad_cache_backward
from ._diagnostics import partner_rank

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


# ---------------------------------------------------------------------------------------------------------------
# the pieces of SigmmaModel.fit under torch.distributed


@contextlib.contextmanager
def rank_noise(model: torch.nn.Module, counts: Mapping[str, Tensor]) -> Iterator[GlobalBatchNoise]:
    """A :class:`~sigmma_sc.nn.GlobalBatchNoise` for ``model``, with the edge samplers' draws named explicitly.

    Each edge sampler's Gumbel noise is drawn as rows of ``cand_{scale}``; a shard without candidates at a scale
    (the sampler returns before drawing) still consumes the global draw, so the random streams stay aligned.
    The hooks are removed on exit.
    """
    noise = GlobalBatchNoise({k: counts[k] for k in ("cells", "cand_meso", "cand_macro") if k in counts})
    handles = []
    samplers = dict(getattr(getattr(model, "st_encoder", None), "samplers", None) or {})
    for scale, sampler in samplers.items():
        kind = f"cand_{scale}"

        def pre(module: torch.nn.Module, args: tuple, kind: str = kind) -> None:
            if not (module.training and noise.in_chunk):
                return
            h, edge_index = args[0], args[1]
            if edge_index.shape[1] == 0:
                noise.skipped_rand(kind, torch.float32, h.device)  # what the sampler would draw for the batch
            noise.push(kind)

        def post(module: torch.nn.Module, args: tuple, out: Any) -> None:
            if module.training and noise.in_chunk:
                noise.pop()

        handles += [sampler.register_forward_pre_hook(pre), sampler.register_forward_hook(post)]
    try:
        yield noise
    finally:
        for h in handles:
            h.remove()


def batch_embedder(
    model: Any,
    data: Any,
    idx: Tensor,
    amp: Callable[[], contextlib.AbstractContextManager],
    noise: GlobalBatchNoise,
) -> Callable[[Tensor], dict[str, Tensor]]:
    """``embed(pos)``: embeddings of the positions ``pos`` of the batch ``idx`` (a shard, a micro-batch).

    Every random draw of the forward pass is taken as their rows of the whole batch's draw
    (:class:`~sigmma_sc.nn.GlobalBatchNoise`); ``noise.start_step(idx)`` begins the step.
    """

    def embed(pos: Tensor) -> dict[str, Tensor]:
        start = int(pos[0]) if pos.numel() else 0
        noise.start_chunk(start, start + pos.numel())
        try:
            with amp(), noise:
                return model.embed_batch(data.select(idx[pos]))
        finally:
            noise.end_chunk()

    return embed


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
    global batch (:func:`rank_noise`). ``stats`` runs after the backward (clipping, statistics). No OOM retry:
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
    partner rank (:func:`~sigmma_sc.model._diagnostics.partner_rank`) is taken over the gathered embeddings of
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
