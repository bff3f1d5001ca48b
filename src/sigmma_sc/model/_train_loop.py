"""Training loop of :meth:`SigmmaModel.fit`.

Step budget, warm-up and schedule, GradCache steps, gradient clipping, OOM fallback (CUDA) and memory
planning (CPU), early stopping, checkpoints, resume, and the per-epoch health records.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._settings import settings
from .._utils._progress import track
from ..nn._loss import grad_cache_backward
from . import _distributed as D
from ._bundle import TrainingBundle
from ._determinism import deterministic_on_cpu
from ._diagnostics import chance_loss, partner_rank, training_diagnostics
from ._finetune import build_boundary_cache, optimizer_groups, plan_boundary_cache
from ._memory import inference_chunks, plan_cpu_micro_batch

if TYPE_CHECKING:
    from ..nn._distributed import GlobalBatchNoise
    from ._sigmma import SigmmaModel

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
# config fields that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE = {"epochs", "steps", "patience", "micro_batch", "precision", "finetune_cache", "cache_dir"}
#: the cosine schedule decays to this fraction of the peak learning rate
_MIN_LR_RATIO = 0.01


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, else ``settings.device``, else CUDA when available, else CPU."""
    device = device or settings.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def check_bundle(model: SigmmaModel, bundle: TrainingBundle) -> None:
    """Raise ``ValueError`` when the bundle cannot train the model."""
    cfg = model.config
    if bundle.n_features != cfg.n_features:
        raise ValueError(
            f"The bundle has {bundle.n_features} node features but the model expects n_features={cfg.n_features}."
        )
    if model.finetuned:
        if bundle.tiles is None:
            raise ValueError(
                f"Fine-tuning backbone blocks (finetune_blocks={cfg.finetune_blocks}) needs the tile images: the "
                "bundle has no `tiles` (uint8 (T, C, H, W))."
            )
        return
    if bundle.image_features is None:
        raise ValueError("Training needs image features: the bundle has none (compute frozen backbone features first).")
    missing = [s for s in cfg.scales if s not in bundle.image_features]
    if missing:
        raise ValueError(f"The bundle has no image features for scales {missing}.")
    if bundle.image_dim != cfg.image_dim:
        raise ValueError(
            f"The bundle's image features have width {bundle.image_dim} but the model expects image_dim={cfg.image_dim} "
            "(features from another backbone?)."
        )


