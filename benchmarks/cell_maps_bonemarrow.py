"""Cell maps on the real bone-marrow section (issue 27 items 1 and 4), a section the defaults were not chosen on.

The blend of ``sg.tl.embed(shifts='auto')`` (16 grids, squared tents) and the per-scale Leiden resolutions were
chosen on the synthetic demo. This script re-checks both on the real Xenium bone-marrow section (84,518 cells,
DAPI), from the featurized section that ``benchmarks/paper_table.py --dataset bonemarrow`` caches (read only:
nothing is written there):

1. trains a model with the package defaults at CPU widths (1000-step budget, hidden = out = 128, batches of 16
   tiles as the bone-marrow tutorial), or loads one (``--model``);
2. embeds the cells on the section's grid only (``shifts=None``) and with the default (``shifts='auto'``, first
   with the default ``time_budget_s=300`` as a user gets it, then all 16 grids if the budget cut them), timing
   each in the same process;
3. for each: the grid artefact per scale (``sg.metrics.grid_artefact``: across / inside a block border, 1 = no
   grid), microenvironments at the default resolutions (number, spatial coherence), and Leiden maps of a window
   with the tile grid drawn (``--fig-dir``);
4. a Leiden resolution sweep on the default embeddings: number of microenvironments, spatial coherence and
   Leiden stability (ARI between two Leiden seeds; a label-free check, as there is no planted truth here).

Usage::

    python benchmarks/cell_maps_bonemarrow.py --cache-dir /work/bench_cache/paper_table --save-model bm64.pt

Results: ``benchmarks/results/cell_maps_bonemarrow.{json,md}``.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md), tl._shifts.AUTO_SHIFTS, the k-NN transformer and neighbour pairs the package uses (so the benchmark scores what the package computes).

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("cell_maps_bonemarrow")


def run(args) -> dict:
    """Train (or load), embed with one grid and with the default blend, measure."""
    import spatialdata as sd
    from sklearn.metrics import adjusted_rand_score

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc._utils._record import read_record
    from sigmma_sc.data._tiles import tile_params
    from sigmma_sc.metrics._niches import neighbour_pairs
    from sigmma_sc.model import SigmmaModel, TrainingBundle
    from sigmma_sc.tl._microenvironments import _knn_transformer
    from sigmma_sc.tl._shifts import AUTO_SHIFTS

    sys.path.insert(0, str(HERE))
    from grid_artefacts import leiden_maps
    from microenvironments import leiden_sweep

    sg.settings.progress_bar = False
    folder = Path(args.cache_dir) / f"bonemarrow_{args.tile_size_um:g}um_0.5px_efficientnet_lite0_in112_pca50"
    sdata = sd.read_zarr(folder / "section.zarr")  # in memory from here on; the cache is never written
    cells, tiles = sdata.tables["table"], sdata.tables[Keys.TILE_TABLE]
    results = {"section": folder.name, "n_cells": int(cells.n_obs), "n_tiles": int(tiles.n_obs), "settings": {}}
    t = time.perf_counter()
    if args.model is not None and Path(args.model).exists():
        model = SigmmaModel.load(args.model)
    else:
        bundle = TrainingBundle.load(folder / "bundle.pt")
        model = SigmmaModel.from_bundle(bundle, seed=args.seed, hidden=128, out_dim=128, batch_size=16)
        model.fit(bundle, seed=args.seed, progress=False)
        results["train_seconds"] = time.perf_counter() - t
        if args.save_model is not None:
            model.save(args.save_model)
    tiled = cells.obs[Keys.CELL_TILE].to_numpy() >= 0
    xy = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]], dtype=np.float64)
    pairs = neighbour_pairs(xy[tiled], 6)
    results["n_cells_tiled"] = int(tiled.sum())
    params = tile_params(sdata, Keys.TILE_TABLE)
    size, origin = float(params["tile_size"]), np.asarray(params["grid_origin"], dtype=np.float64)
    centre = np.median(xy[tiled], axis=0)
    side = args.window / float(params["um_per_unit"])  # µm -> coordinate units
    window = (centre[0] - side / 2, centre[1] - side / 2, side)

    runs = [("one_grid", {"shifts": None}), ("auto_default_budget", {"shifts": "auto"})]
    while runs:
        name, kw = runs.pop(0)
        t = time.perf_counter()
        sg.tl.embed(sdata, model, **kw)
        seconds = time.perf_counter() - t
        used = (read_record(cells, Keys.PREFIX, "embed") or {}).get("shifts")
        n_grids = 1 if used is None else len(used)
        art = sg.metrics.grid_artefact(sdata)
        sg.tl.microenvironments(sdata)
        row = {"seconds": seconds, "n_grids": n_grids}
        for s in SCALES:
            labels = cells.obs[Keys.microenvironments()[s]].astype(str).to_numpy()[tiled]
            row[s] = {
                "ratio": float(art.loc[s, "ratio"]),
                "ratio_control": float(art.loc[s, "ratio_control"]),
                "n_microenv": int(len(set(labels))),
                "coherence": float((labels[pairs[:, 0]] == labels[pairs[:, 1]]).mean()),
            }
        results["settings"][name] = row
        logger.warning("%s: %.0f s, ratios %s", name, seconds, {s: round(row[s]["ratio"], 3) for s in SCALES})
        if args.fig_dir is not None and name in ("one_grid", "auto_default_budget"):
            leiden_maps(sdata, xy, Keys.microenvironments()["micro"].removesuffix("micro") + "{scale}", window, size, origin,
                        f"bone marrow, {'section grid only' if name == 'one_grid' else 'default blend'}",
                        Path(args.fig_dir) / f"cell_maps_bonemarrow_{name}.png")  # fmt: skip
        if (
            args.all16 and name == "auto_default_budget" and n_grids < AUTO_SHIFTS
        ):  # the budget cut the blend on this CPU
            runs.append(("auto_all16", {"shifts": "auto", "time_budget_s": None}))
        if args.out is not None:
            Path(f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str))

    # resolution sweep on the last embeddings (the package's k-NN search: approximate above 20,000 cells)
    results["resolution_sweep"] = {}
    for s in SCALES if args.resolutions else ():
        z = np.asarray(cells.obsm[Keys.embedding()["cell"][s]])[tiled]
        knn = _knn_transformer(len(z), 15, 0)
        a = leiden_sweep(z, args.resolutions, metric="cosine", seed=0, transformer=knn)
        b = leiden_sweep(z, args.resolutions, metric="cosine", seed=1, transformer=knn)
        for r in args.resolutions:
            lab = a[r]
            results["resolution_sweep"][f"{s}@{r:g}"] = {
                "n_microenv": len(set(lab)),
                "coherence": float((lab[pairs[:, 0]] == lab[pairs[:, 1]]).mean()),
                "seed_stability_ari": float(adjusted_rand_score(lab, b[r])),
            }
        if args.out is not None:
            Path(f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def to_markdown(res: dict) -> str:
    """Tables of the results."""
    from sigmma_sc._constants import SCALES

    lines = [
        f"Section `{res['section']}`: {res['n_cells_tiled']} tiled cells, {res['n_tiles']} tiles.",
        "",
        "| setting | time | " + " | ".join(f"{s}: ratio (ctrl) / n / coherence" for s in SCALES) + " |",
        "|---|---:|" + "---|" * len(SCALES),
    ]
    base = res["settings"].get("one_grid", {}).get("seconds")
    for name, r in res["settings"].items():
        x = f" (x{r['seconds'] / base:.1f})" if base else ""
        cells = [
            f"{r[s]['ratio']:.2f} ({r[s]['ratio_control']:.2f}) / {r[s]['n_microenv']} / {r[s]['coherence']:.3f}"
            for s in SCALES
        ]
        lines.append(f"| {name} ({r['n_grids']} grids) | {r['seconds']:.0f} s{x} | " + " | ".join(cells) + " |")
    if res.get("resolution_sweep"):
        lines += [
            "",
            "| scale | resolution | n | coherence | Leiden seed stability (ARI) |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, e in res["resolution_sweep"].items():
            s, r = key.split("@")
            lines.append(f"| {s} | {r} | {e['n_microenv']} | {e['coherence']:.3f} | {e['seed_stability_ari']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=HERE.parent / "bench_out" / "paper_table")
    parser.add_argument("--tile-size-um", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="load this model (trained on the same bundle)")
    parser.add_argument("--save-model", type=Path, default=None)
    parser.add_argument("--resolutions", type=float, nargs="*", default=[1.0, 0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--all16", action="store_true", help="also blend all 16 grids when the budget cut them")
    parser.add_argument("--window", type=float, default=640.0, help="side of the map window, in µm")
    parser.add_argument("--fig-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cell_maps_bonemarrow")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res = run(args)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1, default=str))
    Path(f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
