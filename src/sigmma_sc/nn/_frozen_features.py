"""Frozen multi-crop features of a stream of tiles: batching, pinned host-to-device staging, bf16 autocast."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .._constants import SCALES
from .._utils._progress import track
from ._image_encoder import MultiCropEncoder


def featurize(
    tiles: Iterable[np.ndarray],
    encoder: MultiCropEncoder,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    total: int | None = None,
    channels_last: bool | None = None,
) -> dict[str, np.ndarray]:
    """Frozen multi-crop features of a stream of tiles.

    Batches the tiles and runs the encoder under ``torch.inference_mode`` with bf16 autocast on CUDA
    (float32 on CPU), with a progress bar. On CUDA the host never waits for the GPU until the end: each
    batch is stacked into a reused pinned buffer and copied on a side stream (overlapping the previous
    batch's compute), features stay on the device and return to pinned host memory asynchronously.

    Parameters
    ----------
    tiles
        Iterable of ``(C, H, W)`` ``uint8`` arrays (or float in ``[0, 1]``), all of the same shape.
    encoder
        A :class:`MultiCropEncoder`.
    batch_size
        Tiles per batch (21 crops each).
    device
        Torch device (``None``: CUDA when available, else CPU).
    total
        Number of tiles for the progress bar (default ``len(tiles)`` when defined).
    channels_last
        Run the backbone in ``channels_last`` memory format (``None``: on CUDA for convolutional backbones;
        see :meth:`MultiCropEncoder.use_channels_last`).

    Returns
    -------
    Scale -> ``(T, num_features)`` float32 array, rows in input order.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    encoder = encoder.to(device).eval()
    if channels_last is None:
        channels_last = cuda and not encoder.info.is_vit
    encoder.use_channels_last(enabled=channels_last)
    if total is None and hasattr(tiles, "__len__"):
        total = len(tiles)  # type: ignore[arg-type]
    pending: dict[str, list[Tensor]] = {s: [] for s in SCALES}
    done: dict[str, list[Tensor]] = {s: [] for s in SCALES}
    stage = _Stager(device) if cuda else None

    def flush_to_host() -> None:
        for s in SCALES:
            if pending[s]:
                d = torch.cat(pending[s])
                done[s].append(d if not cuda else torch.empty(d.shape, pin_memory=True).copy_(d, non_blocking=True))
                pending[s].clear()

    def run(buf: list[np.ndarray]) -> None:
        t = stage(buf) if stage is not None else torch.from_numpy(np.stack(buf))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            res = encoder(t)
        for s in SCALES:
            pending[s].append(res[s].float())  # stays on the device; copied to the host in chunks
        if len(pending[SCALES[0]]) >= 32:
            flush_to_host()

    buf: list[np.ndarray] = []
    with torch.inference_mode():
        for tile in track(tiles, desc="Featurising tiles", total=total, unit="tile"):
            buf.append(np.asarray(tile))
            if len(buf) == batch_size:
                run(buf)
                buf = []
        if buf:
            run(buf)
        flush_to_host()
    if cuda:
        torch.cuda.synchronize(device)
    dim = encoder.info.num_features
    return {s: torch.cat(done[s]).numpy() if done[s] else np.zeros((0, dim), np.float32) for s in SCALES}


class _Stager:
    """Host -> device copies of tile batches through reused pinned buffers on a side CUDA stream."""

    def __init__(self, device: torch.device, slots: int = 3):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[Tensor | None] = [None] * slots
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.k = 0

    def __call__(self, buf: list[np.ndarray]) -> Tensor:
        slot = self.k % len(self.buffers)
        self.k += 1
        first = buf[0]
        pinned = self.buffers[slot]
        if (
            pinned is None
            or pinned.shape[1:] != first.shape
            or pinned.shape[0] < len(buf)
            or pinned.numpy().dtype != first.dtype
        ):
            pinned = torch.from_numpy(np.empty((len(buf), *first.shape), first.dtype)).pin_memory()
            self.buffers[slot] = pinned
        elif self.events[slot] is not None:
            self.events[slot].synchronize()  # this buffer's previous copy has finished
        host = pinned[: len(buf)]
        np.stack(buf, out=host.numpy())
        with torch.cuda.stream(self.stream):
            t = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        t.record_stream(torch.cuda.current_stream(self.device))
        return t
