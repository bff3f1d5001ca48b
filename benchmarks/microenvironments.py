"""Microenvironments measured (issue 27 item 2): SIGMMA's per-scale Leiden clusters against niche baselines.

The demo section (``sg.datasets.demo(truth=True)``: 15,000 cells in contiguous planted domains that differ in
cell density, cell-type composition and expression programmes, and are rendered in the H&E) is tiled as
``sigmma demo`` tiles it (96 µm). Every method gives each cell a label; the scores are

- ARI and NMI against the planted domains (``.obs['truth_domain']``),
- spatial coherence: the share of spatial 6-NN cell pairs with one label (``sg.metrics.spatial_coherence``),
- the number of clusters.

Methods (all on the same cells; the expression baselines use the node features SIGMMA's graphs use, the PCA of
log-normalised counts in ``.obsm['sigmma_features']``):

- ``sigmma_{scale}``: ``sg.tl.embed`` with its defaults (16 grids blended) of a model trained with the demo's
  defaults (one per training seed, ``--models``), Leiden as ``sg.tl.microenvironments`` runs it (cosine 15-NN
  graph, igraph Leiden, 2 iterations; checked equal to it at the default resolution);
- ``cellcharter``: the CellCharter package (``cellcharter.gr.aggregate_neighbors`` over 3 layers of the
  Delaunay graph with long links removed, then ``cellcharter.tl.ClusterAutoK``: a Gaussian mixture whose number
  of clusters is chosen by its stability across runs, the published procedure), on the first 10 PCs (CellCharter's
  tutorials use a 10-d scVI latent space); run from a separate install folder (``--cellcharter-path``);
- ``nbr_expr``: squidpy's spatial 6-NN graph, each cell's features averaged with its neighbours', then scanpy
  Leiden (euclidean 15-NN graph), the usual scanpy/squidpy niche recipe;
- ``expr``: the same without the neighbourhood average (a control: what spatial context adds);
- ``backbone_{scale}``: the frozen backbone's features of the crops (micro: 1/16 of a tile, meso: a quarter,
  macro: the tile), PCA 50, Leiden (cosine 15-NN graph of the crops that hold cells), each cell labelled as the
  crop holding it (cells of one crop share its features: a Leiden graph of cells would link copies).

Choices are made on validation tiles (the split of ``sg.pp.tile``), never on the scored cells: each Leiden method's
resolution is the one of ``--resolutions`` with the best ARI on the cells of validation tiles, and SIGMMA's
"best scale" is the scale with the best validation ARI (per seed). The scored region is every other tiled cell
(train and test tiles; no method saw a domain label there) and, strictly, the test tiles alone. CIs are paired
bootstraps over the scored tiles (``sg.metrics.microenvironment_metrics`` + ``sg.metrics.paired_bootstrap``):
SIGMMA's scores are averaged over the seeds on each resample.

Usage::

    python benchmarks/microenvironments.py --models s0.pt s1.pt s2.pt --cellcharter-path /work/cc_pkgs

Results: ``benchmarks/results/microenvironments_demo.{json,md}``.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md), data._tiles.tile_params, metrics._niches.neighbour_pairs (the pairs sg.metrics.spatial_coherence uses).

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("microenvironments")
RESOLUTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def leiden_sweep(
    rep: np.ndarray, resolutions, *, metric: str, seed: int = 0, transformer="sklearn"
) -> dict[float, np.ndarray]:
    """Leiden labels of ``rep`` at each resolution (one neighbour graph), as ``sg.tl.microenvironments`` runs it."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obsm={"X": np.asarray(rep, dtype=np.float32)})
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=15, metric=metric, transformer=transformer)
    out = {}
    for res in resolutions:
        sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        out[float(res)] = tmp.obs["leiden"].astype(str).to_numpy()
    return out