def _rng_states(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def _batches(idx: Tensor, size: int, *, merge_last: bool) -> list[Tensor]:
    """Consecutive chunks of ``size``; a last chunk with < 2 tiles is merged (``merge_last``) or dropped."""
    chunks = list(idx.split(size))
    if chunks and chunks[-1].numel() < 2:
        last = chunks.pop()
        if merge_last and chunks:
            chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of fresh forward-pass contexts: bf16 autocast for ``precision="bf16"`` on CUDA, else no-op."""
    if precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:  # noqa: FBT001 - internal
    """Allow TensorFloat-32 matmuls and convolutions inside the block (restored after)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _samplers(model: SigmmaModel) -> dict[str, torch.nn.Module]:
    return dict(getattr(model.st_encoder, "samplers", None) or {})


def _step_stats(model: SigmmaModel, max_grad_norm: float | None) -> dict[str, Tensor]:
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


def _train_step(
    model: SigmmaModel,
    data: TrainingBundle,
    idx: Tensor,
    optimizer: Any,
    state: dict[str, Any],
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    noise: GlobalBatchNoise | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimiser step on the tiles ``idx`` (CPU); halves the micro-batch and retries on CUDA OOM.

    ``amp`` makes the context of the forward passes (:func:`autocast_for`). The global gradient norm is clipped
    to ``config.max_grad_norm``. With micro-batches (GradCache), every random draw (dropout, edge sampling) is
    taken from the draw of the whole batch (``noise``, :func:`~sigmma_sc.model._distributed.rank_noise`; one is
    made for the step if not given), so the step does not depend on the micro-batch size: the same seed trains
    the same model whether the batch fits in memory or is split. Returns the detached loss and the step's
    statistics (:func:`_step_stats`) on the device (no host synchronisation).
    """

    def embed(chunk: Tensor) -> dict[str, Tensor]:
        with amp():
            return model.embed_batch(data.select(chunk))

    def micro_batched(mb: int, noise: GlobalBatchNoise) -> Tensor:
        noise.start_step(idx)  # each micro-batch's draws are its rows of the whole batch's draw
        try:
            embed_positions = D.batch_embedder(model, data, idx, amp, noise)
            chunks = list(torch.arange(idx.numel()).split(mb))
            return grad_cache_backward(embed_positions, chunks, model.loss_from_embeddings)
        finally:
            noise.end_step()

    device = data.device
    rng = _rng_states(device)
    while True:
        optimizer.zero_grad(set_to_none=True)
        oom = False
        try:
            mb = state["micro_batch"]
            if mb is None or mb >= idx.numel():
                loss = model.loss_from_embeddings(embed(idx))
                loss.backward()
            elif noise is not None:
                loss = micro_batched(mb, noise)
            else:
                with D.rank_noise(model, data._host_counts) as step_noise:
                    loss = micro_batched(mb, step_noise)
            stats = _step_stats(model, model.config.max_grad_norm)
            optimizer.step()
            return loss.detach(), stats
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block, so the traceback's tensors can be freed
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            current = state["micro_batch"] or idx.numel()
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
                idx.numel(),
            )
            _set_rng_states(rng, device)


def evaluate(
    model: SigmmaModel,
    data: TrainingBundle,
    idx: Tensor,
    batch_size: int,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float, float]:
    """Validation scores of the tiles ``idx`` (eval mode, deterministic edges).

    Returns the mean contrastive loss over batches of ``batch_size`` tiles, its chance level, and the mean
    normalised partner rank among all of ``idx`` (:func:`~sigmma_sc.model._diagnostics.partner_rank`).
    """
    was = model.training
    model.eval()
    total, count = torch.zeros((), device=data.device), 0
    chunks = _batches(idx, batch_size, merge_last=True)
    parts: dict[str, list[Tensor]] = {}
    with torch.inference_mode():
        for chunk in chunks:
            emb = _embed_inference(model, data, chunk, amp)
            total += model.loss_from_embeddings(emb) * chunk.numel()
            count += chunk.numel()
            for k, v in emb.items():
                parts.setdefault(k, []).append(v.float().cpu())
    model.train(was)
    rank = partner_rank({k: torch.cat(v) for k, v in parts.items()}, model.scales)
    return float(total) / max(count, 1), chance_loss([c.numel() for c in chunks], len(model.scales)), rank


def _embed_inference(model: SigmmaModel, data: TrainingBundle, idx: Tensor, amp) -> dict[str, Tensor]:
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
    model: SigmmaModel,
    data: TrainingBundle,
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
            emb = _embed_inference(model, data, chunk, amp)
            for k, v in emb.items():
                parts.setdefault(k, []).append(v.float().cpu())
    model.train(was)
    return {k: torch.cat(v) for k, v in parts.items()}


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


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _cpu_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _epoch_batches(perm: Tensor, batch: int, ctx: D.DistContext | None) -> list[Tensor]:
    """An epoch's batches; with several processes a last batch with fewer tiles than ranks joins the one before."""
    chunks = _batches(perm, batch, merge_last=False)
    return chunks if ctx is None else D.merge_small_last(chunks, ctx)


def _budget(
    cfg: Any, n_train: int, epochs: int | None, steps: int | None, ctx: D.DistContext | None = None
) -> dict[str, int]:
    """Batch size, batches per epoch, epoch and step budgets, warm-up steps."""
    batch = cfg.batch_for(n_train)
    per_epoch = max(len(_epoch_batches(torch.arange(n_train), batch, ctx)), 1)
    n_epochs = int(epochs) if epochs is not None else math.ceil(int(steps) / per_epoch)
    total = n_epochs * per_epoch if steps is None else min(int(steps), n_epochs * per_epoch)
    return {
        "batch": batch,
        "steps_per_epoch": per_epoch,
        "epochs": n_epochs,
        "steps": total,
        "warmup_steps": round(cfg.warmup * total),
    }


def fit_model(
    model: SigmmaModel,
    bundle: TrainingBundle,
    *,
    epochs: int | None,
    steps: int | None,
    device: str | torch.device | None,
    seed: int,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """Implementation of :meth:`SigmmaModel.fit` (see there)."""
    cfg = model.config
    check_bundle(model, bundle)
    if epochs is None and steps is None:
        raise ValueError("Give a training budget: `steps` or `epochs`.")
    train_idx = bundle.tiles_in("train").cpu()  # batches are indexed on the host
    if train_idx.numel() < 2:
        raise ValueError(
            f"Training needs at least 2 training tiles (in-batch negatives); the bundle has {train_idx.numel()}. "
            "Use a smaller `tile_size_um` in `sg.pp.tile`, or a larger section."
        )
    val_idx = bundle.tiles_in("val").cpu()
    if val_idx.numel() < 2:
        logger.warning(
            "%d validation tiles (< 2): no validation loss, no early stopping; the weights of the last epoch are "
            "kept. Use a smaller `tile_size_um` in `sg.pp.tile` for more tiles.",
            val_idx.numel(),
        )
        val_idx = None
    ctx, device = _join(device)  # after the cheap checks
    plan = _budget(cfg, train_idx.numel(), epochs, steps, ctx)
    if ctx is not None:
        D.check_same(
            {"config": cfg.to_dict(), "seed": seed, "plan": plan, "train": train_idx.tolist()[:1000],
             "n_val": 0 if val_idx is None else val_idx.numel(), "tiles": bundle.n_tiles,
             "checkpoint": checkpoint_dir is not None, "resume": resume},
            "the training set-up (bundle, config, seed, budget, checkpointing)", ctx,
        )  # fmt: skip
        progress = progress and ctx.is_main
        logger.info(
            "Distributed training on %d processes (rank %d): each embeds 1/%d of every %d-tile batch; negatives "
            "are gathered over all ranks.", ctx.world_size, ctx.rank, ctx.world_size, plan["batch"],
        )  # fmt: skip
    batch = plan["batch"]
    if batch < cfg.batch_size:
        logger.info(
            "Batches of %d tiles (batch_size=%d capped at max_batch_fraction=%g of the %d training tiles): %d "
            "optimiser steps per epoch.",
            batch, cfg.batch_size, cfg.max_batch_fraction, train_idx.numel(), plan["steps_per_epoch"],
        )  # fmt: skip
    logger.info(
        "Training budget: %d optimiser steps (%d epochs of %d steps), warm-up %d steps, %s schedule%s.",
        plan["steps"], plan["epochs"], plan["steps_per_epoch"], plan["warmup_steps"], cfg.schedule,
        "" if cfg.patience is None or val_idx is None else f", early stopping after {cfg.patience} steps without "
        "improvement",
    )  # fmt: skip
    auto_micro = None  # a CPU step larger than the free memory would get the process killed: split it first
    if device.type == "cpu" and ctx is None and cfg.micro_batch is None and not model.finetuned:
        auto_micro = plan_cpu_micro_batch(model, bundle, train_idx, plan["batch"])
    ckpt_path = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT
    if resume and ckpt_path is None:
        raise ValueError("`resume=True` needs `checkpoint_dir`.")
    if ctx is not None and resume:
        found = D.all_gather_objects(ckpt_path.exists(), ctx)
        if len(set(found)) > 1:
            raise RuntimeError(
                f"Only some ranks see the checkpoint {str(ckpt_path)!r} ({found}): `checkpoint_dir` must be on a "
                "file system that every rank shares."
            )

    cache_plan, cache_idx = None, None
    if model.finetuned and cfg.finetune_cache != "off":  # size planned (or refused) before anything slow
        cache_idx = torch.cat([train_idx, val_idx]) if val_idx is not None else train_idx
        cache_plan = plan_boundary_cache(
            model.image_encoder, cache_idx.numel(), model.scales, mode=cfg.finetune_cache, cache_dir=cfg.cache_dir,
            device=device,
        )  # fmt: skip
    model.to(device)
    # the pixels go to the device only to fine-tune without a cache
    data = bundle.to(device, tiles=model.finetuned and cache_plan is None)
    if cache_plan is not None:  # the frozen part runs once per tile; a step runs only the trainable blocks
        cache = build_boundary_cache(model.image_encoder, bundle.tiles, cache_idx, model.scales, cache_plan,
                                     device=device)  # fmt: skip
        data = data.with_boundary_cache(cache)
    fork_devices = [device] if device.type == "cuda" else []
    amp = autocast_for(cfg.precision, device)
    tf32 = cfg.precision in ("tf32", "bf16") and device.type == "cuda"

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps=plan["steps"], warmup_steps=plan["warmup_steps"], schedule=cfg.schedule,
            steps_per_epoch=plan["steps_per_epoch"], step_size=cfg.step_size, gamma=cfg.gamma,
        )  # fmt: skip

    with (
        torch.random.fork_rng(devices=fork_devices),
        tf32_matmuls(tf32),
        deterministic_on_cpu(device),
        contextlib.ExitStack() as stack,
    ):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        groups = optimizer_groups(model, model.image_encoder, cfg.lr, cfg.backbone_lr)
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        state: dict[str, Any] = {"micro_batch": cfg.micro_batch if auto_micro is None else auto_micro}
        history: list[dict[str, Any]] = []
        best_state, best_val, best_step, start, step, stopped = None, math.inf, 0, 0, 0, "budget"

        if resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            saved = {k: v for k, v in type(cfg).from_dict(ckpt["config"]).to_dict().items() if k not in _RESUMABLE}
            now = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
            if saved != now:
                diff = sorted(k for k in now if saved.get(k) != now[k])
                raise ValueError(
                    f"The checkpoint in {str(ckpt_path)!r} was written with a different config ({diff}); resume with "
                    "the same settings, or use another `checkpoint_dir`."
                )
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            generator.set_state(ckpt["generator"])
            _set_rng_states(ckpt["rng"], device)
            history, best_state, best_val = list(ckpt["history"]), ckpt["best_state"], float(ckpt["best_val"])
            best_step, step = int(ckpt.get("best_step", 0)), int(ckpt.get("step", 0))
            stopped = ckpt.get("stopped", "budget")
            state["micro_batch"] = ckpt["micro_batch"] if cfg.micro_batch is None else cfg.micro_batch
            if auto_micro is not None:
                state["micro_batch"] = min(state["micro_batch"] or auto_micro, auto_micro)
            start = int(ckpt["epoch"])
            logger.info("Resuming from %s after epoch %d (step %d).", ckpt_path, start, step)
        elif resume:
            logger.warning("No checkpoint at %s; training from scratch.", ckpt_path)
        if ctx is not None:
            D.broadcast_parameters(model, ctx)  # one start on every rank, as DDP does
        # micro-batches (and ranks) take their random draws from the whole batch's: results do not depend on them
        noise = stack.enter_context(D.rank_noise(model, bundle._host_counts))

        epochs_iter = range(start, plan["epochs"])
        bar = (
            track(epochs_iter, desc="Training SIGMMA", total=plan["epochs"], initial=start, unit="epoch")
            if progress
            else None
        )
        finished = stopped == "early stopping" or step >= plan["steps"]  # a resumed run that had ended
        for epoch in [] if finished else (bar if bar is not None else epochs_iter):
            t0 = time.perf_counter()
            model.train()
            perm = train_idx[torch.randperm(train_idx.numel(), generator=generator)]  # stays on the host
            total, sizes, sums = torch.zeros((), device=device), [], {}
            lr = optimizer.param_groups[0]["lr"]
            for idx in _epoch_batches(perm, batch, ctx):
                if step >= plan["steps"]:
                    break
                if ctx is None:
                    loss, stats = _train_step(model, data, idx, optimizer, state, amp, noise)
                else:
                    loss, stats = D.train_step(model, data, idx, optimizer, state, amp, ctx, noise,
                                               lambda: _step_stats(model, cfg.max_grad_norm))  # fmt: skip
                total += loss * idx.numel()
                sizes.append(idx.numel())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0) + v
                scheduler.step()
                step += 1
            val = chance = rank = None
            if val_idx is not None and ctx is None:
                val, chance, rank = evaluate(model, data, val_idx, batch, amp)
            elif val_idx is not None:  # each rank embeds its shard of every validation batch; rank 0's scores
                model.eval()
                chunks = _batches(val_idx, batch, merge_last=True)
                val, rank = D.evaluate(model, data, chunks, amp, ctx)
                chance = chance_loss([c.numel() for c in chunks], len(model.scales))
                model.train()
            record = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(total) / max(sum(sizes), 1),
                "train_chance": chance_loss(sizes, len(model.scales)),
                "val_loss": val,
                "val_chance": chance,
                "val_rank": rank,
                "lr": lr,
                **{k: float(v) / len(sizes) for k, v in sums.items()},
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            crit = rank if cfg.select_by == "retrieval" else val  # lower is better for both
            if crit is not None and crit < best_val:
                best_val, best_state, best_step = crit, _cpu_state(model), step
            if (
                cfg.patience is not None
                and crit is not None
                and step > plan["warmup_steps"]
                and step - best_step >= cfg.patience
            ):
                stopped = "early stopping"
            elif step >= plan["steps"]:
                stopped = "budget"
            if bar is not None:
                bar.set_postfix(
                    train=f"{record['train_loss']:.3f}",
                    val="-" if val is None else f"{val:.3f}/{chance:.2f} chance",
                    rank="-" if rank is None else f"{rank:.3f}/0.5",
                    step=step,
                )
            logger.debug("epoch %d: %s", epoch + 1, record)
            if ckpt_path is not None and (ctx is None or ctx.is_main):  # rank 0 writes; all ranks hold the same
                _save_checkpoint(
                    ckpt_path,
                    {
                        "config": cfg.to_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "model": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                        "rng": _rng_states(device),
                        "history": history,
                        "best_state": best_state,
                        "best_val": best_val,
                        "best_step": best_step,
                        "stopped": stopped,
                        "micro_batch": state["micro_batch"],
                    },
                )
            if stopped == "early stopping" or step >= plan["steps"]:
                break
        if bar is not None:
            bar.close()
    if ctx is not None:
        torch.distributed.barrier()  # rank 0's checkpoint is complete before any rank returns (or resumes)
    if stopped == "early stopping":
        logger.info(
            "Early stopping at step %d: no validation improvement for %d steps (patience=%d).",
            step, step - best_step, cfg.patience,
        )  # fmt: skip
    if best_state is not None:
        model.load_state_dict(best_state)
        logger.info(
            "Restored the weights of the best validation epoch (%s %.4f).",
            "val partner rank" if cfg.select_by == "retrieval" else "val loss", best_val,
        )  # fmt: skip
    held = val_idx if val_idx is not None else train_idx
    emb = embed_tiles(model, data, held, batch, amp) if held.numel() >= 2 else None
    model.diagnostics = training_diagnostics(
        history, emb, tiles="val" if val_idx is not None else "train", stopped=stopped, select_by=cfg.select_by
    ) | {"batch_size": batch, "steps_per_epoch": plan["steps_per_epoch"], "steps": step}
    model.eval()
    return history


def _join(device: str | torch.device | None) -> tuple[D.DistContext | None, torch.device]:
    """The process group and this rank's device.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the group is joined when the caller has not; a SLURM task alone is not
    taken as a launch (a notebook inside a multi-task allocation must not wait for other ranks): with ``srun``,
    use ``sigmma train-bundle`` or initialise the process group before ``fit``.
    """
    ctx = D.current()
    if ctx is None and (D._env_int("WORLD_SIZE") or 1) > 1:
        ctx, dev = D.init_from_env(device)
        return ctx, dev
    device = resolve_device(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    return ctx, device


def _torch_reason(e: BaseException) -> str:
    """The cause in a ``torch.load`` error, without its advice to load with ``weights_only=False``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    first = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint; a clear error when the file is not one (truncated, another format)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a corrupt file; chained, its advice would lead)
        # the fix first; torch's own advice ("re-running with weights_only=False") does not apply to a corrupt file
        raise ValueError(
            f"The checkpoint {str(path)!r} is corrupt or not a SIGMMA checkpoint: delete it (or use another "
            f"`checkpoint_dir`) to train from scratch. (torch could not read it: {_torch_reason(e)})"
        ) from None
    if not isinstance(ckpt, dict) or not {"config", "model", "optimizer", "epoch"} <= set(ckpt):
        raise ValueError(
            f"{str(path)!r} is not a SIGMMA training checkpoint; delete it or use another `checkpoint_dir`."
        )
    return ckpt
