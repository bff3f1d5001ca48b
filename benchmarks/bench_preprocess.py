"""Benchmark ``sg.pp.tile`` + ``sg.pp.cell_graph`` against one squidpy 6-NN call over all cells.

Usage::

    python benchmarks/bench_preprocess.py --n-cells 500000          # synthetic Xenium section
    python benchmarks/bench_preprocess.py --real                      # ../shared/data/xenium-bonemarrow

The synthetic Xenium folder is written once under ``bench_out/`` (git-ignored) and re-used. In one
process, after reading the section, the script times squidpy's k-NN graph over all cells (the anchor),
then the two sigmma_sc steps, and reports the ratio and the process's peak RSS.

Private import on purpose: the anchor gets the cells' coordinates exactly as ``sg.pp.tile`` reads them
(``sigmma_sc._utils._validate.cell_coordinates``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _squidpy_knn(table, xy) -> float:
    import anndata as ad
    import squidpy as sq

    adata = ad.AnnData(obs=table.obs[[]].copy(), obsm={"spatial": xy})
    t = time.perf_counter()
    build = getattr(sq.gr, "spatial_neighbors_knn", None)
    if build is not None:
        build(adata, n_neighs=6)
    else:  # squidpy < 1.8
        sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    return time.perf_counter() - t


def run(sdata, image_key: str, label: str, repeats: int = 3) -> dict:
    import numpy as np

    import sigmma_sc as sg
    from sigmma_sc._utils._validate import cell_coordinates

    table = sdata.tables["table"]
    xy = cell_coordinates(sdata, table, "table", "global")
    anchor, tile_t, graph_t = [], [], []
    for _ in range(repeats):  # interleaved repeats: the machine's load drifts, medians are compared
        anchor.append(_squidpy_knn(table, xy))
        t0 = time.perf_counter()
        sg.pp.tile(sdata, image_key=image_key)
        tile_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sg.pp.cell_graph(sdata)
        graph_t.append(time.perf_counter() - t0)
    t_anchor, t_tile, t_graph = (float(np.median(v)) for v in (anchor, tile_t, graph_t))
    tiles = sdata.tables["sigmma_tiles"]
    tile_of = table.obs["sigmma_tile"].to_numpy()
    return {
        "section": label,
        "n_cells": int(table.n_obs),
        "n_genes": int(table.n_vars),
        "n_tiles": int(tiles.n_obs),
        "tiled_cells": int((tile_of >= 0).sum()),
        "median_cells_per_tile": float(np.median(tiles.obs["n_cells"])),
        "split": {k: int(v) for k, v in tiles.obs["split"].value_counts().items()},
        "squidpy_knn_s": round(t_anchor, 2),
        "tile_s": round(t_tile, 2),
        "cell_graph_s": round(t_graph, 2),
        "ratio": round((t_tile + t_graph) / t_anchor, 2),
        "ratios_per_repeat": [round((a + b) / c, 2) for a, b, c in zip(tile_t, graph_t, anchor, strict=True)],
        "repeats": repeats,
        "peak_rss_gb": round(_rss_gb(), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=500_000)
    parser.add_argument("--real", action="store_true", help="the real Xenium bone-marrow section (DAPI) instead")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    args = parser.parse_args(argv)

    import sigmma_sc as sg

    sg.settings.progress_bar = False
    if args.real:
        t0 = time.perf_counter()
        sys.path.insert(0, str(Path(__file__).parent))
        from _bonemarrow import load_bonemarrow

        sdata, image_key, label = load_bonemarrow(), "dapi", "xenium-bonemarrow (real, DAPI)"
        t_read = time.perf_counter() - t0
    else:
        folder = args.out / f"synthetic_xenium_{args.n_cells}"
        if not (folder / "experiment.xenium").exists():
            t = time.perf_counter()
            sg.datasets.synthetic_xenium(
                folder, n_cells=args.n_cells, transcripts=False, morphology=False, overwrite=True
            )
            print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        t0 = time.perf_counter()
        sdata = sg.io.xenium(folder, he_image="auto")
        t_read = time.perf_counter() - t0
        image_key, label = "he", f"synthetic Xenium + H&E, {args.n_cells} cells"
    result = run(sdata, image_key, label)
    result.update(
        {
            "read_s": round(t_read, 1),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "command": "python benchmarks/bench_preprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