def featurize_with_crops(sdata, backbone: str, input_size: int) -> dict[str, np.ndarray]:
    """``sg.tl.featurize`` (pooled features into the tile table), keeping each crop's features from the same pass.

    A forward hook on the backbone (a torch module hook: the package is not patched) records its output on
    every batch of crops, ordered as ``MultiCropEncoder.crops`` orders them: per batch of ``b`` tiles, ``16 b``
    micro crops (tile-major, then row-major), ``4 b`` meso, ``b`` macro.
    """
    import torch

    import sigmma_sc as sg
    from sigmma_sc._constants import GRID, SCALES

    n_per_tile = sum(GRID[s] ** 2 for s in SCALES)
    outputs = []

    def hook(module, inputs, output):
        if type(module).__name__ == "EfficientNet" and output.ndim == 2 and output.shape[0] % n_per_tile == 0:
            outputs.append(output.detach().float().cpu().numpy())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        sg.tl.featurize(sdata, backbone=backbone, input_size=input_size, overwrite=True)
    finally:
        handle.remove()
    if not outputs:
        raise RuntimeError("the backbone hook recorded nothing (is the backbone an EfficientNet?)")
    feats = {s: [] for s in SCALES}
    for f in outputs:
        b, start = f.shape[0] // n_per_tile, 0
        for s in SCALES:
            n = b * GRID[s] ** 2
            feats[s].append(f[start : start + n])
            start += n
    return {s: np.concatenate(v) for s, v in feats.items()}


def crop_index(sdata, tile: np.ndarray, xy: np.ndarray) -> dict[str, np.ndarray]:
    """Scale -> index of the crop holding each cell among that scale's crops (tile-major, row-major; -1 untiled)."""
    from sigmma_sc._constants import GRID, SCALES, Keys
    from sigmma_sc.data._tiles import tile_params

    tiles = sdata.tables[Keys.TILE_TABLE]
    size = float(tile_params(sdata, Keys.TILE_TABLE)["tile_size"])
    x0, y0 = tiles.obs[Keys.TILE_X0].to_numpy(), tiles.obs[Keys.TILE_Y0].to_numpy()
    ok = tile >= 0
    out = {}
    for s in SCALES:
        g = GRID[s]
        r = np.clip(np.floor((xy[ok, 1] - y0[tile[ok]]) / size * g), 0, g - 1).astype(int)
        c = np.clip(np.floor((xy[ok, 0] - x0[tile[ok]]) / size * g), 0, g - 1).astype(int)
        idx = np.full(len(tile), -1, dtype=np.int64)
        idx[ok] = (tile[ok] * g + r) * g + c
        out[s] = idx
    return out


def cellcharter_labels(
    cells, ok: np.ndarray, n_pcs: int, seed: int, max_runs: int, k_range: tuple[int, int]
) -> tuple[np.ndarray, dict]:
    """CellCharter's published pipeline on the tiled cells; labels and the chosen number of clusters."""
    import anndata as ad
    import cellcharter as cc
    import squidpy as sq

    from sigmma_sc._constants import Keys

    a = ad.AnnData(
        obsm={"X_pca": np.asarray(cells.obsm[Keys.FEATURES])[ok, :n_pcs], "spatial": cells.obsm["spatial"][ok]}
    )
    sq.gr.spatial_neighbors(a, coord_type="generic", delaunay=True)
    cc.gr.remove_long_links(a)
    cc.gr.aggregate_neighbors(a, n_layers=3, use_rep="X_pca")
    autok = cc.tl.ClusterAutoK(
        n_clusters=tuple(k_range),
        max_runs=max_runs,
        model_params={"random_state": seed, "trainer_params": {"accelerator": "cpu", "enable_progress_bar": False}},
    )
    autok.fit(a, use_rep="X_cellcharter")
    labels = np.asarray(autok.predict(a, use_rep="X_cellcharter")).astype(str)
    return labels, {"best_k": int(autok.best_k), "stability": [float(np.mean(v)) for v in autok.stability]}


class SeedMean:
    """Mean of one metric over several seeds' labellings, on the same resamples (for ``paired_bootstrap``)."""

    def __init__(self, metrics):
        self.metrics = list(metrics)
        self.n = self.metrics[0].n

    def values(self, counts):
        return np.mean([m.values(counts) for m in self.metrics], axis=0)


