"""A small synthetic :class:`~sigmma_sc.model.TrainingBundle` for tests and ``benchmarks/bench_gpu.py``.

Needs only numpy, torch and ``sigmma_sc.model`` (no scverse packages), so the GPU benchmark can use it on a bare machine.
"""

from __future__ import annotations

import numpy as np
import torch

from sigmma_sc._constants import GRID, SCALES
from sigmma_sc.model import TrainingBundle


def _nearest(d: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` nearest allowed columns of each row of the distance matrix ``d``."""
    d = np.where(allowed, d, np.inf)
    k = min(k, d.shape[1])
    if k == 0:
        return np.empty(0, int), np.empty(0, int)
    if k < d.shape[1]:  # the k smallest per row (argpartition), then ordered by distance then column
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(d, part, 1)
        nn = np.take_along_axis(part, np.lexsort((part, vals), axis=1), 1)
    else:
        nn = np.argsort(d, axis=1, kind="stable")
    rows = np.repeat(np.arange(d.shape[0]), k)
    cols = nn.reshape(-1)
    keep = np.isfinite(d[rows, cols])
    return rows[keep], cols[keep]


def toy_bundle(
    n_tiles: int = 24,
    n_features: int = 8,
    image_dim: int = 12,
    *,
    min_cells: int = 10,
    max_cells: int = 40,
    n_neighs: int = 4,
    n_cand: int = 3,
    noise: float = 0.1,
    n_empty: int = 0,
    tile_size: int | None = None,
    channels: int = 3,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> TrainingBundle:
    """Random tiles with a learnable image <-> ST signal.

    Each tile has a latent vector; its cells' features are the latent plus noise, its image features
    at every scale are a fixed random linear map of the mean cell feature plus ``noise``. Cells get
    the ``n_neighs`` nearest neighbours inside their tile (directed kNN, as squidpy) and ``n_cand``
    meso/macro candidates (nearest non-neighbours in the same meso block / tile). Splits are 8:1:1
    in tile order; the last ``n_empty`` tiles have no cells. With ``tile_size``, the bundle also holds
    ``uint8`` tile images whose 4x4 blocks are coloured by another random linear map of the mean cell
    feature (plus pixel noise), for fine-tuning tests.

    Parameters
    ----------
    n_tiles, n_features, image_dim
        Sizes.
    min_cells, max_cells
        Range of cells per non-empty tile.
    n_neighs, n_cand
        kNN and candidate neighbours per cell.
    noise
        Standard deviation of the noise added to the image features.
    n_empty
        Number of tiles without cells.
    tile_size
        Side of the tile images in pixels (``None``: no images).
    channels
        Channels of the tile images (1 or 3).
    seed
        Seed of :func:`numpy.random.default_rng`.
    device
        Device the bundle is validated and normalised on (default CPU; a GPU is much faster for large toys).

    Returns
    -------
    The bundle, on ``device``.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_cells, max_cells + 1, n_tiles)
    if n_empty:
        counts[-n_empty:] = 0
    ptr = np.concatenate([[0], np.cumsum(counts)])
    tile = np.repeat(np.arange(n_tiles), counts)
    latent = rng.normal(size=(n_tiles, n_features))
    x = (latent[tile] + 0.5 * rng.normal(size=(ptr[-1], n_features))).astype(np.float32)
    pos = rng.random((ptr[-1], 2)).astype(np.float32)
    meso = (np.floor(pos * GRID["meso"]).astype(int) * [1, GRID["meso"]]).sum(1)
    knn, cm, cM = [], [], []
    for t in range(n_tiles):  # test data only: a loop over tiles is fine here
        a, b = ptr[t], ptr[t + 1]
        if b - a < 2:
            continue
        p = pos[a:b]
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)
        not_self = ~np.eye(b - a, dtype=bool)
        r, c = _nearest(d, not_self, n_neighs)
        linked = np.zeros_like(not_self)
        linked[r, c] = linked[c, r] = True
        knn.append(np.stack([r, c]) + a)
        free = not_self & ~linked
        same_meso = meso[a:b, None] == meso[None, a:b]
        r2, c2 = _nearest(d, free & same_meso, n_cand)
        cm.append(np.stack([r2, c2]) + a)
        r3, c3 = _nearest(d, free, n_cand)
        cM.append(np.stack([r3, c3]) + a)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=1) if parts else np.empty((2, 0), int)

    mean_x = np.zeros((n_tiles, n_features))
    np.add.at(mean_x, tile, x)
    mean_x /= np.maximum(counts, 1)[:, None]
    feats = {}
    for s in SCALES:
        w = rng.normal(size=(n_features, image_dim)) / np.sqrt(n_features)
        feats[s] = (mean_x @ w + noise * rng.normal(size=(n_tiles, image_dim))).astype(np.float32)
    split = np.zeros(n_tiles, np.int8)
    n_val = max(n_tiles // 10, 2) if n_tiles >= 10 else 0
    split[n_tiles - 2 * n_val - n_empty : n_tiles - n_val - n_empty] = 1
    split[n_tiles - n_val - n_empty : n_tiles - n_empty] = 2
    tiles = None
    if tile_size is not None:  # drawn last: the other tensors do not depend on it
        w = rng.normal(size=(n_features, channels * 16)) / np.sqrt(n_features)
        blocks = (mean_x @ w).reshape(n_tiles, channels, 4, 4)
        cells = np.arange(tile_size) * 4 // tile_size
        img = (
            128
            + 40 * blocks[:, :, cells][:, :, :, cells]
            + 8 * rng.normal(size=(n_tiles, channels, tile_size, tile_size))
        )
        tiles = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")

    return TrainingBundle(
        x=t(x),
        cell_ptr=t(ptr),
        pos=t(pos),
        edge_index=t(cat(knn)),
        cand_meso=t(cat(cm)),
        cand_macro=t(cat(cM)),
        image_features={s: t(f) for s, f in feats.items()},
        split=t(split),
        tiles=t(tiles),
        meta={"source": "toy_bundle", "seed": seed},
    )
