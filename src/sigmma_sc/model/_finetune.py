"""Backbone fine-tuning parts of :class:`SigmmaModel`: building the image encoder and encoding tile pixels."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._constants import GRID
from ..nn._image_encoder import MultiCropEncoder, build_backbone
from ..train._memory import MEMORY_FRACTION, available_memory

logger = logging.getLogger(__name__)

#: ``SigmmaConfig.finetune_cache`` values
CACHE_MODES = ("auto", "memory", "disk", "off")
#: fraction of the free disk space a memory-mapped cache may take
DISK_FRACTION = 0.9


def build_image_encoder(
    backbone: str,
    backbone_info: Mapping[str, Any] | None,
    *,
    finetune_blocks: int,
    pretrained: bool,
    weights: str | None,
    seed: int,
) -> MultiCropEncoder:
    """The fine-tunable :class:`~sigmma_sc.nn.MultiCropEncoder` of a model.

    A random initialisation is drawn from ``seed`` (reproducible; the caller's RNG is untouched). ``input_size``/``mean``/``std`` of ``backbone_info`` (e.g. a smaller crop
    size the cached features were computed at) override the backbone's defaults.
    """
    model, info = build_backbone(backbone, pretrained=pretrained and weights is None, weights=weights, seed=seed)
    if backbone_info:
        if "num_features" in backbone_info and int(backbone_info["num_features"]) != info.num_features:
            raise ValueError(
                f"`backbone_info` describes a backbone with {backbone_info['num_features']} features but "
                f"{backbone!r} has {info.num_features}."
            )
        given = {k: backbone_info[k] for k in ("input_size", "mean", "std") if k in backbone_info}
        if given:
            info = dataclasses.replace(
                info,
                **{k: int(v) if k == "input_size" else tuple(float(x) for x in v) for k, v in given.items()},
            )
    return MultiCropEncoder(model, info, finetune_blocks=finetune_blocks)


def encode_tiles(encoder: MultiCropEncoder, tiles: Tensor, scales: Sequence[str]) -> dict[str, Tensor]:
    """Float32 multi-crop features of ``(B, C, H, W)`` tiles (bf16 autocast on CUDA; autograd as the caller's)."""
    cuda = tiles.device.type == "cuda"
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        feats = encoder(tiles, scales)
    return {s: f.float() for s, f in feats.items()}


def encode_cached(encoder: MultiCropEncoder, boundary: Tensor, scales: Sequence[str]) -> dict[str, Tensor]:
    """Float32 multi-crop features from cached frozen-part outputs (only the trainable blocks run; bf16 on CUDA)."""
    cuda = boundary.device.type == "cuda"
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        feats = encoder.forward_cached(boundary, scales)
    return {s: f.float() for s, f in feats.items()}


def cache_dtype(device: torch.device | str) -> torch.dtype:
    """Storage type of the frozen-part cache: bf16 on CUDA (the backbone runs under bf16 autocast), else float32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def plan_boundary_cache(
    encoder: MultiCropEncoder,
    n_tiles: int,
    scales: Sequence[str],
    *,
    mode: str = "auto",
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    available: int | None = None,
    free_disk: int | None = None,
) -> dict[str, Any]:
    """Where the frozen part's outputs of ``n_tiles`` tiles go, from their size: memory, a memory-mapped file, or refuse.

    The size is ``n_tiles x crops per tile x boundary shape x bytes per value``; it is logged before anything is
    built. ``"auto"`` keeps the cache in memory when it takes at most ``MEMORY_FRACTION`` of the available memory
    (as the CPU step planner, ``sigmma_sc.train._memory``), else memory-maps it in ``cache_dir`` (default: the
    temporary directory) when the disk has room. ``"memory"`` / ``"disk"`` force one. Raises ``MemoryError`` naming
    the fixes when it fits nowhere allowed, ``ValueError`` when the backbone cannot be split.

    Returns
    -------
    ``{"mode": "memory" | "disk", "bytes", "shape", "dtype", "n_tiles", "n_crops", "dir"}``.
    """
    if mode not in CACHE_MODES or mode == "off":
        raise ValueError(f"`finetune_cache` must be one of {CACHE_MODES[:3]} to plan a cache, got {mode!r}.")
    encoder.check_cacheable()
    shape = encoder.boundary_shape()
    dtype = cache_dtype(device)
    n_crops = sum(GRID[s] ** 2 for s in scales)
    nbytes = int(n_tiles) * n_crops * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    directory = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    if available is None:
        available = available_memory()
    mem_budget = math.inf if available is None else MEMORY_FRACTION * available
    if free_disk is None and mode != "memory":
        probe = directory if directory.exists() else directory.parent
        free_disk = shutil.disk_usage(probe).free if probe.exists() else 0
    disk_budget = DISK_FRACTION * (free_disk or 0)
    gib = 2**30
    what = (
        f"{n_tiles} tiles x {n_crops} crops x {tuple(shape)} {str(dtype).removeprefix('torch.')} = "
        f"{nbytes / gib:.2f} GiB"
    )
    chosen = None
    if mode in ("auto", "memory") and nbytes <= mem_budget:
        chosen = "memory"
    elif mode in ("auto", "disk") and nbytes <= disk_budget:
        chosen = "disk"
    if chosen is None:
        free_mem = "unknown" if available is None else f"{available / gib:.1f} GiB"
        where = {
            "memory": f"memory ({free_mem} available, at most {MEMORY_FRACTION:g} of it)",
            "disk": f"{str(directory)!r} ({(free_disk or 0) / gib:.1f} GiB free)",
            "auto": f"memory ({free_mem} available) nor {str(directory)!r} ({(free_disk or 0) / gib:.1f} GiB free)",
        }[mode]
        raise MemoryError(
            f"The fine-tuning cache of the backbone's frozen part ({what}) does not fit in {where}. Fixes: "
            "`cache_dir=` on a disk with room (`finetune_cache='disk'`: memory-mapped), a smaller `input_size`, "
            "fewer tiles, or `finetune_cache='off'` (no cache: every crop re-encoded through the whole backbone at "
            "every step)."
        )
    logger.info(
        "Fine-tuning cache of the frozen backbone part (before its last %d blocks): %s, %s%s.",
        encoder.finetune_blocks, what,
        "in memory" if chosen == "memory" else f"memory-mapped in {str(directory)!r}",
        "" if available is None else f" ({available / gib:.1f} GiB memory available)",
    )  # fmt: skip
    return {"mode": chosen, "bytes": nbytes, "shape": shape, "dtype": dtype, "n_tiles": int(n_tiles),
            "n_crops": n_crops, "dir": str(directory)}  # fmt: skip


class BoundaryCache:
    """The frozen part's output for a set of tiles, in memory or memory-mapped on disk, gathered by tile index.

    A memory-mapped file is unlinked as soon as it is mapped (POSIX): nothing is left behind, and its disk space is
    freed when the cache is garbage-collected or :meth:`close` d.

    Parameters
    ----------
    tile_idx
        ``(n,)`` the bundle tiles it holds (row ``i`` holds tile ``tile_idx[i]``).
    n_tiles
        Tiles in the bundle.
    plan
        From :func:`plan_boundary_cache`.
    """

    def __init__(self, tile_idx: Tensor, n_tiles: int, plan: Mapping[str, Any]):
        self.rows = torch.full((int(n_tiles),), -1, dtype=torch.long)
        self.rows[tile_idx.cpu()] = torch.arange(tile_idx.numel())
        self.mode = plan["mode"]
        self.dtype = plan["dtype"]
        shape = (tile_idx.numel(), plan["n_crops"], *plan["shape"])
        if self.mode == "memory":
            self._memmap = None
            self.store = torch.empty(shape, dtype=self.dtype)
        else:
            Path(plan["dir"]).mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="sigmma_finetune_cache_", suffix=".npy", dir=plan["dir"])
            os.close(fd)
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[self.dtype]
            try:
                self._memmap = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
            finally:
                Path(path).unlink()  # the mapping keeps the data; the space is freed with it
            self.store = torch.from_numpy(self._memmap).view(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.store.numel() * self.store.element_size()

    def write(self, start: int, values: Tensor) -> None:
        """Store rows ``start:start + len(values)``."""
        self.store[start : start + values.shape[0]] = values.detach().to("cpu", self.dtype)

    def gather(self, tile_idx: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """``(B, n_crops, *shape)`` of the bundle tiles ``tile_idx`` (host indices), on ``device``."""
        rows = self.rows[tile_idx.cpu()]
        if bool((rows < 0).any()):
            missing = tile_idx.cpu()[rows < 0][:5].tolist()
            raise ValueError(f"Tiles {missing} are not in the fine-tuning cache (it holds the train and val tiles).")
        out = self.store[rows]
        device = torch.device(device)
        if device.type == "cuda":
            return out.pin_memory().to(device, non_blocking=True)
        return out.to(device)

    def close(self) -> None:
        """Release the storage."""
        self.store = torch.empty(0, dtype=self.dtype)
        self._memmap = None


def build_boundary_cache(
    encoder: MultiCropEncoder,
    tiles: Tensor,
    tile_idx: Tensor,
    scales: Sequence[str],
    plan: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> BoundaryCache:
    """Run the frozen part once over the tiles ``tile_idx`` of ``tiles`` (``(T, C, H, W)`` uint8) into a cache.

    Eval mode, no gradients, bf16 autocast on CUDA; the encoder's mode is restored after.
    """
    cache = BoundaryCache(tile_idx, tiles.shape[0], plan)
    device = torch.device(device)
    was = encoder.training
    encoder.eval()
    cuda = device.type == "cuda"
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext(),
        ):
            for start in range(0, tile_idx.numel(), batch_size):
                idx = tile_idx[start : start + batch_size].cpu()
                cache.write(start, encoder.frozen_crops(tiles[idx].to(device, non_blocking=True), scales))
    finally:
        encoder.train(was)
    logger.info("Cached the frozen backbone part of %d tiles (%.2f GiB, %s).", tile_idx.numel(), cache.nbytes / 2**30,
                cache.mode)  # fmt: skip
    return cache


def as_tile_tensor(tiles: Tensor | np.ndarray) -> Tensor:
    """``(T, C, H, W)`` tile images as a tensor (``uint8`` 0..255 or float in ``[0, 1]``), validated."""
    t = torch.as_tensor(np.asarray(tiles) if not isinstance(tiles, Tensor) else tiles)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"`tiles` must have shape (T, C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}.")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"`tiles` must be uint8 (0..255) or float in [0, 1], got {t.dtype}.")
    return t


def optimizer_groups(model: torch.nn.Module, encoder: MultiCropEncoder | None, lr: float, backbone_lr: float) -> list:
    """AdamW parameter groups: the trainable heads/GNN at ``lr`` (group 0), the trainable backbone at ``backbone_lr``.

    Frozen parameters (``requires_grad=False``) are left out, so the optimiser never touches them. With
    ``config.head_weight_decay`` the projection heads get a group of their own with that weight decay; a learned
    temperature (``model.log_logit_scale``) gets one without weight decay. Groups without ``weight_decay`` use
    the optimiser's (``config.weight_decay``).
    """
    backbone = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
    ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    config = getattr(model, "config", None)
    head_wd = getattr(config, "head_weight_decay", None)
    heads = []
    if head_wd is not None:
        heads = [p for name in ("image_heads", "st_heads") for p in getattr(model, name).parameters() if p.requires_grad]
    scale = getattr(model, "log_logit_scale", None)
    special = [scale] if scale is not None else []
    ids |= {id(p) for p in heads + special}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if heads:
        groups.append({"params": heads, "lr": lr, "weight_decay": float(head_wd)})
    if special:
        groups.append({"params": special, "lr": lr, "weight_decay": 0.0})
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr})
    return groups


def check_finetune(
    backbone: str,
    finetune_blocks: int,
    *,
    n_tiles: int,
    scales: Sequence[str],
    input_size: int | None = None,
    finetune_cache: str = "auto",
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any] | None:
    """Refuse a fine-tuning set-up that cannot work, before anything slow.

    The backbone's architecture is built on the ``meta`` device (no weights, no computation). Raises ``ValueError`` for a backbone without blocks to fine-tune, ``finetune_blocks`` larger than its blocks or
    a cache that cannot split it, ``MemoryError`` for a cache of ``n_tiles`` tiles that fits nowhere
    (:func:`plan_boundary_cache`). Returns the cache plan (``None`` without a cache, or for a hub name, whose
    architecture needs the network and is checked when it is built).
    """
    if finetune_blocks < 1 or str(backbone).startswith(("hf-hub:", "local-dir:")):
        return None
    with torch.device("meta"):
        model, info = build_backbone(backbone, pretrained=False)
    if input_size is not None:
        info = dataclasses.replace(info, input_size=int(input_size))
    encoder = MultiCropEncoder(model, info, finetune_blocks=int(finetune_blocks))
    if finetune_cache == "off":
        return None
    return plan_boundary_cache(
        encoder, n_tiles, scales, mode=finetune_cache, cache_dir=cache_dir, device=device
    )  # fmt: skip
