"""The training loop of :meth:`SigmmaModel.fit <sigmma_sc.model.SigmmaModel.fit>`, in pieces with hooks.

The :class:`Trainer` runs the loop; the pieces live beside it: the step (:mod:`._step`: loss, backward, GradCache
micro-batches, clipping, CUDA OOM fallback), the budget and schedule (:mod:`._schedule`), validation, model
selection and early stopping (:mod:`._validation`), checkpoints (:mod:`._checkpoint`), torch.distributed
(:mod:`._distributed`), host-memory planning (:mod:`._memory`) and the health records (:mod:`._diagnostics`).
:class:`Callback` hooks observe a run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils._progress import track
from . import _distributed as D
from . import _noise as N
from ._checkpoint import CHECKPOINT, check_resumable, load_checkpoint, save_checkpoint
from ._determinism import deterministic_on_cpu
from ._device import autocast_for, tf32_matmuls
from ._diagnostics import chance_loss, training_diagnostics
from ._memory import plan_cpu_micro_batch
from ._schedule import budget, epoch_batches, scheduler_for
from ._step import rng_states, set_rng_states, step_stats, train_step
from ._validation import ModelSelection, cpu_state, embed_tiles, validate

logger = logging.getLogger(__name__)


def check_bundle(model: Any, bundle: Any) -> None:
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


@dataclass
class TrainingState:
    """What changes during a run and is checkpointed with it."""

    epoch: int = 0  #: epochs completed
    step: int = 0  #: optimiser steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    micro_batch: int | None = None  #: tiles per forward pass (``None``: the whole batch)
    stopped: str = "budget"  #: why training ended (``"budget"`` or ``"early stopping"``)


class Trainer:
    """Trains a :class:`~sigmma_sc.model.SigmmaModel` on a :class:`~sigmma_sc.model.TrainingBundle`.

    :meth:`SigmmaModel.fit <sigmma_sc.model.SigmmaModel.fit>` documents what a run does and runs one; build a
    trainer yourself only to keep a handle on it. The parameters are those of ``fit`` (``epochs`` and ``steps``
    are the budgets already resolved from the config). :meth:`fit` leaves the kept weights in the model and the
    health checks in ``model.diagnostics``; ``SigmmaModel.fit`` also stores the history and the bundle's meta.

    Parameters
    ----------
    model
        The model to train (its ``config`` holds the optimisation settings).
    bundle
        Training data with a train/val split.
    epochs, steps
        Epoch and optimiser-step budgets (at least one given).
    device
        Torch device (``None``: ``sigmma_sc.settings.device``, else CUDA when available, else CPU).
    seed
        Training seed.
    checkpoint_dir
        Directory of ``last.pt``.
    resume
        Continue from ``checkpoint_dir/last.pt``.
    progress
        Show a progress bar.
    callbacks
        :class:`Callback` instances whose hooks observe the run.
    """

    def __init__(
        self,
        model: Any,
        bundle: Any,
        *,
        epochs: int | None,
        steps: int | None,
        device: str | torch.device | None = None,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        callbacks: Iterable[Callback] | None = None,
    ):
        self.model, self.bundle, self.cfg = model, bundle, model.config
        self.epochs, self.steps, self.seed = epochs, steps, seed
        self.checkpoint_dir, self.resume, self.progress = checkpoint_dir, resume, progress
        self.callbacks = CallbackList(callbacks)
        self._device = device
        self.state = TrainingState()

    # ------------------------------------------------------------------ the run
    def fit(self) -> list[dict[str, Any]]:
        """Train; return the history (one record per epoch). The model ends in eval mode with the kept weights."""
        self._check()
        self._plan()
        self._prepare_data()
        with (
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            tf32_matmuls(self.cfg.precision in ("tf32", "bf16") and self.device.type == "cuda"),
            deterministic_on_cpu(self.device),
            contextlib.ExitStack() as stack,
        ):
            self._start()
            # micro-batches (and ranks) take their random draws from the whole batch's: results do not depend on them
            self.noise = stack.enter_context(N.rank_noise(self.model, self.bundle._host_counts))
            self.callbacks("on_fit_start", self)
            self._run_epochs()
        if self.ctx is not None:
            torch.distributed.barrier()  # rank 0's checkpoint is complete before any rank returns (or resumes)
        self._finish()
        return self.state.history

    def embed(self, idx: Tensor) -> dict[str, Tensor]:
        """Eval-mode embeddings of the tiles ``idx`` with the current weights (``"image/{s}"``, ``"st/{s}"``).

        Float32 on the CPU; the model's train/eval mode is restored afterwards.
        """
        return embed_tiles(self.model, self.data, idx, self.plan["batch"], self.amp)

    # ------------------------------------------------------------------ set-up, cheap checks first
    def _check(self) -> None:
        """The bundle, the budget and the training/validation tiles."""
        check_bundle(self.model, self.bundle)
        if self.epochs is None and self.steps is None:
            raise ValueError("Give a training budget: `steps` or `epochs`.")
        self.train_idx = self.bundle.tiles_in("train").cpu()  # batches are indexed on the host
        if self.train_idx.numel() < 2:
            raise ValueError(
                f"Training needs at least 2 training tiles (in-batch negatives); the bundle has "
                f"{self.train_idx.numel()}. Use a smaller `tile_size_um` in `sg.pp.tile`, or a larger section."
            )
        val_idx = self.bundle.tiles_in("val").cpu()
        if val_idx.numel() < 2:
            logger.warning(
                "%d validation tiles (< 2): no validation loss, no early stopping; the weights of the last epoch "
                "are kept. Use a smaller `tile_size_um` in `sg.pp.tile` for more tiles.",
                val_idx.numel(),
            )
            val_idx = None
        self.val_idx = val_idx

    def _plan(self) -> None:
        """Process group, device, budget, CPU micro-batch and checkpoint path (before anything slow)."""
        cfg, train_idx = self.cfg, self.train_idx
        self.ctx, self.device = D.join(self._device)  # after the cheap checks
        self.plan = plan = budget(cfg, train_idx.numel(), self.epochs, self.steps, self.ctx)
        if self.ctx is not None:
            self._check_ranks()
        if plan["batch"] < cfg.batch_size:
            logger.info(
                "Batches of %d tiles (batch_size=%d capped at max_batch_fraction=%g of the %d training tiles): %d "
                "optimiser steps per epoch.",
                plan["batch"], cfg.batch_size, cfg.max_batch_fraction, train_idx.numel(), plan["steps_per_epoch"],
            )  # fmt: skip
        logger.info(
            "Training budget: %d optimiser steps (%d epochs of %d steps), warm-up %d steps, %s schedule%s.",
            plan["steps"], plan["epochs"], plan["steps_per_epoch"], plan["warmup_steps"], cfg.schedule,
            "" if cfg.patience is None or self.val_idx is None else f", early stopping after {cfg.patience} steps "
            "without improvement",
        )  # fmt: skip
        self.auto_micro = None  # a CPU step larger than the free memory would get the process killed: split it first
        if self.device.type == "cpu" and self.ctx is None and cfg.micro_batch is None and not self.model.finetuned:
            self.auto_micro = plan_cpu_micro_batch(self.model, self.bundle, train_idx, plan["batch"])
        self.ckpt_path = self._checkpoint_path()

    def _check_ranks(self) -> None:
        """Every rank has the same set-up; only rank 0 shows progress."""
        ctx, plan = self.ctx, self.plan
        D.check_same(
            {"config": self.cfg.to_dict(), "seed": self.seed, "plan": plan, "train": self.train_idx.tolist()[:1000],
             "n_val": 0 if self.val_idx is None else self.val_idx.numel(), "tiles": self.bundle.n_tiles,
             "checkpoint": self.checkpoint_dir is not None, "resume": self.resume},
            "the training set-up (bundle, config, seed, budget, checkpointing)", ctx,
        )  # fmt: skip
        self.progress = self.progress and ctx.is_main
        logger.info(
            "Distributed training on %d processes (rank %d): each embeds 1/%d of every %d-tile batch; negatives "
            "are gathered over all ranks.", ctx.world_size, ctx.rank, ctx.world_size, plan["batch"],
        )  # fmt: skip

    def _checkpoint_path(self) -> Path | None:
        path = None
        if self.checkpoint_dir is not None:
            Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            path = Path(self.checkpoint_dir) / CHECKPOINT
        if self.resume and path is None:
            raise ValueError("`resume=True` needs `checkpoint_dir`.")
        if self.ctx is not None and self.resume:
            found = D.all_gather_objects(path.exists(), self.ctx)
            if len(set(found)) > 1:
                raise RuntimeError(
                    f"Only some ranks see the checkpoint {str(path)!r} ({found}): `checkpoint_dir` must be on a "
                    "file system that every rank shares."
                )
        return path

    def _prepare_data(self) -> None:
        """The model and the bundle on the device; with fine-tuning, the frozen part's cache (planned first)."""
        model, device = self.model, self.device
        cache_plan, cache_idx = None, None
        if model.finetuned and self.cfg.finetune_cache != "off":  # size planned (or refused) before anything slow
            cache_idx = torch.cat([self.train_idx, self.val_idx]) if self.val_idx is not None else self.train_idx
            cache_plan = model.plan_boundary_cache(cache_idx.numel(), device)
        model.to(device)
        # the pixels go to the device only to fine-tune without a cache
        data = self.bundle.to(device, tiles=model.finetuned and cache_plan is None)
        if cache_plan is not None:  # the frozen part runs once per tile; a step runs only the trainable blocks
            data = data.with_boundary_cache(model.build_boundary_cache(self.bundle.tiles, cache_idx, cache_plan))
        self.data = data
        self.amp = autocast_for(self.cfg.precision, device)

    def _start(self) -> None:
        """Seed, optimiser and schedule; then a checkpoint's state when resuming, and one start on every rank."""
        cfg = self.cfg
        torch.manual_seed(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.optimizer_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           **fused)  # fmt: skip
        self.scheduler = scheduler_for(self.optimizer, cfg, self.plan)
        self.state.micro_batch = cfg.micro_batch if self.auto_micro is None else self.auto_micro
        self.selection = ModelSelection(cfg.select_by, cfg.patience, self.plan["warmup_steps"])
        if self.resume and self.ckpt_path.exists():
            self._restore(load_checkpoint(self.ckpt_path))
        elif self.resume:
            logger.warning("No checkpoint at %s; training from scratch.", self.ckpt_path)
        if self.ctx is not None:
            D.broadcast_parameters(self.model, self.ctx)  # one start on every rank, as DDP does

    # ------------------------------------------------------------------ checkpoints
    def _restore(self, ckpt: dict[str, Any]) -> None:
        check_resumable(ckpt, self.cfg, self.ckpt_path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.generator.set_state(ckpt["generator"])
        set_rng_states(ckpt["rng"], self.device)
        sel, state = self.selection, self.state
        state.history, sel.best_state, sel.best_val = list(ckpt["history"]), ckpt["best_state"], float(ckpt["best_val"])
        sel.best_step, state.step = int(ckpt.get("best_step", 0)), int(ckpt.get("step", 0))
        state.stopped = ckpt.get("stopped", "budget")
        state.micro_batch = ckpt["micro_batch"] if self.cfg.micro_batch is None else self.cfg.micro_batch
        if self.auto_micro is not None:
            state.micro_batch = min(state.micro_batch or self.auto_micro, self.auto_micro)
        state.epoch = int(ckpt["epoch"])
        logger.info("Resuming from %s after epoch %d (step %d).", self.ckpt_path, state.epoch, state.step)

    def _save(self) -> None:
        """Write the checkpoint (rank 0; every rank holds the same state)."""
        if self.ckpt_path is None or (self.ctx is not None and not self.ctx.is_main):
            return
        sel, state = self.selection, self.state
        save_checkpoint(
            self.ckpt_path,
            {
                "config": self.cfg.to_dict(),
                "epoch": state.epoch,
                "step": state.step,
                "model": cpu_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(),
                "rng": rng_states(self.device),
                "history": state.history,
                "best_state": sel.best_state,
                "best_val": sel.best_val,
                "best_step": sel.best_step,
                "stopped": state.stopped,
                "micro_batch": state.micro_batch,
            },
        )
        self.callbacks("on_checkpoint", self, self.ckpt_path)

    # ------------------------------------------------------------------ epochs
    def _run_epochs(self) -> None:
        plan, state = self.plan, self.state
        epochs = range(state.epoch, plan["epochs"])
        bar = None
        if self.progress:
            bar = track(epochs, desc="Training SIGMMA", total=plan["epochs"], initial=state.epoch, unit="epoch")
        finished = state.stopped == "early stopping" or state.step >= plan["steps"]  # a resumed run that had ended
        for epoch in [] if finished else (bar if bar is not None else epochs):
            record = self._train_epoch(epoch)
            state.epoch = epoch + 1
            self._end_epoch(record, bar)
            if state.stopped == "early stopping" or state.step >= plan["steps"]:
                break
        if bar is not None:
            bar.close()

    def _step(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimiser step on the batch ``idx`` (this process, or every rank's shard of it)."""
        step = {"micro_batch": self.state.micro_batch}
        if self.ctx is None:
            out = train_step(self.model, self.data, idx, self.optimizer, step, self.amp, self.noise)
        else:
            out = D.train_step(self.model, self.data, idx, self.optimizer, step, self.amp, self.ctx, self.noise,
                               lambda: step_stats(self.model, self.cfg.max_grad_norm))  # fmt: skip
        self.state.micro_batch = step["micro_batch"]  # halved after a CUDA OOM
        return out

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """An epoch's steps over the shuffled training tiles, then validation; the epoch's history record."""
        t0 = time.perf_counter()
        model, state = self.model, self.state
        model.train()
        perm = self.train_idx[torch.randperm(self.train_idx.numel(), generator=self.generator)]  # stays on the host
        total, sizes, sums = torch.zeros((), device=self.device), [], {}
        lr = self.optimizer.param_groups[0]["lr"]
        for idx in epoch_batches(perm, self.plan["batch"], self.ctx):
            if state.step >= self.plan["steps"]:
                break
            loss, stats = self._step(idx)
            total += loss * idx.numel()
            sizes.append(idx.numel())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
            self.scheduler.step()
            state.step += 1
            self.callbacks("on_train_batch_end", self, loss, stats)
        val, chance, rank = validate(model, self.data, self.val_idx, self.plan["batch"], self.amp, self.ctx)
        return {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": float(total) / max(sum(sizes), 1),
            "train_chance": chance_loss(sizes, len(model.scales)),
            "val_loss": val,
            "val_chance": chance,
            "val_rank": rank,
            "lr": lr,
            **{k: float(v) / len(sizes) for k, v in sums.items()},
            "seconds": time.perf_counter() - t0,
        }

    def _end_epoch(self, record: dict[str, Any], bar: Any) -> None:
        """Record the epoch, keep the best weights, decide early stopping, show progress, checkpoint, call hooks."""
        state = self.state
        state.history.append(record)
        if self.selection.update(record, self.model):
            state.stopped = "early stopping"
        elif state.step >= self.plan["steps"]:
            state.stopped = "budget"
        if bar is not None:
            val, chance, rank = record["val_loss"], record["val_chance"], record["val_rank"]
            bar.set_postfix(
                train=f"{record['train_loss']:.3f}",
                val="-" if val is None else f"{val:.3f}/{chance:.2f} chance",
                rank="-" if rank is None else f"{rank:.3f}/0.5",
                step=state.step,
            )
        logger.debug("epoch %d: %s", record["epoch"], record)
        self._save()
        self.callbacks("on_epoch_end", self, record)

    def _finish(self) -> None:
        """Restore the best weights; the health checks on held-out embeddings (``model.diagnostics``)."""
        model, cfg, sel, state = self.model, self.cfg, self.selection, self.state
        if state.stopped == "early stopping":
            logger.info(
                "Early stopping at step %d: no validation improvement for %d steps (patience=%d).",
                state.step, state.step - sel.best_step, cfg.patience,
            )  # fmt: skip
        if sel.best_state is not None:
            model.load_state_dict(sel.best_state)
            logger.info(
                "Restored the weights of the best validation epoch (%s %.4f).",
                "val partner rank" if cfg.select_by == "retrieval" else "val loss", sel.best_val,
            )  # fmt: skip
        held = self.val_idx if self.val_idx is not None else self.train_idx
        emb = self.embed(held) if held.numel() >= 2 else None
        model.diagnostics = training_diagnostics(
            state.history, emb, tiles="val" if self.val_idx is not None else "train", stopped=state.stopped,
            select_by=cfg.select_by,
        ) | {"batch_size": self.plan["batch"], "steps_per_epoch": self.plan["steps_per_epoch"], "steps": state.step}
        model.eval()
        self.callbacks("on_fit_end", self)


class Callback:
    """Base class of the hooks the :class:`~sigmma_sc.train.Trainer` calls; every hook does nothing by default.

    Subclass it and override the hooks you need; pass instances as ``callbacks=[...]`` to
    :meth:`~sigmma_sc.model.SigmmaModel.fit` or :func:`~sigmma_sc.tl.train_sigmma`. A hook receives the trainer,
    whose attributes describe the run: ``model``, ``data`` (the bundle on the training device), ``train_idx`` and
    ``val_idx`` (tile indices; ``val_idx`` is ``None`` without validation tiles), ``plan`` (batch size, steps and
    epochs), ``state`` (``step``, ``history``, ``micro_batch``, ``stopped``) and ``selection`` (best epoch so far);
    :meth:`~sigmma_sc.train.Trainer.embed` gives eval-mode embeddings of any tiles. A hook that only reads
    leaves training unchanged (no random draws happen in eval mode); one that draws random numbers or changes
    the model does change it.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """After the set-up (and a resumed checkpoint), before the first epoch."""

    def on_train_batch_end(self, trainer: Trainer, loss: Tensor, stats: dict[str, Tensor]) -> None:
        """After every optimiser step: the detached loss and the step's statistics (gradient norm, edge sampler).

        Both stay on the training device; reading them (``float(loss)``) waits for the device.
        """

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's validation, selection and checkpoint: the epoch's history record."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After the checkpoint ``path`` has been written (rank 0 only)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the best weights are restored and ``model.diagnostics`` written."""


class CallbackList:
    """Calls a hook on every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback] | None):
        self.callbacks = list(callbacks or ())
        for c in self.callbacks:
            if not isinstance(c, Callback):
                raise TypeError(f"Callbacks subclass `sigmma_sc.train.Callback`; got {type(c).__name__}.")

    def __call__(self, hook: str, trainer: Trainer, *args: Any) -> None:
        """Call ``hook(trainer, *args)`` on every callback."""
        for c in self.callbacks:
            getattr(c, hook)(trainer, *args)
