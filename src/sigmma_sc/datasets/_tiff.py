"""Tiled, pyramidal OME-TIFF writing from a block renderer, without holding level 0 in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

TILE = 512
BLOCK = 2048  # rendering block; a multiple of TILE and of 2**(levels - 1)


def n_levels(shape: tuple[int, int], min_side: int = 256, max_levels: int = 8) -> int:
    """Number of pyramid levels (factor 2) until the short side would drop below ``min_side``."""
    return int(np.clip(1 + np.floor(np.log2(max(min(shape) / min_side, 1.0))), 1, max_levels))


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (edge-replicated for odd sizes), keeping the dtype; integer images use integer arithmetic."""
    ph, pw = a.shape[0] % 2, a.shape[1] % 2
    if ph or pw:
        a = np.pad(a, [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2:
        acc = np.uint16 if a.dtype.itemsize == 1 else np.uint32
        total = a[0::2, 0::2].astype(acc)
        for part in (a[1::2, 0::2], a[0::2, 1::2], a[1::2, 1::2]):
            total += part
        total += 2
        total >>= 2
        return total.astype(a.dtype)
    f = a.astype(np.float32)
    return (0.25 * (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2])).astype(a.dtype)


def iter_strips(
    shape: tuple[int, int], render: Callable[[int, int, int, int], tuple], block: int = BLOCK, n_threads: int = 2
) -> Iterator[tuple[int, list[np.ndarray | None]]]:
    """Render an image strip by strip (``block`` rows), block by block; yield ``(row0, outputs)``.

    ``render(r0, c0, h, w)`` returns a tuple of arrays (or None) shaped ``(h, w, ...)``; the blocks of a strip
    are rendered by ``n_threads`` threads (each block is deterministic on its own).
    """
    height, width = shape
    with ThreadPoolExecutor(max_workers=n_threads) as pool:  # numpy and scipy release the GIL
        for r0 in range(0, height, block):
            h = min(block, height - r0)
            parts = list(pool.map(lambda c0: render(r0, c0, h, min(block, width - c0)), range(0, width, block)))  # noqa: B023
            yield r0, [None if p[0] is None else np.concatenate(p, axis=1) for p in zip(*parts, strict=True)]


def _tiles(a: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    for r in range(0, a.shape[0], tile):
        for c in range(0, a.shape[1], tile):
            yield a[r : r + tile, c : c + tile]


def _ome_metadata(pixel_size: float, *, rgb: bool, channel: str | None) -> dict:
    meta = {
        "axes": "YXS" if rgb else "YX",
        "PhysicalSizeX": pixel_size,
        "PhysicalSizeY": pixel_size,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm",
    }
    if channel is not None:
        meta["Channel"] = {"Name": [channel]}
    return meta


def write_pyramid(
    path: Path,
    strips: Iterator[tuple[int, np.ndarray]],
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    pixel_size: float,
    levels: int,
    compression: str,
    compressionargs: dict | None = None,
    channel: str | None = None,
) -> None:
    """Write a pyramidal OME-TIFF whose level 0 arrives as strips of ``BLOCK`` rows.

    Sub-resolutions are written as SubIFDs (one series, ``levels`` levels); they are downsampled
    strip-wise into buffers of 1/4, 1/16, ... of the level-0 size while level 0 streams to disk.
    """
    rgb = len(shape) == 3
    extra = shape[2:]
    shapes = [shape[:2]]
    for _ in range(1, levels):
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    buffers = [np.zeros((*s, *extra), dtype) for s in shapes[1:]]

    def level0() -> Iterator[np.ndarray]:
        for r0, strip in strips:
            cur = strip
            for k, buf in enumerate(buffers, start=1):
                cur = _downsample2(cur)
                rk = r0 >> k
                buf[rk : rk + cur.shape[0]] = cur[: buf.shape[0] - rk]
            yield from _tiles(strip, TILE)

    opts = {
        "tile": (TILE, TILE),
        "compression": compression,
        "compressionargs": compressionargs,
        "photometric": "rgb" if rgb else "minisblack",
        "resolutionunit": "CENTIMETER",
        "maxworkers": 2,
        "buffersize": 1 << 25,  # tiles queued for the encoder threads; they keep their strips alive
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            level0(),
            shape=shape,
            dtype=dtype,
            subifds=levels - 1,
            resolution=(1e4 / pixel_size, 1e4 / pixel_size),
            metadata=_ome_metadata(pixel_size, rgb=rgb, channel=channel),
            software="sigmma_sc synthetic",
            **opts,
        )
        for k, buf in enumerate(buffers, start=1):
            ps = pixel_size * 2**k
            tif.write(
                _tiles(buf, TILE),
                shape=buf.shape,
                dtype=dtype,
                subfiletype=1,
                resolution=(1e4 / ps, 1e4 / ps),
                **opts,
            )


def write_blank_pyramid(
    path: Path, shape: tuple[int, int], dtype: np.dtype, *, pixel_size: float, levels: int, channel: str
) -> None:
    """A constant-zero pyramidal OME-TIFF of full extent, written from one pre-encoded tile (fast, tiny)."""
    import imagecodecs

    encoded = imagecodecs.zlib_encode(np.zeros((TILE, TILE), dtype).tobytes())
    opts = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "minisblack", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k in range(levels):
            s = (-(-shape[0] // 2**k), -(-shape[1] // 2**k))
            n_tiles = (-(-s[0] // TILE)) * (-(-s[1] // TILE))
            ps = pixel_size * 2**k
            kwargs = (
                {"subifds": levels - 1, "metadata": _ome_metadata(pixel_size, rgb=False, channel=channel)}
                if k == 0
                else {"subfiletype": 1}
            )
            tif.write(
                iter([encoded] * n_tiles),
                shape=s,
                dtype=dtype,
                resolution=(1e4 / ps, 1e4 / ps),
                **kwargs,
                **opts,
            )
