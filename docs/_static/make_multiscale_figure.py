"""Draw ``multiscale.png``: SIGMMA's three scales, image crops above the cell graph that grows with them.

Run from anywhere: ``python docs/_static/make_multiscale_figure.py``. Needs numpy, scipy and matplotlib
only (the tile and its cells are synthetic; the graph rules are those of ``sg.pp.cell_graph`` and the
model: 6-NN inside a micro block, then sampled edges inside a meso block, then inside the whole tile).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from PIL import Image
from scipy.spatial import cKDTree

TILE_UM = 128.0
GRID = {"micro": 4, "meso": 2, "macro": 1}
COLORS = {"micro": "#4c72b0", "meso": "#dd8452", "macro": "#c44e52"}
OUT = Path(__file__).with_name("multiscale.png")


def _cells(rng: np.random.Generator) -> np.ndarray:
    """Clustered cell centroids (µm) in one 128 µm tile: a few nests plus scattered stroma."""
    centres = rng.uniform(15, TILE_UM - 15, (6, 2))
    nests = np.concatenate([c + rng.normal(0, 8, (22, 2)) for c in centres])
    stroma = rng.uniform(0, TILE_UM, (70, 2))
    xy = np.concatenate([nests, stroma])
    return xy[(xy > 1).all(1) & (xy < TILE_UM - 1).all(1)]


def _he(xy: np.ndarray, rng: np.random.Generator, px: int = 256) -> np.ndarray:
    """An H&E-like RGB rendering: eosin background with fibres, haematoxylin nuclei at the cells."""
    yy, xx = (np.mgrid[0:px, 0:px] + 0.5) * TILE_UM / px
    eosin = np.array([0.93, 0.72, 0.82])
    haem = np.array([0.33, 0.22, 0.55])
    fibres = 0.5 + 0.5 * np.sin(0.25 * xx + 0.15 * yy + 2 * np.sin(0.05 * yy))
    img = np.ones((px, px, 3)) * (eosin - 0.06 * fibres[..., None])
    nucleus = np.zeros((px, px))
    for x, y in xy:
        r = rng.uniform(2.0, 3.2)
        d = np.hypot((xx - x) * rng.uniform(0.8, 1.0), yy - y)
        nucleus = np.maximum(nucleus, 0.9 / (1 + np.exp((d - r) / 0.35)))
    img = img * (1 - nucleus[..., None]) + haem * nucleus[..., None]
    return np.clip(img, 0, 1)


def _block(xy: np.ndarray, grid: int) -> np.ndarray:
    ij = np.minimum((xy / (TILE_UM / grid)).astype(int), grid - 1)
    return ij[:, 1] * grid + ij[:, 0]


def _graphs(xy: np.ndarray, rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """Edges per scale: micro 6-NN within micro blocks; meso and macro add sampled candidate edges."""
    tree = cKDTree(xy)
    _, nn = tree.query(xy, k=7)
    micro_b = _block(xy, 4)
    micro = {(min(u, v), max(u, v)) for u in range(len(xy)) for v in nn[u, 1:] if micro_b[u] == micro_b[v]}
    added: dict[str, list[tuple[int, int]]] = {"micro": sorted(micro)}
    linked = set(micro)
    for scale, grid, p in (("meso", 2, 0.35), ("macro", 1, 0.2)):
        blocks = _block(xy, grid)
        _, cand = tree.query(xy, k=16)
        new = set()
        for u in range(len(xy)):
            options = [v for v in cand[u, 1:] if blocks[v] == blocks[u] and (min(u, v), max(u, v)) not in linked]
            for v in options[:3]:  # k nearest unlinked candidates in the same block
                if rng.uniform() < p:  # the Gumbel-sigmoid sample (here: a coin with the edge's score)
                    new.add((min(u, v), max(u, v)))
        added[scale] = sorted(new)
        linked |= new
    return added


def _grid_lines(ax, grid: int, color: str, lw: float) -> None:
    for k in range(1, grid):
        c = k * TILE_UM / grid
        ax.axvline(c, color=color, lw=lw)
        ax.axhline(c, color=color, lw=lw)


def _frame(ax, color: str) -> None:
    ax.set_xlim(0, TILE_UM)
    ax.set_ylim(TILE_UM, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3)


def main() -> None:
    """Draw the figure."""
    rng = np.random.default_rng(4)
    xy = _cells(rng)
    img = _he(xy, rng)
    edges = _graphs(xy, rng)

    fig, axes = plt.subplots(2, 3, figsize=(12, 9.2), gridspec_kw={"hspace": 0.62, "wspace": 0.22})
    side = {"micro": 32, "meso": 64, "macro": 128}
    n_crops = {"micro": 16, "meso": 4, "macro": 1}
    for col, scale in enumerate(GRID):
        grid, color = GRID[scale], COLORS[scale]
        ax = axes[0, col]
        ax.imshow(img, extent=(0, TILE_UM, TILE_UM, 0))
        _grid_lines(ax, grid, "white", 2.0)
        w = TILE_UM / grid
        ax.add_patch(Rectangle((0, 0), w, w, fill=False, ec=color, lw=3.5, zorder=5))
        _frame(ax, color)
        ax.set_title(
            f"{scale}\n{grid}×{grid} grid: {n_crops[scale]} crop{'s' if n_crops[scale] > 1 else ''} "
            f"of {side[scale]} µm",
            color=color,
            fontsize=11,
            fontweight="bold",
        )
        ax.set_xlabel(
            f"each crop → resized to 224 px → backbone\nmean over the {n_crops[scale]} crop"
            f"{'s' if n_crops[scale] > 1 else ''} → $z^I_{{\\mathrm{{{scale}}}}}$",
            fontsize=9.5,
        )

        ax = axes[1, col]
        ax.set_facecolor("#fbfbfb")
        _grid_lines(ax, grid, color, 1.2)
        order = list(GRID)[: col + 1]
        for s in order:
            current = s == scale
            for u, v in edges[s]:
                ax.plot(
                    *xy[[u, v]].T,
                    color=COLORS[s],
                    lw=1.3 if current else 0.8,
                    alpha=0.95 if current else 0.45,
                    zorder=2 if current else 1,
                )
        ax.scatter(*xy.T, s=9, c="#333333", zorder=3, linewidths=0)
        _frame(ax, color)
        n_edges = sum(len(edges[s]) for s in order)
        what = {
            "micro": "6-NN edges kept only inside\na micro block (neighbour-patch rule)",
            "meso": "+ sampled edges between\nunlinked cells of a meso block",
            "macro": "+ sampled edges anywhere\nin the tile",
        }[scale]
        ax.set_title(f"$G_{{\\mathrm{{{scale}}}}}$: {n_edges} edges", color=color, fontsize=11, fontweight="bold")
        ax.set_xlabel(f"{what}\nGraphSAGE → attention pooling → $z^S_{{\\mathrm{{{scale}}}}}$", fontsize=9.5)

    fig.canvas.draw()
    for col, scale in enumerate(GRID):
        top, bottom = axes[0, col].get_position(), axes[1, col].get_position()
        x = (top.x0 + top.x1) / 2
        arrow = FancyArrowPatch(
            (x, bottom.y1 + 0.04),
            (x, top.y0 - 0.075),
            transform=fig.transFigure,
            arrowstyle="<|-|>",
            mutation_scale=18,
            color=COLORS[scale],
            lw=2,
        )
        fig.patches.append(arrow)
        fig.text(
            x + 0.012,
            (bottom.y1 + top.y0) / 2 - 0.012,
            f"InfoNCE$_{{\\mathrm{{{scale}}}}}$",
            color=COLORS[scale],
            fontsize=10,
            fontweight="bold",
        )
    fig.text(0.075, 0.74, "image\n(one\n128 µm\ntile)", ha="center", va="center", fontsize=10.5, rotation=0)
    fig.text(0.075, 0.30, "cells\n(same\ntile)", ha="center", va="center", fontsize=10.5)
    fig.suptitle(
        "SIGMMA aligns a tile's image and its cell graph at three scales; loss = sum of the three InfoNCE terms",
        fontsize=12,
        y=0.985,
    )
    fig.savefig(OUT, dpi=100, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    with Image.open(OUT) as im:  # a 256-colour palette keeps the PNG small in the repository
        im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
