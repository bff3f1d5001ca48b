"""How many shifted grids, and which blend, remove the grid from cell embeddings (issue 27; chooses ``shifts='auto'``).

Embeds the cells of the demo section once under each of the first ``K`` grids of the low-discrepancy sequence
``sg.tl.embed(shifts='auto')`` uses, keeps every pass, then blends prefixes of 4, 8, 12 and 16 grids offline with
weights ``tent ** power`` (power 0: plain mean; 1, 2, 4, 8; ``argmax``: each cell from the grid that centres it
best) and measures :func:`sigmma_sc.metrics.grid_artefact` (25 % closest 6-NN pairs, across a block border over
inside one micro block at matched pair lengths; 1 = no grid).

Usage (after ``python benchmarks/cell_maps.py --epochs 20 --save-model m.pt``, which trains the model)::

    python benchmarks/cell_maps_blend.py --model m.pt --k 16

Results: ``benchmarks/results/cell_maps_blend_demo.json``.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md) and tl._shifts (the blend weights and shifted passes measured here).

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POWERS = (0, 1, 2, 4, 8, "argmax")


def blend(passes, xy: np.ndarray, size: float, scale: str, k: int, power, n_obs: int) -> np.ndarray:
    """The blend of the first ``k`` passes at ``scale``."""
    from sigmma_sc.tl._shifts import blend_weights

    dim = passes[0][2][scale].shape[1]
    tot, wsum, best = np.zeros((n_obs, dim)), np.zeros(n_obs), np.full(n_obs, -1.0)
    for origin, rows, z in passes[:k]:
        if power == "argmax":
            w = blend_weights(xy[rows], origin, size, scale)
            better = w > best[rows]
            tot[rows[better]] = z[scale][better]
            best[rows[better]] = w[better]
            wsum[rows] = 1.0
        else:
            w = blend_weights(xy[rows], origin, size, scale, power) if power else np.ones(rows.size)
            tot[rows] += w[:, None] * z[scale]
            wsum[rows] += w
    out = tot / np.maximum(wsum, 1e-12)[:, None]
    out[wsum == 0] = np.nan
    return out.astype(np.float32)


def main() -> None:
    """Command line."""
    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.tl._shifts import auto_shifts, shifted_cell_embeddings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model trained on the demo section")
    parser.add_argument("--k", type=int, default=16, help="grids embedded")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cell_maps_blend_demo.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sg.settings.progress_bar = False
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata)
    model = sg.model.SigmmaModel.load(args.model)
    cells = sdata.tables["table"]
    size = float(sdata.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]["tile_size"])
    xy = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]], dtype=np.float64)
    t = time.perf_counter()
    sg.tl.embed(sdata, model, shifts=None)
    out = {"plain_seconds": time.perf_counter() - t}
    cols = ["ratio", "ratio_control", "excess"]
    out["plain"] = sg.metrics.grid_artefact(sdata)[cols].round(3).to_dict()
    passes: list = []
    t = time.perf_counter()
    shifted_cell_embeddings(
        sdata, model, auto_shifts(args.k), table_key="table", tile_key=Keys.TILE_TABLE, batch_size=256, passes=passes
    )
    out["passes_seconds"] = time.perf_counter() - t
    for k in sorted({4, 8, 12, 16, args.k} & set(range(1, args.k + 1))):
        for power in POWERS:
            for s in SCALES:
                cells.obsm[f"X_blend_{s}"] = blend(passes, xy, size, s, k, power, cells.n_obs)
            g = sg.metrics.grid_artefact(sdata, use_rep="X_blend_{scale}")
            out[f"{k}|{power}"] = g[cols].round(3).to_dict()
            print(k, power, g["ratio"].round(2).to_dict(), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
