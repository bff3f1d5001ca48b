"""Grid artefacts in SIGMMA's cell embeddings, and what ``sg.tl.embed(..., shifts=...)`` does about them.

Micro-scale message passing stops at the 32 µm micro-block borders (the neighbour-patch constraint) and every
scale stops at the 128 µm tile borders, so two touching cells on either side of a border see different
neighbourhoods. This script trains a small model on a section, embeds the cells on the section's grid
("before") and averaged over shifted grids ("after", ``sg.tl.embed(..., shifts=n)``), and measures, per scale:

- the mean cosine distance of the embeddings of spatial 6-NN cell pairs (over all tiled cells, ignoring
  tiles), by where the pair lies with respect to the grid: inside one micro block, across a micro-block
  border inside a meso block, across a meso-block border inside a tile, across a tile border;
- the same for a control grid offset by 0.375 micro blocks in x and y, which the model never saw (tissue
  structure alone makes border-crossing pairs no more different there), and the excess of each class over
  "inside one block" relative to the control: ``(d_class / d_inside) / (d_class_ctrl / d_inside_ctrl)``;
  1 means no grid artefact;
- the same two statistics for Leiden labels (``sg.tl.microenvironments``): the fraction of pairs whose
  labels differ;

and saves Leiden maps of a window of the section before and after, with the tile grid drawn.

Usage::

    python benchmarks/grid_artefacts.py                      # the demo section (15,000 cells)
    python benchmarks/grid_artefacts.py --real               # the real Xenium bone-marrow section (slow)

Results: ``benchmarks/results/grid_artefacts_{demo,bonemarrow}.{json,md}`` and maps under ``--fig-dir``.

Since issue 27, ``shifts=n`` means n grids offset over the whole tile and blended with tent weights (the default
of ``sg.tl.embed`` is ``shifts='auto'``); the results committed before it (``shifts=4``: the 16 offsets i/4 of a
micro block, plain mean) were made with the old meaning. ``benchmarks/cell_maps.py`` compares both.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md).

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ("inside micro block", "across micro border", "across meso border", "across tile border")
CONTROL_OFFSET = 0.375  # control grid offset, in micro blocks (not a border of shifts=2 or shifts=4)

logger = logging.getLogger("grid_artefacts")


def knn_pairs(xy: np.ndarray, k: int = 6) -> np.ndarray:
    """Unique undirected spatial k-NN pairs ``(P, 2)`` (``i < j``) over all points."""
    from scipy.spatial import cKDTree

    _, nbrs = cKDTree(xy).query(xy, k=k + 1)
    i = np.repeat(np.arange(len(xy)), k)
    j = nbrs[:, 1:].ravel()
    pairs = np.unique(np.sort(np.c_[i, j], axis=1), axis=0)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def pair_classes(xy: np.ndarray, pairs: np.ndarray, origin, tile_size: float, offset: float = 0.0) -> np.ndarray:
    """Class (index into ``CLASSES``) of each pair with respect to a grid shifted by ``offset`` micro blocks."""
    block = tile_size / 4
    rel = xy - (np.asarray(origin) - offset * block)
    tile = np.floor(rel / tile_size).astype(np.int64)
    meso = np.floor(rel / (tile_size / 2)).astype(np.int64)
    micro = np.floor(rel / block).astype(np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    same = lambda g: (g[a] == g[b]).all(1)
    out = np.full(len(pairs), 3, dtype=np.int64)
    out[same(tile)] = 2
    out[same(meso)] = 1
    out[same(micro)] = 0
    return out


def cosine_distance(z: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``1 - cos`` between the rows of ``z`` at each pair."""
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return 1.0 - np.einsum("ij,ij->i", zn[pairs[:, 0]], zn[pairs[:, 1]])


def class_stats(values: np.ndarray, classes: np.ndarray, control: np.ndarray) -> dict:
    """Mean of ``values`` per class on the true and the control grid, and the excess over the control."""
    true = [float(values[classes == c].mean()) for c in range(len(CLASSES))]
    ctrl = [float(values[control == c].mean()) for c in range(len(CLASSES))]
    excess = [(t / true[0]) / (c / ctrl[0]) if true[0] > 0 and ctrl[0] > 0 and c > 0 else float("nan")
              for t, c in zip(true, ctrl, strict=True)]  # fmt: skip
    return {"true": true, "control": ctrl, "excess": excess}


