"""Cell maps without the block grid (issue 27): which blending of shifted grids ``sg.tl.embed`` should use by default.

Micro-scale message passing stops at 32 µm micro-block borders and every scale at 128 µm tile borders, so the
cell embeddings of one tiling carry its grid. This script trains a small model on a section (as
``grid_artefacts.py`` does), then embeds the cells under several settings of ``sg.tl.embed(shifts=...)`` and
compares, per scale:

- the grid artefact, :func:`sigmma_sc.metrics.grid_artefact`: for the 25 % closest spatial 6-NN cell pairs, the
  mean cosine distance of their embeddings across a block border of that scale over inside one micro block
  (``ratio``; 1 = no grid), and the same on a control grid offset by 0.375 micro blocks;
- the time of the embedding, as a multiple of the one-grid embedding (setting ``none``) in the same process;
- Leiden microenvironments (``sg.tl.microenvironments`` at the per-scale default resolutions): their number, ARI
  and NMI against the planted domains of the demo, and spatial coherence (share of 6-NN pairs with one label);
- tile-level retrieval (test tiles), which must not change: tile embeddings keep the section's grid.

Settings: ``none`` (the section's grid only, the old default), ``micro16`` (the 4 x 4 offsets i/4 of a micro
block, plain mean: the old ``shifts=4``), and ``K`` grids offset over the whole tile by a low-discrepancy
sequence, blended with tent weights (``r2_K``) or a plain mean (``r2_K_mean``: the same grids, one thing changed).

Usage::

    python benchmarks/cell_maps.py                          # demo section (15,000 cells): trains ~2 min
    python benchmarks/cell_maps.py --model m.pt               # reuse a trained model (the demo re-tiled the same way)

Results: ``benchmarks/results/cell_maps_demo.{json,md}``.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md), tl._shifts and metrics._grid internals (this benchmark measures the shifted-grid blend and its artefact metric themselves).

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("cell_maps")


def settings(names: list[str]) -> dict[str, tuple[list[tuple[float, float]] | None, str]]:
    """Setting name -> (shifts in micro blocks, blend)."""
    from sigmma_sc.tl._shifts import auto_shifts

    out = {}
    for name in names:
        if name == "none":
            out[name] = (None, "tent")
        elif name == "micro16":
            out[name] = ([(i / 4, j / 4) for j in range(4) for i in range(4)], "mean")
        elif name.startswith("r2_"):
            parts = name.split("_")
            out[name] = (auto_shifts(int(parts[1])), "mean" if parts[-1] == "mean" else "tent")
        else:
            raise ValueError(f"unknown setting {name!r}")
    return out


def coherence(labels: np.ndarray, pairs: np.ndarray) -> float:
    """Share of spatial neighbour pairs whose two cells have the same label."""
    return float((labels[pairs[:, 0]] == labels[pairs[:, 1]]).mean())


def run(args) -> dict:
    """Train (or load), embed under each setting, measure."""
    import pandas as pd
    import spatialdata as sd
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.metrics._grid import _knn_pairs
    from sigmma_sc.tl._shifts import shifted_cell_embeddings

    sg.settings.progress_bar = False
    t0 = time.perf_counter()
    if args.sdata:
        sdata = sd.read_zarr(args.sdata)
    else:
        sdata = sg.datasets.demo()
        sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
        sg.pp.cell_graph(sdata)
    if args.model is not None:
        model = sg.model.SigmmaModel.load(args.model)
    else:
        model = sg.tl.train_sigmma(
            sdata, backbone="efficientnet_lite0", input_size=112, epochs=args.epochs, batch_size=32, hidden=64,
            out_dim=64, seed=args.seed,
        )  # fmt: skip
        if args.save_model is not None:
            model.save(args.save_model)
    t_prep = time.perf_counter() - t0
    cells = sdata.tables["table"]
    truth = None
    truth_path = Path(args.truth).expanduser() if args.truth else None
    if truth_path is not None and truth_path.exists():
        truth = (
            pd.read_parquet(truth_path).set_index("cell_id").loc[cells.obs["cell_id"].astype(str), "domain"]
        ).to_numpy()
    tiled = np.flatnonzero(cells.obs[Keys.CELL_TILE].to_numpy() >= 0)
    xy = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]], dtype=np.float64)
    pairs = tiled[_knn_pairs(xy[tiled], 6)[0]]

    t = time.perf_counter()
    sg.tl.embed(sdata, model, shifts=None)
    t_plain = time.perf_counter() - t
    tiles = sdata.tables[Keys.TILE_TABLE]
    tile_ref = {k: np.array(tiles.obsm[k]) for k in tiles.obsm if k.startswith("X_sigmma_")}
    retrieval = sg.metrics.cross_modal_retrieval(sdata, split="test")
    results = {
        "section": "demo" if truth is not None else "section",
        "n_cells_tiled": int(tiled.size),
        "n_tiles": int(tiles.n_obs),
        "plain_embed_seconds": t_plain,
        "prepare_train_seconds": t_prep,
        "retrieval_test": retrieval.to_dict(orient="records"),
        "settings": {},
    }
    for name, (shifts, blend) in settings(args.settings).items():
        t = time.perf_counter()
        if shifts is None:
            sg.tl.embed(sdata, model, shifts=None)
        elif blend == "tent":
            sg.tl.embed(sdata, model, shifts=shifts, time_budget_s=None)
        else:  # the same grids, a plain mean: only the blending changes
            sg.tl.embed(sdata, model, shifts=None)
            means, _ = shifted_cell_embeddings(
                sdata, model, shifts, table_key="table", tile_key=Keys.TILE_TABLE, batch_size=256, blend="mean"
            )
            for s, z in means.items():
                cells.obsm[Keys.embedding()["cell"][s]] = z
        seconds = time.perf_counter() - t
        unchanged = all(np.array_equal(tiles.obsm[k], v) for k, v in tile_ref.items())
        art = sg.metrics.grid_artefact(sdata)
        sg.tl.microenvironments(sdata)
        row = {
            "n_grids": 1 if shifts is None else len(shifts),
            "blend": blend if shifts is not None else "-",
            "seconds": seconds,
            "x_plain": seconds / t_plain,
            "tile_embeddings_unchanged": unchanged,
        }
        for s in SCALES:
            labels = cells.obs[Keys.microenvironments()[s]].astype(str).to_numpy()
            entry = {k: float(art.loc[s, k]) for k in ("ratio", "ratio_control", "excess")}
            entry["n_microenv"] = int(len(set(labels[tiled])))
            entry["coherence"] = coherence(labels, pairs)
            if truth is not None:
                entry["ari_domain"] = float(adjusted_rand_score(truth[tiled], labels[tiled]))
                entry["nmi_domain"] = float(normalized_mutual_info_score(truth[tiled], labels[tiled]))
            row[s] = entry
        results["settings"][name] = row
        if args.out is not None:  # after each setting, so that a long run leaves what it measured
            Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
        logger.warning("%s: %.1f s, ratios %s", name, seconds, {s: round(row[s]["ratio"], 3) for s in SCALES})
    if "none" in results["settings"]:  # the anchor: the one-grid embedding (the first embed also featurizes)
        for row in results["settings"].values():
            row["x_plain"] = row["seconds"] / results["settings"]["none"]["seconds"]
    # Leiden resolution sweep on the last setting's embeddings (the default chosen from it: see BENCHMARKS)
    results["resolution_sweep"] = {}
    for res in args.resolutions:
        sg.tl.microenvironments(sdata, resolution=res, key_added="sweep")  # .obs["sweep_{scale}"]
        for s in SCALES:
            labels = cells.obs[f"sweep_{s}"].astype(str).to_numpy()
            entry = {"n_microenv": int(len(set(labels[tiled]))), "coherence": coherence(labels, pairs)}
            if truth is not None:
                entry["ari_domain"] = float(adjusted_rand_score(truth[tiled], labels[tiled]))
                entry["nmi_domain"] = float(normalized_mutual_info_score(truth[tiled], labels[tiled]))
            results["resolution_sweep"][f"{s}@{res:g}"] = entry
        if args.out is not None:
            Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    return results


def to_markdown(res: dict) -> str:
    """A table of the results."""
    from sigmma_sc._constants import SCALES

    lines = [
        f"Section `{res['section']}`: {res['n_cells_tiled']} tiled cells, {res['n_tiles']} tiles; plain embedding "
        f"{res['plain_embed_seconds']:.1f} s.",
        "",
        "| setting | grids | blend | time (x plain) | tiles unchanged | "
        + " | ".join(f"{s}: ratio (ctrl) / n / ARI / coherence" for s in SCALES)
        + " |",
        "|---|---:|---|---:|---|" + "---|" * len(SCALES),
    ]
    for name, r in res["settings"].items():
        cells = []
        for s in SCALES:
            e = r[s]
            ari = f"{e['ari_domain']:.3f}" if "ari_domain" in e else "-"
            cells.append(
                f"{e['ratio']:.2f} ({e['ratio_control']:.2f}) / {e['n_microenv']} / {ari} / {e['coherence']:.3f}"
            )
        lines.append(
            f"| {name} | {r['n_grids']} | {r['blend']} | {r['seconds']:.1f} s (x{r['x_plain']:.0f}) | "
            f"{r['tile_embeddings_unchanged']} | " + " | ".join(cells) + " |"
        )
    if res.get("resolution_sweep"):
        lines += [
            "",
            f"Leiden resolution sweep on the `{list(res['settings'])[-1]}` embeddings (n / ARI / NMI / coherence):",
            "",
        ]
        lines += ["| scale | resolution | n | ARI | NMI | coherence |", "|---|---:|---:|---:|---:|---:|"]
        for key, e in res["resolution_sweep"].items():
            s, r = key.split("@")
            lines.append(
                f"| {s} | {r} | {e['n_microenv']} | {e.get('ari_domain', float('nan')):.3f} | "
                f"{e.get('nmi_domain', float('nan')):.3f} | {e['coherence']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="a saved model (trained on this section)")
    parser.add_argument("--sdata", type=Path, default=None, help="its tiled, graphed section (zarr; default: the demo)")
    parser.add_argument("--save-model", type=Path, default=None, help="save the trained model here")
    parser.add_argument("--truth", default="~/.cache/sigmma_sc/demo_15000_0/sigmma_truth.parquet")
    parser.add_argument("--settings", nargs="+", default=["none", "micro16", "r2_4", "r2_8", "r2_8_mean", "r2_16"])
    parser.add_argument("--resolutions", type=float, nargs="*", default=[1.0, 0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cell_maps_demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1))
    Path(f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