def run(args) -> dict:
    """Label the cells with every method, choose on validation tiles, score the rest."""
    import pandas as pd
    import scanpy as sc
    import squidpy as sq
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.metrics._niches import neighbour_pairs
    from sigmma_sc.tl._microenvironments import RESOLUTION

    sg.settings.progress_bar = False
    t_start = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and (cache / "section.zarr").exists():
        import spatialdata as sd

        sdata = sd.read_zarr(cache / "section.zarr")
        crops = dict(np.load(cache / "crops.npz"))
    else:
        sdata = sg.datasets.demo(truth=True, **({"n_cells": args.n_cells} if args.n_cells else {}))
        sg.pp.tile(sdata, image_key="he", tile_size_um=args.tile_size_um, pixel_size_um=0.5)
        sg.pp.cell_graph(sdata)
        t = time.perf_counter()
        crops = featurize_with_crops(sdata, args.backbone, args.input_size)
        logger.warning("featurized in %.0f s", time.perf_counter() - t)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(cache / "crops.npz", **crops)
            sdata.write(cache / "section.zarr")
    cells, tiles = sdata.tables["table"], sdata.tables[Keys.TILE_TABLE]
    tile = cells.obs[Keys.CELL_TILE].to_numpy().astype(np.int64)
    ok = tile >= 0
    split = np.full(cells.n_obs, "untiled", dtype=object)
    split[ok] = tiles.obs[Keys.SPLIT].astype(str).to_numpy()[tile[ok]]
    truth = cells.obs["truth_domain"].astype(str).to_numpy()
    val = split == "val"
    regions = {"scored": ok & ~val, "test": split == "test"}
    xy = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]], dtype=np.float64)
    pairs = neighbour_pairs(xy[ok], 6)
    pairs = np.flatnonzero(ok)[pairs]  # cell indices
    res_grid = tuple(args.resolutions)
    labels: dict[str, dict] = {}  # method -> {"labels": (n,), "resolution": r, "val_ari": ...}
    timings = {}

    def choose(name: str, sweep: dict[float, np.ndarray], extra: dict | None = None, default: float | None = None):
        """Pick the resolution with the best validation ARI; keep the whole sweep's numbers."""
        full = {r: np.full(cells.n_obs, None, dtype=object) for r in sweep}
        for r, lab in sweep.items():
            full[r][ok] = lab
        val_ari = {r: float(adjusted_rand_score(truth[val], full[r][val])) for r in sweep}
        best = max(val_ari, key=val_ari.get)
        entry = {"labels": full[best], "resolution": best, "val_ari": val_ari[best], "val_ari_sweep": val_ari}
        entry["n_clusters"] = {r: len(set(full[r][ok])) for r in sweep}
        if default is not None:
            entry["default_labels"] = full[default]
            entry["default_resolution"] = default
        entry.update(extra or {})
        labels[name] = entry
        logger.warning("%s: resolution %g (val ARI %.3f), %d clusters", name, best, val_ari[best],
                       entry["n_clusters"][best])  # fmt: skip

    feats = np.asarray(cells.obsm[Keys.FEATURES], dtype=np.float64)
    if args.cellcharter_only:  # CellCharter in its own process (its GMM fits are the slowest baseline)
        if args.cellcharter_path:
            sys.path.insert(0, str(args.cellcharter_path))
        t = time.perf_counter()
        cc_labels, info = cellcharter_labels(
            cells, ok, args.cellcharter_pcs, 0, args.cellcharter_runs, args.cellcharter_k
        )
        info["seconds"] = time.perf_counter() - t
        np.save(Path(args.cellcharter_labels).with_suffix(".npy"), cc_labels)
        Path(args.cellcharter_labels).write_text(json.dumps(info))
        return {}
    # expression baselines
    t = time.perf_counter()
    a = sc.AnnData(obsm={"spatial": xy[ok]})
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    adj = a.obsp["spatial_connectivities"]
    adj = ((adj + adj.T) > 0).astype(np.float64)
    adj.setdiag(1.0)
    deg = np.asarray(adj.sum(1)).ravel()
    nbr = (adj.multiply(1.0 / deg[:, None])).tocsr() @ feats[ok]
    choose("nbr_expr", leiden_sweep(nbr, res_grid, metric="euclidean"), default=1.0)
    choose("expr", leiden_sweep(feats[ok], res_grid, metric="euclidean"), default=1.0)
    timings["expression baselines"] = time.perf_counter() - t

    # frozen backbone crops
    t = time.perf_counter()
    crop_of = crop_index(sdata, tile, xy)
    for s in SCALES:  # Leiden on the crops that hold cells (cells of one crop share its features), labels to cells
        used, inverse = np.unique(crop_of[s][ok], return_inverse=True)
        z = PCA(50, random_state=0).fit_transform(crops[s][used])
        sweep = leiden_sweep(z, res_grid, metric="cosine")
        choose(f"backbone_{s}", {r: lab[inverse] for r, lab in sweep.items()}, default=RESOLUTION[s])
    timings["backbone crops"] = time.perf_counter() - t

    # SIGMMA, one model per seed
    seeds = []
    for path in args.models:
        while not Path(path).exists() and time.perf_counter() - t_start < args.wait_models_s:
            time.sleep(30)  # models trained by another job (--wait-models-s)
        if not Path(path).exists() or time.perf_counter() - t_start > args.wait_models_s:
            logger.warning("No model %s within --wait-models-s; scoring without it.", path)
            continue
        i = len(seeds)
        model = sg.model.SigmmaModel.load(path)
        t = time.perf_counter()
        sg.tl.embed(sdata, model, time_budget_s=None)  # the default blend of 16 grids, not cut by a loaded CPU
        timings[f"embed seed {i}"] = time.perf_counter() - t
        seeds.append(str(path))
        for s in SCALES:
            z = np.asarray(cells.obsm[Keys.embedding()["cell"][s]])[ok]
            sweep = leiden_sweep(z, sorted(set(res_grid) | {RESOLUTION[s]}), metric="cosine")
            choose(f"sigmma{i}_{s}", sweep, default=RESOLUTION[s])
        if i == 0:  # the sweep's Leiden is sg.tl.microenvironments' Leiden
            sg.tl.microenvironments(sdata, scale="macro")
            ref = cells.obs[Keys.microenvironments()["macro"]].astype(str).to_numpy()[ok]
            mine = labels["sigmma0_macro"]["default_labels"][ok].astype(str)
            assert adjusted_rand_score(ref, mine) == 1.0, "the sweep's Leiden differs from sg.tl.microenvironments"
        best = max(SCALES, key=lambda s: labels[f"sigmma{i}_{s}"]["val_ari"])
        labels[f"sigmma{i}_best"] = {**labels[f"sigmma{i}_{best}"], "scale": best}

    # CellCharter (optionally in its own process: --cellcharter-only writes its labels, --cellcharter-labels reads them)
    t = time.perf_counter()
    cc_file = Path(args.cellcharter_labels) if args.cellcharter_labels else None
    if cc_file is None:
        if args.cellcharter_path:
            sys.path.insert(0, str(args.cellcharter_path))
        cc_labels, info = cellcharter_labels(
            cells, ok, args.cellcharter_pcs, 0, args.cellcharter_runs, args.cellcharter_k
        )
        info["seconds"] = time.perf_counter() - t
    else:
        while not cc_file.exists() and time.perf_counter() - t_start < args.wait_models_s:
            time.sleep(30)
        info = json.loads(cc_file.read_text())
        cc_labels = np.load(cc_file.with_suffix(".npy"), allow_pickle=True)
    full = np.full(cells.n_obs, None, dtype=object)
    full[ok] = cc_labels
    labels["cellcharter"] = {"labels": full, "resolution": None, "val_ari": float(adjusted_rand_score(
        truth[val], full[val])), "n_clusters": {"auto": info["best_k"]}, "cellcharter": info}  # fmt: skip
    logger.warning("cellcharter: K=%d", info["best_k"])
    timings["cellcharter"] = info.get("seconds")

    # scores with paired bootstraps over the tiles of each region
    results = {"n_cells_tiled": int(ok.sum()), "n_tiles": int(tiles.n_obs), "tile_size_um": args.tile_size_um,
               "n_val_cells": int(val.sum()), "domains": pd.Series(truth[ok]).value_counts().to_dict(),
               "models": seeds, "timings_s": timings, "methods": {}, "regions": {}}  # fmt: skip
    for region, mask in regions.items():
        tiles_in = np.unique(tile[mask])
        index = np.full(tiles.n_obs, -1)
        index[tiles_in] = np.arange(len(tiles_in))
        tid = np.where(mask, index[np.maximum(tile, 0)], -1)
        keep = mask[pairs[:, 0]] & mask[pairs[:, 1]]
        n_in = len(tiles_in)

        def metrics(lab, tid=tid, keep=keep, n=n_in):
            return sg.metrics.microenvironment_metrics(lab, tid, reference=truth, pairs=pairs[keep], n_tiles=n)

        rows = {}
        for name, e in labels.items():
            m = metrics(e["labels"])
            row = {k: float(v.values(np.ones((m["ARI"].n, 1)))[0]) for k, v in m.items()}
            row["n_clusters"] = len(set(e["labels"][mask]))
            if "default_labels" in e:
                md = metrics(e["default_labels"])
                row["default"] = {k: float(v.values(np.ones((md["ARI"].n, 1)))[0]) for k, v in md.items()}
                row["default"]["n_clusters"] = len(set(e["default_labels"][mask]))
            rows[name] = row
        # SIGMMA's mean over seeds, per scale and best scale; paired CIs against every baseline
        n_seeds = len(seeds)
        sig = {}
        for s in (*SCALES, "best"):
            if n_seeds:
                sig[s] = {k: SeedMean([metrics(labels[f"sigmma{i}_{s}"]["labels"])[k] for i in range(n_seeds)])
                          for k in ("ARI", "NMI", "coherence")}  # fmt: skip
        baselines = [b for b in labels if not b.startswith("sigmma")]
        comparisons = {}
        for s, ms in sig.items():
            for b in baselines:
                df = sg.metrics.paired_bootstrap(ms, metrics(labels[b]["labels"]), n_boot=args.n_boot)
                comparisons[f"sigmma_{s} - {b}"] = df.drop(columns=["n_boot"]).to_dict(orient="records")
        ci = {s: sg.metrics.paired_bootstrap(ms, n_boot=args.n_boot).to_dict(orient="records") for s, ms in sig.items()}
        results["regions"][region] = {"n_tiles": len(tiles_in), "n_cells": int(mask.sum()), "scores": rows,
                                      "sigmma_seed_mean": ci, "comparisons": comparisons}  # fmt: skip
    for name, e in labels.items():
        results["methods"][name] = {k: v for k, v in e.items() if k not in ("labels", "default_labels")}
    return results


