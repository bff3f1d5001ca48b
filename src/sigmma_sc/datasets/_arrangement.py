"""A synthetic section where only the arrangement of the cells differs between tiles (issue 26)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from ._render import Frame, Renderer
from ._tissue import CELL_TYPES, NEST, TCELL, TUMOUR, Cells, Layout, noise_field, nucleus_draws

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: the two cell types of the section (codes into the synthetic tissue's cell types): large pale tumour nuclei and
#: small dark T-cell nuclei, so that their arrangement is visible in the H&E
ARRANGEMENT_TYPES = (TUMOUR, TCELL)
PATCH_SIGMA_UM = 24.0  # correlation length of the segregation field (patches of about 50-70 µm)
_RENDER_BLOCK = 1024


def mixing_score(xy: np.ndarray, is_a: np.ndarray, group: np.ndarray, k: int = 6) -> np.ndarray:
    """Per group (tile), the share of ``k``-nearest-neighbour pairs that join the two types, over its chance level.

    1 is a random arrangement (the share expected when the types are shuffled among the group's cells), 0 full
    segregation (no cell has a neighbour of the other type). Groups are numbered ``0 .. max``.
    """
    n_groups = int(group.max()) + 1
    out = np.full(n_groups, np.nan)
    for g in range(n_groups):
        m = np.flatnonzero(group == g)
        if m.size < k + 1:
            continue
        _, nbrs = cKDTree(xy[m]).query(xy[m], k=k + 1)
        a = is_a[m]
        hetero = (a[nbrs[:, 1:]] != a[:, None]).mean()
        n_a = a.sum()
        chance = 2 * n_a * (m.size - n_a) / (m.size * (m.size - 1))
        out[g] = hetero / chance if chance > 0 else np.nan
    return out


def synthetic_arrangement(
    *,
    n_tiles_side: int = 12,
    tile_size_um: float = 128.0,
    cells_per_tile: int = 100,
    n_genes: int = 60,
    pixel_size_um: float = 0.5,
    seed: int = 0,
) -> SpatialData:
    """A section whose tiles differ only in how their cells are arranged, with the arrangement visible in the H&E.

    The section is a square of ``n_tiles_side`` x ``n_tiles_side`` tiles of ``tile_size_um`` (aligned with the
    grid of :func:`sigmma_sc.pp.tile` at the same tile size). Every tile holds exactly ``cells_per_tile`` cells
    on a jittered lattice, half of them tumour cells and half T cells, so every tile has the same cell-type
    composition and the same cell density. A cell's expression is drawn from its type alone (negative-binomial
    counts around a type profile, log-normal library sizes), so a tile's summed or mean expression is the same in
    expectation everywhere. What differs is the arrangement: each tile draws a mixing parameter ``m`` uniformly in
    ``[0, 1]`` and labels as tumour the half of its cells with the highest ``cos(a) g + sin(a) z`` (``a = pi m^2 / 2``),
    ``g`` a smooth random field (correlation length 24 µm: patches of about 50-70 µm) and ``z`` independent noise
    per cell; ``m = 0`` gives segregated patches of each type, ``m = 1`` a random intermixing. The continuous
    ground truth per tile is the *mixing score* (``sigmma_sc.datasets._arrangement.mixing_score``: the share of 6-nearest-neighbour pairs of
    the tile that join the two types, divided by its value under random labelling; about 0.3 when segregated and
    1 when intermixed). The H&E is rendered as the other synthetic sections (tumour nuclei large and pale with open
    chromatin, T-cell nuclei small and dark, the same background everywhere), so the arrangement is visible in
    the image and nowhere else.

    Parameters
    ----------
    n_tiles_side
        Tiles per side of the section.
    tile_size_um
        Tile side in µm (tile the section with this ``tile_size_um``).
    cells_per_tile
        Cells per tile (a square number is laid out as a square lattice; others on the next larger lattice,
        thinned at random).
    n_genes
        Genes (type markers first, then shared background genes).
    pixel_size_um
        Pixel size of the rendered H&E.
    seed
        Random seed; the same seed gives the same section.

    Returns
    -------
    SpatialData from :func:`sigmma_sc.io.from_anndata`: image ``'he'``, shapes ``'cell_circles'`` annotated by
    ``tables['table']`` (raw counts in ``.X``) with ``.obs['cell_type']`` (``tumour`` / ``T_cell``),
    ``.obs['arrangement_tile']`` (index of the generating tile, row-major), ``.obs['mixing_param']`` (the tile's
    ``m``) and ``.obs['mixing_score']`` (the tile's mixing score), and ``.uns['sigmma_arrangement']`` (the
    parameters and the per-tile ``mixing_param`` and ``mixing_score``).
    """
    import anndata as ad

    from ..io import from_anndata

    if n_tiles_side < 2:
        raise ValueError(f"`n_tiles_side` must be >= 2, got {n_tiles_side}.")
    if cells_per_tile < 8:
        raise ValueError(f"`cells_per_tile` must be >= 8, got {cells_per_tile}.")
    if n_genes < 10:
        raise ValueError(f"`n_genes` must be >= 10, got {n_genes}.")
    if not tile_size_um > 0 or not pixel_size_um > 0:
        raise ValueError("`tile_size_um` and `pixel_size_um` must be positive.")
    rng_pos, rng_type, rng_nuc, rng_expr = np.random.default_rng(seed).spawn(4)
    n_tiles = n_tiles_side * n_tiles_side
    side = float(n_tiles_side * tile_size_um)

    # positions: a jittered lattice per tile, exactly `cells_per_tile` cells each
    per_side = int(np.ceil(np.sqrt(cells_per_tile)))
    step = tile_size_um / per_side
    gy, gx = np.meshgrid(np.arange(per_side), np.arange(per_side), indexing="ij")
    lattice = np.c_[gx.ravel(), gy.ravel()].astype(np.float64)
    xs, tile_of = [], []
    for t in range(n_tiles):
        r, c = divmod(t, n_tiles_side)
        pts = lattice[np.sort(rng_pos.choice(lattice.shape[0], cells_per_tile, replace=False))]
        pts = (pts + 0.5 + rng_pos.uniform(-0.3, 0.3, pts.shape)) * step
        xs.append(pts + np.array([c * tile_size_um, r * tile_size_um]))
        tile_of.append(np.full(cells_per_tile, t))
    xy = np.concatenate(xs)
    tile_of = np.concatenate(tile_of)
    n = xy.shape[0]

    # types: half tumour per tile, arranged by the tile's mixing parameter
    grid = 2.0
    shape = (int(np.ceil(tile_size_um / grid)),) * 2
    mixing_param = rng_type.uniform(0.0, 1.0, n_tiles)
    is_a = np.zeros(n, dtype=bool)
    for t in range(n_tiles):
        m = np.flatnonzero(tile_of == t)
        field = noise_field(rng_type, shape, grid, PATCH_SIGMA_UM)
        local = xy[m] - np.array([(t % n_tiles_side) * tile_size_um, (t // n_tiles_side) * tile_size_um])
        gi = np.clip((local / grid).astype(int), 0, shape[0] - 1)
        g = field[gi[:, 1], gi[:, 0]]
        angle = 0.5 * np.pi * mixing_param[t] ** 2  # squared: as many segregated tiles as intermixed ones
        f = np.cos(angle) * g + np.sin(angle) * rng_type.standard_normal(m.size)
        is_a[m[np.argsort(-f)[: m.size // 2]]] = True
    cell_type = np.where(is_a, ARRANGEMENT_TYPES[0], ARRANGEMENT_TYPES[1])
    score = mixing_score(xy, is_a, tile_of)

    cells = _nuclei(rng_nuc, xy, cell_type)
    counts = _expression(rng_expr, is_a, n_genes)
    genes = [f"TUMOUR_{i:02d}" for i in range(5)] + [f"TCELL_{i:02d}" for i in range(5)]
    genes += [f"GENE_{i:03d}" for i in range(n_genes - len(genes))]

    layout = Layout(
        width=side,
        height=side,
        grid=4.0,
        domain=np.full((int(np.ceil(side / 4.0)),) * 2, NEST, dtype=np.uint8),
        angle=np.zeros((int(np.ceil(side / 4.0)),) * 2, dtype=np.float32),
    )
    he = _render_he(Renderer(layout, cells, seed), cells, side, pixel_size_um)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.asarray(CELL_TYPES)[cell_type], categories=["tumour", "T_cell"]),
            "arrangement_tile": tile_of,
            "mixing_param": mixing_param[tile_of].astype(np.float32),
            "mixing_score": score[tile_of].astype(np.float32),
        },
        index=pd.Index([f"cell_{i}" for i in range(n)]),
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.uns["sigmma_arrangement"] = {
        "generator": "sigmma_sc.datasets.synthetic_arrangement",
        "seed": int(seed),
        "n_tiles_side": int(n_tiles_side),
        "tile_size_um": float(tile_size_um),
        "cells_per_tile": int(cells_per_tile),
        "patch_sigma_um": PATCH_SIGMA_UM,
        "mixing_param": mixing_param.tolist(),
        "mixing_score": score.tolist(),
    }
    logger.info(
        "Arrangement section: %d tiles of %g µm, %d cells, mixing score %.2f-%.2f.",
        n_tiles, tile_size_um, n, float(np.nanmin(score)), float(np.nanmax(score)),
    )  # fmt: skip
    return from_anndata(adata, he, pixel_size_um=pixel_size_um, coordinates="um", image_key="he", image_axes="yxc")


def _nuclei(rng: np.random.Generator, xy: np.ndarray, cell_type: np.ndarray) -> Cells:
    """Nuclear shape and stain per cell, drawn from the cell type (as the other synthetic sections)."""
    n = xy.shape[0]
    a, b, theta = np.empty(n), np.empty(n), rng.uniform(0, np.pi, n)
    hem, dapi, pleo = np.empty(n), np.empty(n), np.zeros((n, 4))
    for t in ARRANGEMENT_TYPES:
        m = cell_type == t
        k = int(m.sum())
        a[m], b[m], hem[m], dapi[m], pleo[m] = nucleus_draws(rng, t, k)
    vesicular = np.where(cell_type == TUMOUR, rng.uniform(0.3, 0.55, n), 0.0)
    return Cells(
        x=xy[:, 0],
        y=xy[:, 1],
        cell_type=cell_type,
        domain=np.full(n, NEST),
        a=a,
        b=b,
        theta=theta,
        expansion=np.full(n, 2.0),
        pleo=pleo,
        notch=np.zeros((n, 3)),
        hem=hem,
        dapi=dapi,
        vesicular=vesicular,
    )


def _expression(rng: np.random.Generator, is_a: np.ndarray, n_genes: int) -> sparse.csr_matrix:
    """Negative-binomial counts from each cell's type alone: 5 markers per type over a shared background."""
    base = rng.normal(0.0, 1.0, n_genes)
    logw = np.stack([base, base])
    logw[0, :5] += 3.0  # tumour markers
    logw[1, 5:10] += 3.0  # T-cell markers
    logw[:, 10:] += rng.normal(0.0, 0.3, (2, n_genes - 10))  # mild type differences in the background genes
    profiles = np.exp(logw)
    profiles /= profiles.sum(1, keepdims=True)
    t = np.where(is_a, 0, 1)
    lib = np.clip(np.where(is_a, 150.0, 90.0) * np.exp(rng.normal(0.0, 0.3, is_a.size)), 20, 600)
    mu = profiles[t] * lib[:, None]
    counts = rng.poisson(rng.gamma(3.0, mu / 3.0)).astype(np.float32)
    return sparse.csr_matrix(counts)


def _render_he(renderer: Renderer, cells: Cells, side: float, pixel_size_um: float) -> np.ndarray:
    """The H&E ``(y, x, 3)`` uint8 image of the whole section, rendered block by block."""
    size = int(np.ceil(side / pixel_size_um))
    frame = Frame((size, size), pixel_size_um)
    uv = frame.to_px(cells.x, cells.y)
    out = np.empty((size, size, 3), np.uint8)
    for r0 in range(0, size, _RENDER_BLOCK):
        for c0 in range(0, size, _RENDER_BLOCK):
            h, w = min(_RENDER_BLOCK, size - r0), min(_RENDER_BLOCK, size - c0)
            out[r0 : r0 + h, c0 : c0 + w] = renderer.he_block(frame, uv, r0, c0, h, w)
    return out
