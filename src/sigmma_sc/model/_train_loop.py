"""Training loop of :meth:`SigmmaModel.fit`: batching, GradCache steps, OOM fallback, checkpoints, resume."""

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
from ._bundle import TrainingBundle
from ._finetune import optimizer_groups

if TYPE_CHECKING:
    from ._sigmma import SigmmaModel

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
# config fields that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE = {"epochs", "micro_batch", "precision"}


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


def _train_step(
    model: SigmmaModel,
    data: TrainingBundle,
    idx: Tensor,
    optimizer: Any,
    state: dict[str, Any],
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """One optimiser step on the tiles ``idx`` (CPU); halves the micro-batch and retries on CUDA OOM.

    ``amp`` makes the context of the forward passes (:func:`autocast_for`). Returns the detached loss on
    the device (no host synchronisation).
    """

    def embed(chunk: Tensor) -> dict[str, Tensor]:
        with amp():
            return model.embed_batch(data.select(chunk))

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
            else:
                loss = grad_cache_backward(embed, list(idx.split(mb)), model.loss_from_embeddings)
            optimizer.step()
            return loss.detach()
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
) -> float:
    """Mean contrastive loss over the tiles ``idx`` (eval mode, deterministic edges; batches in order)."""
    was = model.training
    model.eval()
    total, count = torch.zeros((), device=data.device), 0
    with torch.inference_mode():
        for chunk in _batches(idx, batch_size, merge_last=True):
            with amp():
                emb = model.embed_batch(data.select(chunk))
            total += model.loss_from_embeddings(emb) * chunk.numel()
            count += chunk.numel()
    model.train(was)
    return float(total) / max(count, 1)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _cpu_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit_model(
    model: SigmmaModel,
    bundle: TrainingBundle,
    *,
    epochs: int,
    device: str | torch.device | None,
    seed: int,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """Implementation of :meth:`SigmmaModel.fit` (see there)."""
    cfg = model.config
    check_bundle(model, bundle)
    train_idx = bundle.tiles_in("train").cpu()  # batches are indexed on the host
    if train_idx.numel() < 2:
        raise ValueError(
            f"Training needs at least 2 training tiles (in-batch negatives); the bundle has {train_idx.numel()}."
        )
    val_idx = bundle.tiles_in("val").cpu()
    if val_idx.numel() < 2:
        logger.warning(
            "%d validation tiles (< 2): no validation loss; the weights of the last epoch are kept.", val_idx.numel()
        )
        val_idx = None
    device = resolve_device(device)
    ckpt_path = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT
    if resume and ckpt_path is None:
        raise ValueError("`resume=True` needs `checkpoint_dir`.")

    model.to(device)
    data = bundle.to(device, tiles=model.finetuned)  # the pixels go to the device only to fine-tune
    fork_devices = [device] if device.type == "cuda" else []
    amp = autocast_for(cfg.precision, device)
    tf32 = cfg.precision in ("tf32", "bf16") and device.type == "cuda"
    with torch.random.fork_rng(devices=fork_devices), tf32_matmuls(tf32):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        groups = optimizer_groups(model, model.image_encoder, cfg.lr, cfg.backbone_lr)
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        state: dict[str, Any] = {"micro_batch": cfg.micro_batch}
        history: list[dict[str, Any]] = []
        best_state, best_val, start = None, math.inf, 0

        if resume and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            saved = {k: v for k, v in type(cfg).from_dict(ckpt["config"]).to_dict().items() if k not in _RESUMABLE}
            now = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
            if saved != now:
                diff = sorted(k for k in now if saved.get(k) != now[k])
                raise ValueError(f"The checkpoint in {str(ckpt_path)!r} was written with a different config ({diff}).")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            generator.set_state(ckpt["generator"])
            _set_rng_states(ckpt["rng"], device)
            history, best_state, best_val = list(ckpt["history"]), ckpt["best_state"], float(ckpt["best_val"])
            state["micro_batch"] = ckpt["micro_batch"] if cfg.micro_batch is None else cfg.micro_batch
            start = int(ckpt["epoch"])
            logger.info("Resuming from %s after epoch %d.", ckpt_path, start)
        elif resume:
            logger.warning("No checkpoint at %s; training from scratch.", ckpt_path)

        epochs_iter = range(start, epochs)
        bar = (
            track(epochs_iter, desc="Training SIGMMA", total=epochs, initial=start, unit="epoch") if progress else None
        )
        for epoch in bar if bar is not None else epochs_iter:
            t0 = time.perf_counter()
            model.train()
            perm = train_idx[torch.randperm(train_idx.numel(), generator=generator)]  # stays on the host
            total, count = torch.zeros((), device=device), 0
            for idx in _batches(perm, cfg.batch_size, merge_last=False):
                total += _train_step(model, data, idx, optimizer, state, amp) * idx.numel()
                count += idx.numel()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            val = evaluate(model, data, val_idx, cfg.batch_size, amp) if val_idx is not None else None
            record = {
                "epoch": epoch + 1,
                "train_loss": float(total) / count,
                "val_loss": val,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            if val is not None and val < best_val:
                best_val, best_state = val, _cpu_state(model)
            if bar is not None:
                bar.set_postfix(train=f"{record['train_loss']:.4f}", val="-" if val is None else f"{val:.4f}")
            logger.debug("epoch %d: %s", epoch + 1, record)
            if ckpt_path is not None:
                _save_checkpoint(
                    ckpt_path,
                    {
                        "config": cfg.to_dict(),
                        "epoch": epoch + 1,
                        "model": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                        "rng": _rng_states(device),
                        "history": history,
                        "best_state": best_state,
                        "best_val": best_val,
                        "micro_batch": state["micro_batch"],
                    },
                )
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
        logger.info("Restored the weights of the best validation epoch (val loss %.4f).", best_val)
    model.eval()
    return history