def measure(sdata, pairs: np.ndarray, classes: np.ndarray, control: np.ndarray, leiden_key: str) -> dict:
    """Embedding and Leiden statistics per scale."""
    from sigmma_sc._constants import SCALES, Keys

    cells = sdata.tables["table"]
    out = {}
    for s in SCALES:
        z = np.asarray(cells.obsm[Keys.embedding()["cell"][s]])
        labels = cells.obs[leiden_key.format(scale=s)].to_numpy()
        differ = (labels[pairs[:, 0]] != labels[pairs[:, 1]]).astype(np.float64)
        out[s] = {
            "cosine_distance": class_stats(cosine_distance(z, pairs), classes, control),
            "leiden_differs": class_stats(differ, classes, control),
            "n_clusters": int(len(set(labels))),
        }
    return out


def leiden_maps(sdata, xy, key: str, window, tile_size: float, origin, title: str, path: Path) -> None:
    """Leiden labels of the cells in ``window`` (x0, y0, side; coordinate units), per scale, tile grid drawn."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from sigmma_sc._constants import SCALES

    cells = sdata.tables["table"]
    x0, y0, side = window
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + side) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side)
    fig, axes = plt.subplots(1, len(SCALES), figsize=(5 * len(SCALES), 5.2))
    cmap = plt.get_cmap("tab20")
    for ax, s in zip(axes, SCALES, strict=True):
        labels = cells.obs[key.format(scale=s)].astype(str).to_numpy()
        codes = {lab: i for i, lab in enumerate(sorted(set(labels), key=lambda v: (len(v), v)))}
        colours = cmap(np.array([codes[lab] % 20 for lab in labels[inside]]))
        ax.scatter(xy[inside, 0], xy[inside, 1], c=colours, s=6, linewidths=0)
        block = tile_size / 4
        for k in range(int(np.floor((x0 - origin[0]) / block)), int(np.ceil((x0 + side - origin[0]) / block)) + 1):
            v = origin[0] + k * block
            ax.axvline(v, color="k", lw=1.0 if k % 4 == 0 else 0.3, alpha=0.7 if k % 4 == 0 else 0.4)
        for k in range(int(np.floor((y0 - origin[1]) / block)), int(np.ceil((y0 + side - origin[1]) / block)) + 1):
            v = origin[1] + k * block
            ax.axhline(v, color="k", lw=1.0 if k % 4 == 0 else 0.3, alpha=0.7 if k % 4 == 0 else 0.4)
        ax.set_xlim(x0, x0 + side)
        ax.set_ylim(y0 + side, y0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{s} ({len(codes)} clusters)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as img:  # a palette PNG: a fifth of the size, the same picture
        img.convert("RGB").quantize(colors=64).save(path, optimize=True)


def load_section(*, real: bool):
    """The demo section (H&E) or the real bone-marrow section (DAPI), and the image key."""
    import sigmma_sc as sg

    if real:
        import sys

        sys.path.insert(0, str(HERE))
        from _bonemarrow import load_bonemarrow

        return load_bonemarrow(), "dapi"
    return sg.datasets.demo(), "he"


def run(args) -> dict:
    """Train, embed before/after, measure and draw; returns the results."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys

    sg.settings.progress_bar = False
    t0 = time.perf_counter()
    sdata, image_key = load_section(real=args.real)
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=128.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata)
    t_prep = time.perf_counter() - t0
    model = sg.tl.train_sigmma(
        sdata, backbone="efficientnet_lite0", input_size=112, epochs=args.epochs, batch_size=args.batch_size,
        hidden=args.hidden, out_dim=args.hidden, seed=args.seed,
    )  # fmt: skip
    t_train = time.perf_counter() - t0 - t_prep
    cells = sdata.tables["table"]
    params = sdata.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    tile_size, origin = float(params["tile_size"]), params["grid_origin"]
    tiled = np.flatnonzero(cells.obs[Keys.CELL_TILE].to_numpy() >= 0)
    xy_all = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]], dtype=np.float64)
    pairs = tiled[knn_pairs(xy_all[tiled])]
    classes = pair_classes(xy_all, pairs, origin, tile_size)
    control = pair_classes(xy_all, pairs, origin, tile_size, offset=CONTROL_OFFSET)

    # cells without any micro edge (all their 6-NN edges cross a micro-block border)
    conn = cells.obsp[Keys.graph()["connectivities"]].tocoo()
    micro = cells.obs[Keys.tiling()["cell_blocks"]["micro"]].to_numpy()
    same = micro[conn.row] == micro[conn.col]
    has_micro = np.bincount(conn.row[same], minlength=cells.n_obs) > 0
    results = {
        "section": "bonemarrow" if args.real else "demo",
        "n_cells_tiled": int(tiled.size),
        "n_tiles": int(sdata.tables[Keys.TILE_TABLE].n_obs),
        "n_pairs": int(len(pairs)),
        "pairs_per_class": [int((classes == c).sum()) for c in range(len(CLASSES))],
        "pair_distance_um_per_class": [
            float(
                np.linalg.norm(xy_all[pairs[classes == c, 0]] - xy_all[pairs[classes == c, 1]], axis=1).mean()
                * params["um_per_unit"]
            )
            for c in range(len(CLASSES))
        ],  # fmt: skip
        "cells_without_micro_edge": float(1 - has_micro[tiled].mean()),
        "settings": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "hidden": args.hidden,
            "seed": args.seed,
            "backbone": "efficientnet_lite0 (ImageNet), 112 px crops",
            "tile_size_um": 128.0,
            "optimizer_steps": len(model.history)
            * int(np.ceil(int((sdata.tables[Keys.TILE_TABLE].obs[Keys.SPLIT] == "train").sum()) / args.batch_size)),
        },  # fmt: skip
        "conditions": {},
        "seconds": {"prepare": t_prep, "train": t_train},
    }
    side = args.window_um / params["um_per_unit"]
    centre = np.median(xy_all[tiled], axis=0)
    window = (centre[0] - side / 2, centre[1] - side / 2, side)
    for name, shifts in [("before", None), *[(f"after_shifts{n}", n) for n in args.shifts]]:
        t = time.perf_counter()
        sg.tl.embed(sdata, model, shifts=shifts)
        t_embed = time.perf_counter() - t
        key = f"leiden_{name}_{{scale}}"
        sg.tl.microenvironments(sdata, key_added=key.removesuffix("_{scale}"), resolution=args.resolution)
        results["conditions"][name] = {"shifts": shifts, "embed_seconds": t_embed, **measure(sdata, pairs, classes,
                                                                                              control, key)}  # fmt: skip
        label = "section grid" if shifts is None else f"shifts={shifts} ({shifts * shifts} grids averaged)"
        leiden_maps(
            sdata, xy_all, key, window, tile_size, origin,
            f"{results['section']}: Leiden on X_sigmma_{{scale}}, {label}; lines: tiles (thick), micro blocks",
            Path(args.fig_dir) / f"grid_artefacts_{results['section']}_{name}.png",
        )  # fmt: skip
        logger.warning("%s done (embed %.1f s)", name, t_embed)
    results["seconds"]["total"] = time.perf_counter() - t0
    return results