def to_markdown(res: dict) -> str:
    """Tables of the results."""
    lines = [f"{res['n_cells_tiled']} tiled cells, {res['n_tiles']} tiles of {res['tile_size_um']:g} µm; "
             f"{res['n_val_cells']} validation cells choose resolutions and SIGMMA's scale.", ""]  # fmt: skip
    for region, r in res["regions"].items():
        lines += [f"### Region `{region}` ({r['n_tiles']} tiles, {r['n_cells']} cells)", "",
                  "| method | resolution (val) | n | ARI | NMI | coherence | at default resolution: n / ARI / coh. |",
                  "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for name, row in r["scores"].items():
            m = res["methods"][name]
            d = row.get("default")
            dtxt = f"{d['n_clusters']} / {d['ARI']:.3f} / {d['coherence']:.3f}" if d else "-"
            resol = "auto K" if m["resolution"] is None else f"{m['resolution']:g}"
            if "scale" in m:
                resol += f" ({m['scale']})"
            lines.append(f"| {name} | {resol} | {row['n_clusters']} | {row['ARI']:.3f} | {row['NMI']:.3f} | "
                         f"{row['coherence']:.3f} | {dtxt} |")  # fmt: skip
        lines += ["", "SIGMMA, mean over seeds (95 % CI over tiles):", ""]
        for s, rows in r["sigmma_seed_mean"].items():
            lines.append(f"- {s}: " + "; ".join(f"{x['metric']} {x['value']:.3f} [{x['ci_low']:.3f}, "
                                                f"{x['ci_high']:.3f}]" for x in rows))  # fmt: skip
        lines += ["", "| SIGMMA - baseline | ARI diff [95 % CI] | NMI diff | coherence diff |", "|---|---|---|---|"]
        for name, rows in r["comparisons"].items():
            by = {x["metric"]: x for x in rows}
            lines.append(f"| {name} | " + " | ".join(
                f"{by[k]['diff']:+.3f} [{by[k]['ci_low']:+.3f}, {by[k]['ci_high']:+.3f}]" for k in
                ("ARI", "NMI", "coherence")) + " |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="SIGMMA models trained on this section")
    parser.add_argument("--n-cells", type=int, default=None, help="a smaller demo section (smoke test)")
    parser.add_argument("--tile-size-um", type=float, default=96.0, help="the demo's tiling (sigmma demo: 96)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--resolutions", type=float, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--cellcharter-path", type=Path, default=None, help="folder CellCharter is installed in")
    parser.add_argument("--cellcharter-pcs", type=int, default=10)
    parser.add_argument("--cellcharter-runs", type=int, default=5, help="ClusterAutoK's max_runs (stability)")
    parser.add_argument("--cellcharter-k", type=int, nargs=2, default=(2, 10), help="ClusterAutoK's n_clusters range")
    parser.add_argument("--cellcharter-only", action="store_true", help="only run CellCharter; write its labels")
    parser.add_argument("--cellcharter-labels", type=Path, default=None, help="CellCharter's labels (json + npy)")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the featurized section and crops")
    parser.add_argument("--wait-models-s", type=float, default=0, help="wait this long for --models to appear")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "microenvironments_demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    res = run(args)
    if args.cellcharter_only:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1, default=str))
    Path(f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