def to_markdown(res: dict) -> str:
    """Tables of the results."""
    lines = [
        f"Section `{res['section']}`: {res['n_cells_tiled']} tiled cells, {res['n_tiles']} tiles of 128 µm, "
        f"{res['n_pairs']} spatial 6-NN pairs ({', '.join(f'{n} {c}' for n, c in zip(res['pairs_per_class'], CLASSES, strict=True))}; "
        f"mean pair distance {', '.join(f'{d:.1f}' for d in res['pair_distance_um_per_class'])} µm). "
        f"Cells without any micro edge: {100 * res['cells_without_micro_edge']:.1f}%. Settings: {res['settings']}.",
        "",
    ]  # fmt: skip
    for metric, what in [("cosine_distance", "mean cosine distance of 6-NN pairs"),
                         ("leiden_differs", "fraction of 6-NN pairs with different Leiden labels")]:  # fmt: skip
        lines += [f"**{what}** (true grid / control grid; excess = ratio to 'inside micro block', over the control's)",
                  "", "| condition | scale | " + " | ".join(CLASSES) + " |", "|---|---|" + "---:|" * len(CLASSES)]  # fmt: skip
        for name, cond in res["conditions"].items():
            for s in ("micro", "meso", "macro"):
                st = cond[s][metric]
                cells = [f"{t:.3f} / {c:.3f} (x{e:.2f})" for t, c, e in zip(st["true"], st["control"], st["excess"],
                                                                             strict=True)]  # fmt: skip
                lines.append(f"| {name} | {s} ({cond[s]['n_clusters']} cl.) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="the real bone-marrow section instead of the demo")
    parser.add_argument("--epochs", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shifts", type=int, nargs="+", default=[2, 4], help="n of shifts=n for the 'after' rows")
    parser.add_argument("--resolution", type=float, default=0.5, help="Leiden resolution")
    parser.add_argument("--window-um", type=float, default=640.0, help="side of the mapped window (µm)")
    parser.add_argument("--fig-dir", type=Path, default=HERE.parent / "docs" / "_static")
    parser.add_argument("--out", type=Path, default=None, help="results prefix (default benchmarks/results/...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run(args)
    out = args.out or HERE / "results" / f"grid_artefacts_{res['section']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1))
    Path(f"{out}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
