"""The paper's Table 5 (ablation) plus a HEST-protocol column, on one section, in one command.

Usage::

    python benchmarks/paper_table.py --dataset bonemarrow            # real Xenium section (DAPI)
    python benchmarks/paper_table.py --dataset synthetic             # synthetic Xenium section (H&E)
    python benchmarks/paper_table.py --dataset synthetic --synthetic-contact --n-cells 30000 --input-size 112
                                                                     # ... with the planted contact programme
    python benchmarks/paper_table.py --dataset bonemarrow --device cuda --paper-defaults   # GPU, Table 3 settings

The section is tiled, graphed and featurized once (frozen backbone, 21 crops per tile); the featurized
tile table and the training bundle are cached under ``bench_out/paper_table/`` (git-ignored), so re-runs
skip featurization. Every row then trains on the same tiles and the same spatial split with each seed:

1. frozen backbone, macro crop (no training; probe only, there is no shared space to retrieve in);
2. frozen backbone, concatenation of the three scales (no training);
3. BLEEP-style: single scale (macro), no cell graph (MLP on the tile's mean node features);
4. cell graph, single scale: one GNN (``layers_per_scale`` SAGE layers) over the tile's plain 6-NN graph (every
   kNN edge of the tile, no block constraint, no edge addition), pooled once, aligned with the macro crop only
   (``graph="tile"``);
5. cell graph + multi-scale (= the "no edge addition" row): the micro -> meso -> macro hierarchy with fixed graphs
   (micro: kNN edges inside a micro block; meso: inside a meso block; macro: all kNN edges of the tile), three
   losses;
6. full SIGMMA: the same hierarchy with stochastic edge addition (candidates sampled into the meso and macro
   graphs);
7. control, no edges: rows 5-6's network (six SAGE layers, attention pooling, heads) with no edge at all
   (``edges="none"``), so it differs from row 5 only by the edges;
8. control, rewired edges: row 6 with every edge set rewired at random inside its blocks, degrees kept
   (``edges="rewired"``);
9. control, edges rewired across the whole tile: row 6 with every edge set's targets permuted among the tile's
   cells, degrees kept (``edges="rewired_tile"``): the graph keeps the tile's composition, not its arrangement.

Paired comparisons (issue 26): every trained run's per-tile evaluation arrays (retrieval embeddings, probe
predictions) are kept (``<out>_tiles.npz``) and the differences the ablation concludes from (full SIGMMA minus
no graph multi-scale, minus no edges, minus each rewiring, minus no edge addition, ...) get a paired bootstrap CI
over the evaluation tiles through ``sg.metrics.tile_metrics`` / ``sg.metrics.paired_bootstrap``, seeds pooled as
``benchmarks/_bench.py`` states (each seed's metric recomputed on each resample, then averaged over seeds).
``--folds K`` trains every row once per spatial fold (``sg.metrics.spatial_folds``: fold ``f`` = test, fold
``f + 1`` = validation, the rest training), so every tile with cells is a test tile once; retrieval ranks among
the tiles of one fold and the folds are pooled.

Training uses the package's defaults (:class:`sigmma_sc.model.SigmmaConfig`: a budget of 1000 optimiser steps,
batches of at most a quarter of the training tiles, AdamW lr 1e-3 with warm-up and cosine decay, gradient
clipping, model selection and early stopping on validation retrieval with patience 300 steps) at CPU widths
(hidden/out 128); ``--paper-defaults`` trains with Table 3 instead (``preset="paper"``: selection on the
validation loss). Every flag left unset keeps the config's default. Each row is embedded with
``sg.tl.embed(key_added=f"{row}_s{seed}")`` into the cached section and scored with
``sg.metrics.evaluate(use_rep=...)``; probes fit on training tiles, pick ridge alpha on validation tiles (paper
protocol) and report on test tiles (:mod:`sigmma_sc.metrics`).
The markdown table goes to ``benchmarks/results/paper_table_<dataset>.md``.
"""

# Private imports on purpose: sigmma_sc.datasets._expression.CONTACT_GENES (the planted programme's genes, scored here).

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load_arrays, paired_rows, save_arrays, verdict  # noqa: E402

logger = logging.getLogger("paper_table")

SCALES = ("micro", "meso", "macro")
FRACTIONS = (0.05, 0.10, 0.15)

# name, label, kind, SigmmaConfig overrides; (cell graph, multi-scale, graph sparsification) for Table 5 ticks
ROWS: tuple[dict[str, Any], ...] = (
    {"name": "backbone_macro", "label": "Frozen backbone (macro crop)", "ticks": ("", "", "")},
    {"name": "backbone_concat", "label": "Frozen backbone (3-scale concat.)", "ticks": ("", "✓", "")},
    {"name": "n_cells", "label": "Reference: log cell count per tile (no image)", "ticks": ("", "", "")},
    {
        "name": "bleep",
        "label": "BLEEP-style (no graph, single scale)",
        "ticks": ("", "", ""),
        "config": {"scales": ("macro",), "use_graph": False, "edge_addition": False},
    },
    {
        "name": "bleep_multiscale",
        "label": "No graph, multi-scale (reference: separates the graph from the scales)",
        "ticks": ("", "✓", ""),
        "config": {"scales": SCALES, "use_graph": False, "edge_addition": False},
    },
    {
        "name": "graph",
        "label": "Cell graph, single scale",
        "ticks": ("✓", "", ""),
        "config": {"scales": ("macro",), "use_graph": True, "edge_addition": False, "graph": "tile"},
    },
    {
        "name": "graph_multiscale",
        "label": "Cell graph + multi-scale (no edge addition)",
        "ticks": ("✓", "✓", ""),
        "config": {"scales": SCALES, "use_graph": True, "edge_addition": False, "graph": "hierarchical"},
    },
    {
        "name": "sigmma",
        "label": "Full SIGMMA",
        "ticks": ("✓", "✓", "✓"),
        "config": {"scales": SCALES, "use_graph": True, "edge_addition": True, "graph": "hierarchical"},
    },
    {
        "name": "no_edges",
        "label": "Control: same GNN, pooling and heads, no edges (multi-scale)",
        "ticks": ("", "✓", ""),
        "config": {
            "scales": SCALES,
            "use_graph": True,
            "edge_addition": False,
            "graph": "hierarchical",
            "edges": "none",
        },
    },
    {
        "name": "rewired",
        "label": "Control: full SIGMMA with edges rewired at random (degrees kept)",
        "ticks": ("✓", "✓", "✓"),
        "config": {
            "scales": SCALES,
            "use_graph": True,
            "edge_addition": True,
            "graph": "hierarchical",
            "edges": "rewired",
        },
    },
    {
        "name": "rewired_tile",
        "label": "Control: full SIGMMA with edges rewired across the whole tile (degrees kept)",
        "ticks": ("✓", "✓", "✓"),
        "config": {
            "scales": SCALES,
            "use_graph": True,
            "edge_addition": True,
            "graph": "hierarchical",
            "edges": "rewired_tile",
        },
    },
)

#: the paired differences the ablation concludes from (a - b), in this order
PAIRS: tuple[tuple[str, str], ...] = (
    ("sigmma", "bleep_multiscale"),
    ("graph_multiscale", "bleep_multiscale"),
    ("sigmma", "no_edges"),
    ("sigmma", "rewired"),
    ("sigmma", "rewired_tile"),
    ("sigmma", "graph_multiscale"),
    ("no_edges", "bleep_multiscale"),
    ("sigmma", "bleep"),
)
#: equivalence margin of R@10% (issue 26: "equal within ±0.03")
MARGIN = 0.03


# the paper's Table 5 (HEST1k-LUAD, UNI backbone, GPU) for reference: PCC, and R@10% in both directions
PAPER_TABLE5: dict[str, dict[str, float]] = {
    "bleep": {"pcc": 0.345, "i2s_r10": 0.694, "s2i_r10": 0.673},
    "graph": {"pcc": 0.268, "i2s_r10": 0.639, "s2i_r10": 0.621},
    "graph_multiscale": {"pcc": 0.645, "i2s_r10": 0.667, "s2i_r10": 0.685},
    "sigmma": {"pcc": 0.741, "i2s_r10": 0.728, "s2i_r10": 0.768},
}


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=("bonemarrow", "synthetic"), required=True)
    p.add_argument("--tile-size-um", type=float, default=None, help="tile side (default 128 µm, as in the paper)")
    p.add_argument("--pixel-size-um", type=float, default=0.5, help="tile pixel size fed to the backbone")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests only)")
    p.add_argument("--n-comps", type=int, default=50, help="PCA node features per cell")
    p.add_argument("--steps", type=int, default=None, help="optimiser-step budget (config default: 1000)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (alone: turns the step budget off)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience in steps (default 300)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--out-dim", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--paper-defaults", action="store_true", help="Table 3 settings (GPU): preset='paper'")
    p.add_argument("--input-size", type=int, default=None, help="backbone input px per crop (default: backbone's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rows", nargs="+", default=None, help=f"subset of {[r['name'] for r in ROWS]}")
    p.add_argument("--eval-split", choices=("test", "val"), default="test", help="'val' for model selection")
    p.add_argument("--n-cells", type=int, default=None, help="synthetic section: number of cells")
    p.add_argument(
        "--synthetic-contact",
        action="store_true",
        help="synthetic Xenium section with the planted cell-contact programme (synthetic_xenium(contact_program=True))",
    )
    p.add_argument(
        "--synthetic-source",
        choices=("xenium", "section"),
        default="xenium",
        help="synthetic data: the Xenium writer + reader (sg.datasets) or the small test section (tests/_section.py)",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests")
    p.add_argument("--save-embeddings", action="store_true", help="keep each run's tile embeddings in the cache")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "bench_out" / "paper_table")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/...)")
    p.add_argument("--tag", default="", help="suffix of the default output name")
    p.add_argument("--from-json", type=Path, default=None, help="re-render the markdown of a finished run's JSON")
    p.add_argument("--add-to", type=Path, default=None, help="run --rows and merge them into a finished run's JSON")
    p.add_argument("--folds", type=int, default=None, help="spatial k-fold: train every row once per fold")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the paired CIs")
    args = p.parse_args(argv)
    _defaults(args)
    return args


#: training fields the command line can set; unset ones keep the preset's value (SigmmaConfig)
TRAIN_FIELDS = ("steps", "epochs", "patience", "batch_size", "hidden", "out_dim", "lr", "temperature", "dropout")
TRAIN_FIELDS += ("weight_decay",)


def _defaults(args: argparse.Namespace) -> None:
    """``--paper-defaults``: the Table 3 preset; ``--quick``: tiny settings for tests; otherwise the package's
    training defaults (step budget, warm-up + cosine, early stopping, clipping) at CPU widths. Explicit flags win."""
    args.preset = "paper" if args.paper_defaults else "default"
    if args.paper_defaults:
        d: dict[str, Any] = {}
    elif args.quick:
        d = {"steps": 6, "batch_size": 16, "hidden": 16, "out_dim": 16, "patience": None}
    else:
        d = {"hidden": 128, "out_dim": 128}  # CPU widths, as benchmarks/train_defaults.py chose the defaults with
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tile_size_um is None:
        args.tile_size_um = 128.0
    if args.n_cells is None:
        args.n_cells = 600 if args.quick else 40_000


# ---------------------------------------------------------------------------------------------- data
def load_section(args: argparse.Namespace):
    """``(sdata, image_key)`` of the requested section."""
    if args.dataset == "bonemarrow":
        from _bonemarrow import load_bonemarrow

        return load_bonemarrow(), "dapi"
    return _synthetic_section(args), "he"


def _synthetic_section(args: argparse.Namespace):
    """The synthetic Xenium section with its registered H&E (``sg.datasets``), or the small test section."""
    if args.synthetic_source == "xenium":
        from sigmma_sc.datasets import synthetic_xenium
        from sigmma_sc.io import xenium

        contact = "contact_" if args.synthetic_contact else ""
        folder = args.cache_dir / f"synthetic_{contact}xenium_{args.n_cells}_0"
        if not (folder / "experiment.xenium").exists():
            logger.info("Writing the synthetic Xenium section to %s", folder)
            synthetic_xenium(
                folder,
                n_cells=args.n_cells,
                seed=0,
                transcripts=False,
                contact_program=args.synthetic_contact,
                overwrite=True,
            )
        return xenium(folder, he_image="auto")
    sys.path.insert(0, str(ROOT / "tests"))
    from _section import make_section

    return make_section(n_cells=args.n_cells, image_px=256, n_genes=30)


def _cache_name(args: argparse.Namespace) -> str:
    n = f"_{args.synthetic_source}{args.n_cells}" if args.dataset == "synthetic" else ""
    if args.dataset == "synthetic" and args.synthetic_contact:
        n += "_contact"
    pre = "_random" if args.no_pretrained else ""
    size = f"_in{args.input_size}" if args.input_size else ""
    return (
        f"{args.dataset}{n}_{args.tile_size_um:g}um_{args.pixel_size_um:g}px_{args.backbone}{pre}{size}"
        f"_pca{args.n_comps}"
    )


def prepare(args: argparse.Namespace):
    """Tile, graph and featurize once; return ``(sdata, training bundle, info)`` from the cache.

    The cached section is a SpatialData zarr with the tables and shapes (not the image: the backbone features
    are cached in the tile table), so that every row is embedded and scored through the public API
    (``sg.tl.embed(key_added=...)``, ``sg.metrics.evaluate(use_rep=...)``).
    """
    import spatialdata as sd

    import sigmma_sc as sg
    from sigmma_sc.model import TrainingBundle

    folder = args.cache_dir / _cache_name(args)
    files = {"section": folder / "section.zarr", "bundle": folder / "bundle.pt", "info": folder / "info.json"}
    if all(f.exists() for f in files.values()):
        logger.info("Using the cached featurized section %s", folder)
        return sd.read_zarr(files["section"]), TrainingBundle.load(files["bundle"]), json.loads(files["info"].read_text())
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata, image_key = load_section(args)
    t_load = time.perf_counter() - t0
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=args.tile_size_um, pixel_size_um=args.pixel_size_um, seed=0)
    sg.pp.cell_graph(sdata, n_comps=args.n_comps)
    t1 = time.perf_counter()
    sg.tl.featurize(
        sdata, backbone=args.backbone, pretrained=not args.no_pretrained, device=args.device, input_size=args.input_size
    )
    t_feat = time.perf_counter() - t1
    bundle, _ = sg.data.build_bundle(sdata)
    tiles = sdata.tables["sigmma_tiles"]
    cells = sdata.tables["table"]
    info = {
        "dataset": args.dataset,
        "image_key": image_key,
        "n_cells": int(cells.n_obs),
        "n_cells_tiled": int(bundle.n_cells),
        "n_genes": int(cells.n_vars),
        "n_tiles": int(tiles.n_obs),
        "split": {k: int(v) for k, v in tiles.obs["split"].value_counts().items()},
        "cells_per_tile_median": float(np.median(tiles.obs["n_cells"])),
        "tile_size_um": args.tile_size_um,
        "pixel_size_um": args.pixel_size_um,
        "backbone": args.backbone,
        "pretrained": not args.no_pretrained,
        "load_seconds": round(t_load, 1),
        "featurize_seconds": round(t_feat, 1),
        "featurize_device": args.device,
        "input_size": args.input_size,
        "contact_program": bool(args.dataset == "synthetic" and args.synthetic_contact),
    }
    if info["contact_program"]:
        info["n_contacted"] = int(cells.uns["sigmma_synthetic"]["contact_program"]["n_contacted"])
    section = sd.SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))  # no image, no transcripts
    section.write(files["section"], overwrite=True)
    bundle.save(files["bundle"])
    files["info"].write_text(json.dumps(info, indent=1))
    logger.info("Cached the featurized section in %s (featurization %.0f s)", folder, t_feat)
    return sd.read_zarr(files["section"]), bundle, info


# ---------------------------------------------------------------------------------------------- rows
def _config(args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
    """The row's ``SigmmaConfig`` overrides: the flags that were set, then the row's ablation switches."""
    cfg = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
    if args.quick:
        cfg["patience"] = None
    return cfg | dict(row.get("config", {}))


def _score(
    sdata, embeddings: dict[str, list[str]], args: argparse.Namespace, use_rep: str = "sigmma"
) -> dict[str, dict[str, float]]:
    """``sg.metrics.evaluate`` rows (retrieval partners found through ``use_rep``), with the contact-gene probe."""
    import sigmma_sc as sg

    df = sg.metrics.evaluate(sdata, embeddings=embeddings, use_rep=use_rep, split=args.eval_split, n_genes=args.n_genes)
    out = {name: {k: float(v) for k, v in r.items()} for name, r in df.iterrows()}
    if args.dataset == "synthetic" and args.synthetic_contact:
        for name, keys in embeddings.items():
            out[name] |= _contact_scores(sdata.tables["sigmma_tiles"], keys, args)
    return out


def _contact_scores(tiles, keys: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Gene-wise probe PCC of the planted contact-programme genes (both protocols; NaN if not a probe target)."""
    import sigmma_sc as sg
    from sigmma_sc.datasets._expression import CONTACT_GENES

    out = {}
    for protocol in ("paper", "hest"):
        res = sg.metrics.linear_probe(tiles, keys, protocol=protocol, eval_split=args.eval_split, n_genes=args.n_genes)
        genes = list(res.genes)
        pcc = [float(res.gene_pcc[genes.index(g)]) for g in CONTACT_GENES if g in genes]
        out[f"{protocol}_contact_pcc"] = float(np.mean(pcc)) if pcc else float("nan")
        out[f"{protocol}_contact_n"] = float(len(pcc))
    return out


def run_backbone(row: dict[str, Any], sdata, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Untrained rows (deterministic, so one 'seed'): frozen backbone features, or the tile's cell count alone.

    The backbone features are ``sg.tl.featurize``'s documented outputs ``.obsm['sigmma_backbone_{scale}']``.
    """
    if row["name"] == "n_cells":
        tiles = sdata.tables["sigmma_tiles"]
        tiles.obsm["log_n_cells"] = np.log1p(tiles.obs["n_cells"].to_numpy(dtype=np.float64))[:, None]
        keys = ["log_n_cells"]
    elif row["name"] == "backbone_macro":
        keys = ["sigmma_backbone_macro"]
    else:
        keys = [f"sigmma_backbone_{s}" for s in SCALES]
    out = _score(sdata, {"model": keys}, args)
    out["model"]["train_seconds"] = 0.0
    out["_arrays"] = _tile_arrays(sdata, None, keys, args)
    return out


def _eval_mask(tiles, split: str) -> np.ndarray:
    """The evaluation tiles as ``sg.metrics`` selects them: the split's tiles that hold cells."""
    mask = tiles.obs["split"].astype(str).to_numpy() == split
    return mask & (tiles.obs["n_cells"].to_numpy() > 0)


def _tile_arrays(sdata, written, keys: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per-tile arrays of one run on the evaluation tiles (``_bench.run_arrays``): retrieval embeddings when the run
    has them (``written``: ``sg.tl.embed``'s record of its keys), and both protocols' probes of ``keys``."""
    from _bench import run_arrays

    import sigmma_sc as sg

    tiles = sdata.tables["sigmma_tiles"]
    probes = [
        sg.metrics.linear_probe(tiles, keys, protocol=p, eval_split=args.eval_split, n_genes=args.n_genes)
        for p in ("paper", "hest")
    ]
    mask = _eval_mask(tiles, args.eval_split)
    if written is None:
        return run_arrays(tiles, {"image": {}, "st": {}}, mask, probes)
    return run_arrays(tiles, written, mask, probes)


def run_model(row: dict[str, Any], sdata, bundle, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train one ablation row with one seed on the shared bundle; embed it next to the others and score it.

    The row's embeddings are written with ``sg.tl.embed(key_added=f'{row}_s{seed}')`` and scored with
    ``sg.metrics.evaluate(use_rep=...)``; the cells' embeddings are dropped afterwards (the tile table is
    what is scored; the cell table would grow by one ``(n_cells, out_dim)`` array per scale and run).
    """
    import sigmma_sc as sg
    from sigmma_sc.model import SigmmaModel

    cfg = _config(args, row)
    model = SigmmaModel.from_bundle(bundle, seed=seed, preset=args.preset, **cfg)
    t0 = time.perf_counter()
    history = model.fit(bundle, seed=seed, device=args.device, progress=False)
    seconds = time.perf_counter() - t0
    key = f"{row['name']}_s{seed}"
    # only the tile embeddings are scored: no shifted cell passes
    sg.tl.embed(sdata, model, device=args.device, key_added=key, shifts=None)
    tiles, cells = sdata.tables["sigmma_tiles"], sdata.tables["table"]
    written = tiles.uns[key]["embed"]["keys"]  # the record sg.tl.embed keeps of what it wrote
    for k in written.get("cell", {}).values():
        del cells.obsm[k]
    if args.save_embeddings:  # for investigations on validation tiles without retraining
        folder = args.cache_dir / _cache_name(args) / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"{kind}_{s}": np.asarray(tiles.obsm[k]) for kind in ("image", "st") for s, k in written[kind].items()}
        np.savez_compressed(folder / f"{row['name']}_seed{seed}.npz", **arrays)
    embeddings = {"model": list(written["image"].values())}
    if len(model.scales) > 1:
        embeddings["macro"] = [written["image"]["macro"]]
    out = _score(sdata, embeddings, args, use_rep=key)
    out["_arrays"] = _tile_arrays(sdata, written, embeddings["model"], args)
    for k in {*written["image"].values(), *written["st"].values()}:  # the arrays are kept; free the tile table
        del tiles.obsm[k]
    diag = model.diagnostics
    val = [h["val_loss"] for h in history if h["val_loss"] is not None]
    best = diag.get("best_epoch", len(history)) - 1  # the kept weights (select_by decides)
    out["model"] |= {
        "train_seconds": seconds,
        "best_epoch": best + 1,
        "epochs": len(history),
        "best_step": int(history[best]["step"]) if history else 0,
        "steps": int(history[-1]["step"]) if history else 0,
        "batch": int(diag.get("batch_size", model.config.batch_for(int((bundle.split == 0).sum())))),
        "best_val_loss": float(min(val)) if val else float("nan"),
        "best_val_rank": float(diag.get("best_val_rank", np.nan)),
        "val_chance": float(history[-1].get("val_chance") or np.nan) if history else float("nan"),
    }
    # validation retrieval (partner rank, 0.5 = chance) against the optimiser step: is the budget enough?
    out["curve"] = [[int(h["step"]), float(h["val_rank"])] for h in history if h.get("val_rank") is not None]
    # edge addition at work (issue 9): last epoch's sampled-candidate fraction and mean edge probability
    for s in ("meso", "macro"):
        for k in ("edge_sampled", "edge_prob", "edge_grad"):
            if history and f"{k}_{s}" in history[-1]:
                out["model"][f"{k}_{s}"] = float(history[-1][f"{k}_{s}"])
    out["config"] = {k: v for k, v in model.config.to_dict().items() if not isinstance(v, dict)}
    return out


# ---------------------------------------------------------------------------------------------- table
def _agg(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if v.size > 1 else 0.0


def _fmt(values: list[float], digits: int = 3, *, std: bool = True) -> str:
    m, s = _agg(values)
    if np.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if std and len(values) > 1 else f"{m:.{digits}f}"


def summarise(results: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Row -> metric -> (mean, std) over seeds, for the 'model' embedding."""
    out = {}
    for name, runs in results.items():
        keys = runs[0]["model"].keys()
        out[name] = {k: _agg([r["model"][k] for r in runs]) for k in keys}
    return out


def render(
    results, info, args, argv, runtime: float, baseline: dict[str, dict[str, float]], date: str, extra=(), store=None
) -> str:
    """The markdown report."""
    import torch

    rows = [r for r in ROWS if r["name"] in results]
    split_name = "test" if args.eval_split == "test" else "validation (model selection)"
    lines = [
        f"# Paper Table 5 (+ HEST column) on `{args.dataset}`",
        "",
        f"- Command: `python benchmarks/paper_table.py {shlex.join(argv)}`",
        *[f"- Rows added with: `python benchmarks/paper_table.py {shlex.join(a)}`" for a in extra],
        f"- Date: {date}",
        f"- Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(torch threads {args.threads or torch.get_num_threads()}), device `{args.device}`"
        + (" — CPU run: smaller dims than the paper's Table 3" if args.device == "cpu" else ""),
        f"- Runtime: {runtime / 60:.1f} min in total (featurization "
        f"{info.get('featurize_seconds', float('nan')):.0f} s on `{info.get('featurize_device')}`, cached and reused"
        " across rows and seeds)",
        f"- Data: {info['n_cells']:,} cells, {info['n_genes']} genes; {info['n_tiles']} tiles of "
        f"{info['tile_size_um']:g} µm (median {info['cells_per_tile_median']:.0f} cells/tile; split "
        f"{info['split']}), tile pixels {info['pixel_size_um']:g} µm, image `{info['image_key']}`",
        f"- Backbone: `{info['backbone']}` (pretrained={info['pretrained']}), frozen, 21 crops/tile (4x4 micro, 2x2 "
        f"meso, 1 macro{_input_size(info)}), mean-pooled per scale"
        + (
            f"; synthetic section with the planted contact programme ({info.get('n_contacted')} contacted tumour cells)"
            if info.get("contact_program")
            else ""
        ),
        f"- Training: {_training_line(results, args)}; checkpoint = best validation {_selection(results)}; seeds "
        f"{args.seeds}"
        + (f"; {args.folds}-fold spatial cross-validation (one model per fold, row and seed)" if args.folds else ""),
        f"- Scored on the {split_name} tiles ({_n_eval(results)} tiles); probes fit on training tiles only, paper "
        "protocol's ridge alpha chosen on validation tiles; cells: mean ± std over seeds (frozen backbone: "
        "deterministic, one value)",
        "",
        "## Table 5 layout",
        "",
        "Probe = linear probe of the row's image embedding (all of its scales concatenated; single-scale rows: "
        "macro). Retrieval = image ↔ ST on the same embedding (scales L2-normalised and concatenated). "
        "PCC/MSE: paper protocol (tile-level, eq. 1-2, top 50 HVGs); HEST PCC: HEST-Benchmark protocol "
        "(gene-wise PCC).",
        "",
        "| Row | Cell graph | Multi-scale | Graph sparsif. | MSE (↓) | PCC (↑) | HEST PCC (↑) "
        "| I→ST R@5% | R@10% | R@15% | ST→I R@5% | R@10% | R@15% |",
        "|---|:-:|:-:|:-:|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = results[row["name"]]
        col = lambda k, d=3, runs=runs: _fmt([r["model"][k] for r in runs], d)
        ret = [col(f"{d} R@{p}%") for d in ("image->st", "st->image") for p in (5, 10, 15)]
        lines.append(
            f"| {row['label']} | {' | '.join(row['ticks'])} | {col('paper_mse', 4)} | {col('paper_pcc')} | "
            f"{col('hest_gene_pcc')} | {' | '.join(ret)} |"
        )
    lines += [
        "",
        "Reference, no image: predicting every tile by the training tiles' mean expression gives paper-protocol "
        f"PCC {baseline['paper']['pcc']:.3f} ± {baseline['paper']['pcc_std']:.3f} and MSE "
        f"{baseline['paper']['mse']:.4f} (tile-level PCC across genes rewards the genes' mean levels; "
        "gene-wise PCC is the discriminative probe metric).",
        "",
        "## Details",
        "",
        "Paper protocol: tile-level PCC and MSE as mean ± std over test tiles (seed mean), gene-wise PCC. HEST: "
        "gene-wise PCC (HEST's `pearson_mean`), MSE with the training mean added back (= ridge with intercept) "
        "and HEST's raw MSE without intercept (inflated by the squared gene means). Macro-only: the macro "
        "embedding of multi-scale rows.",
        "",
        "| Row | paper PCC (tiles) | paper MSE (tiles) | paper gene PCC | HEST gene PCC | HEST MSE | HEST raw MSE "
        "| macro-only PCC | macro-only HEST PCC | macro I→ST R@10% | macro ST→I R@10% | best step | train s/seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = results[row["name"]]
        m = lambda k, runs=runs: float(np.nanmean([r["model"].get(k, np.nan) for r in runs]))
        macro = [r.get("macro", r["model"]) for r in runs]
        mac = lambda k, macro=macro: _fmt([x[k] for x in macro])
        trained = "config" in row
        lines.append(
            f"| {row['label']} | {m('paper_pcc'):.3f} ± {m('paper_pcc_std'):.3f} | {m('paper_mse'):.4f} ± "
            f"{m('paper_mse_std'):.4f} | {_fmt([r['model']['paper_gene_pcc'] for r in runs])} | "
            f"{_fmt([r['model']['hest_gene_pcc'] for r in runs])} | {m('hest_mse'):.4f} | {m('hest_mse_raw'):.3f} | "
            f"{mac('paper_pcc')} | {mac('hest_gene_pcc')} | {mac('image->st R@10%')} | {mac('st->image R@10%')} | "
            f"{_best(runs) if trained else '–'} | "
            f"{m('train_seconds'):.0f} |"
        )
    lines += _training_table(results, rows)
    notes = Path(__file__).resolve().parent / "results" / "paper_table_investigation.md"
    if notes.exists() and args.dataset == "bonemarrow":
        lines += [
            "",
            "Investigation of these numbers (validation split only): `benchmarks/results/" + notes.name + "`.",
        ]
    lines += _paired_section(store, args)
    lines += _curve_section(results, rows)
    lines += ["", "## What the numbers say", "", *answers(summarise(results), info | {"n_eval": _n_eval(results)}), ""]
    return "\n".join(lines)


def _paired_section(store, args: argparse.Namespace) -> list[str]:
    """Paired bootstrap CIs of the differences the ablation concludes from (``sg.metrics.paired_bootstrap``)."""
    if not store:
        return []
    rows = paired_rows(store, PAIRS, n_boot=args.n_boot)
    if not rows:
        return []
    n = rows[0]["n_tiles"]
    tiles = (
        f"{args.folds}-fold spatial cross-validation (every tile with cells tested once)"
        if args.folds
        else f"the {args.eval_split} split"
    )
    pooled = ", retrieval ranked among the tiles of one fold and the folds averaged by their resampled tiles"
    out = [
        "",
        "## Paired differences (95 % CI)",
        "",
        f"Paired bootstrap over the {n} evaluation tiles of {tiles}, {rows[0]['n_boot']} resamples "
        "(`sg.metrics.paired_bootstrap` on `sg.metrics.tile_metrics`). Seeds pooled: on each resample every seed's "
        "metric is recomputed and averaged over the seeds, so the CI is that of the difference of the seed means"
        + (pooled if args.folds else "")
        + f". `p`: two-sided bootstrap share. Reading: a CI inside ±{MARGIN:g} on R@10 % is called equal (the "
        "issue's equivalence margin); a CI that straddles 0 and leaves that margin is undetermined.",
        "",
        "| a − b | metric | a | b | difference [95 % CI] | p | seeds | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = dict(_bench_metrics())
    for r in rows:
        margin = MARGIN if "R@" in r["metric"] else None
        out.append(
            f"| `{r['a']}` − `{r['b']}` | {labels.get(r['metric'], r['metric'])} | {r['value_a']:.3f} | "
            f"{r['value_b']:.3f} | {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {_p(r['p'])} | "
            f"{r['n_seeds']} | {verdict(r, margin)} |"
        )
    return out


def _bench_metrics():
    from _bench import PAIRED_METRICS

    return PAIRED_METRICS


def _p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _curve_section(results, rows) -> list[str]:
    """Validation retrieval (partner rank; 0.5 = chance, lower is better) against the step, per trained row: has the
    budget been enough? Mean over seeds at each validated step."""
    curves = {r["name"]: [x.get("curve") for x in results[r["name"]]] for r in rows if "config" in r}
    curves = {k: v for k, v in curves.items() if v and all(v)}
    if not curves:
        return []
    steps = sorted({int(s) for v in curves.values() for c in v for s, _ in c})
    if len(steps) > 10:
        steps = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, 10)]
    out = [
        "",
        "## Validation retrieval against the step (the budget)",
        "",
        "Validation partner rank (0 = every tile's image finds its own cells first, 0.5 = chance; the selection "
        "criterion, `select_by='retrieval'`), mean over seeds, at validated steps (nearest validation at or before "
        "the step). A row whose rank still falls at the end of the budget has not stopped improving.",
        "",
        "| row | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, cs in curves.items():
        vals = []
        for st in steps:
            v = [next((r for s, r in reversed(c) if s <= st), np.nan) for c in cs]
            vals.append(f"{np.nanmean(v):.3f}" if np.isfinite(v).any() else "–")
        out.append(f"| `{name}` | " + " | ".join(vals) + " |")
    return out


def _selection(results) -> str:
    """What chose the kept checkpoint (older JSONs, without ``select_by``: the validation loss)."""
    cfg = next((runs[0]["config"] for runs in results.values() if "config" in runs[0]), {})
    return "retrieval (partner rank)" if cfg.get("select_by") == "retrieval" else "loss"


def _best(runs) -> str:
    """Best validation step (older JSONs: epoch) as mean ± std over seeds."""
    if "best_step" in runs[0]["model"]:
        return _fmt([r["model"]["best_step"] for r in runs], 0)
    return _fmt([r["model"].get("best_epoch", np.nan) for r in runs], 0) + " (epoch)"


def _training_table(results, rows) -> list[str]:
    """Per trained row: steps run, best step, best validation loss vs chance, edge-addition statistics."""
    trained = [r for r in rows if "config" in r and "steps" in results[r["name"]][0]["model"]]
    if not trained:
        return []
    out = [
        "",
        "Training (mean ± std over seeds): optimiser steps run (early stopping or budget), step of the kept "
        "checkpoint, best validation loss against the chance level log(batch) per scale, and for edge addition the "
        "last epoch's fraction of candidate edges sampled on and mean edge probability (meso / macro).",
        "",
        "| Row | steps run | best step | best val loss | val chance | sampled meso | sampled macro | p meso "
        "| p macro |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in trained:
        runs = results[row["name"]]
        col = lambda k, d=3, runs=runs: _fmt([r["model"].get(k, np.nan) for r in runs], d)
        out.append(
            f"| {row['label']} | {col('steps', 0)} | {col('best_step', 0)} | {col('best_val_loss')} | "
            f"{col('val_chance')} | {col('edge_sampled_meso')} | {col('edge_sampled_macro')} | "
            f"{col('edge_prob_meso')} | {col('edge_prob_macro')} |"
        )
    return out


def _input_size(info: dict[str, Any]) -> str:
    return f"; crops resized to {info['input_size']} px" if info.get("input_size") else ""


def _training_line(results, args: argparse.Namespace) -> str:
    """The training settings, from the config recorded with the runs (older JSONs: from the arguments)."""
    cfg = next((runs[0]["config"] for runs in results.values() if "config" in runs[0]), None)
    if cfg is None and not any("config" in r for r in ROWS if r["name"] in results):
        return "none (no trained row)"
    if cfg is None:  # a JSON written before the step budget (issue 14): 15 epochs, StepLR
        return (
            f"{args.epochs} epochs, batch {args.batch_size} tiles, hidden {args.hidden}, out {args.out_dim}, lr "
            f"{args.lr}, temperature {args.temperature}, AdamW + StepLR(100, 0.1)"
        )
    budget = [f"{cfg['steps']} optimiser steps" if cfg.get("steps") else None]
    budget += [f"{cfg['epochs']} epochs" if cfg.get("epochs") else None]
    batches = sorted({int(r["model"]["batch"]) for runs in results.values() for r in runs if "batch" in r["model"]})
    sched = (
        f"warm-up {cfg['warmup']:g} of the budget + cosine decay"
        if cfg["schedule"] == "cosine"
        else f"StepLR({cfg['step_size']}, {cfg['gamma']:g})"
    )
    stop = f"early stopping patience {cfg['patience']} steps" if cfg.get("patience") else "no early stopping"
    clip = f"grad-norm clip {cfg['max_grad_norm']:g}" if cfg.get("max_grad_norm") else "no clipping"
    return (
        f"preset `{args.preset}`: budget {' or '.join(b for b in budget if b)}, batch {cfg['batch_size']} capped at "
        f"{cfg['max_batch_fraction']:g} of the training tiles (= {'/'.join(map(str, batches))} tiles), hidden "
        f"{cfg['hidden']}, out {cfg['out_dim']}, AdamW lr {cfg['lr']:g} (weight decay {cfg['weight_decay']:g}), "
        f"{sched}, {stop}, {clip}, temperature {cfg['temperature']:g}, dropout {cfg['dropout']:g}, "
        f"{cfg['layers_per_scale']} SAGE layers per scale, tau_e {cfg['tau_e']:g}"
    )


ISSUE9_METRICS = (
    ("paper_pcc", "paper tile PCC"),
    ("paper_gene_pcc", "paper gene-wise PCC"),
    ("hest_gene_pcc", "HEST PCC"),
    ("image->st R@10%", "image->ST R@10%"),
    ("st->image R@10%", "ST->image R@10%"),
)


def _verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """``a`` vs ``b`` (mean, std over seeds): the difference and whether it exceeds the seeds' spread."""
    d = a[0] - b[0]
    spread = float(np.hypot(a[1], b[1]))
    word = "higher" if d > spread else "lower" if d < -spread else "within the seed spread"
    return f"{d:+.3f} ({word}; spread {spread:.3f})"


def _issue9_answers(s: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Issue 9's questions: do the graph rows beat the no-graph row, is full SIGMMA >= no edge addition?"""
    out = []
    if "bleep_multiscale" in s and "graph_multiscale" in s:
        diffs = "; ".join(
            f"{lab} {_verdict(s['graph_multiscale'][k], s['bleep_multiscale'][k])}" for k, lab in ISSUE9_METRICS
        )
        out.append(f"- `graph_multiscale` minus no graph, multi-scale (`bleep_multiscale`): {diffs}")
    if "bleep" in s:
        for name in ("graph", "graph_multiscale", "sigmma"):
            if name in s:
                diffs = "; ".join(f"{lab} {_verdict(s[name][k], s['bleep'][k])}" for k, lab in ISSUE9_METRICS)
                out.append(f"- `{name}` minus BLEEP-style: {diffs}")
    if "sigmma" in s and "graph_multiscale" in s:
        diffs = "; ".join(f"{lab} {_verdict(s['sigmma'][k], s['graph_multiscale'][k])}" for k, lab in ISSUE9_METRICS)
        out.append(f"- Full SIGMMA minus no edge addition (`graph_multiscale`): {diffs}")
    contact = [n for n in s if "hest_contact_pcc" in s[n]]
    if contact:
        paper_n = max(s[n].get("paper_contact_n", (0.0, 0.0))[0] for n in contact)
        out.append(
            "- Contact-programme genes (CXCL10, CD274, IDO1), gene-wise PCC of the HEST-protocol probe: "
            + ", ".join(f"`{n}` {_pm(s[n]['hest_contact_pcc'])}" for n in contact)
            + (
                "; they are not among the paper protocol's 50 HVG targets"
                if paper_n == 0
                else "; paper protocol: " + ", ".join(f"`{n}` {_pm(s[n]['paper_contact_pcc'])}" for n in contact)
            )
        )
    return out


def _pm(v: tuple[float, float]) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def _n_eval(results) -> int:
    return int(next(iter(results.values()))[0]["model"]["n_eval"])


def answers(s: dict[str, dict[str, tuple[float, float]]], info: dict[str, Any]) -> list[str]:
    """The project's questions, answered from the table (no interpretation beyond the numbers)."""
    out = []
    if "sigmma" not in s:
        return ["(full SIGMMA row not run)"]
    full = s["sigmma"]
    n_train = int(info["split"].get("train", 0))
    degenerate = n_train <= 256
    metrics = (
        ("paper_pcc", "paper-protocol tile PCC"),
        ("paper_gene_pcc", "paper-protocol gene-wise PCC"),
        ("hest_gene_pcc", "HEST PCC"),
    )
    for base in ("backbone_macro", "backbone_concat"):
        if base not in s:
            continue
        for metric, label in metrics:
            f, b = full[metric][0], s[base][metric][0]
            rel = (f / b - 1) * 100 if b else float("nan")
            verdict = f"{'meets' if rel >= 30 else 'misses'} the +30% goal"
            if metric.startswith("hest") and "n_cells" in s and b < s["n_cells"][metric][0]:
                verdict += (
                    f"; but the backbone scores below the no-image cell-count reference "
                    f"({s['n_cells'][metric][0]:.3f}), so HEST's pipeline, not the features, limits it here"
                )
            if metric.startswith("hest") and degenerate:
                verdict = (
                    f"not a valid comparison: only {n_train} training tiles, so the backbone's PCA keeps {n_train} "
                    "components and HEST's fixed penalty 100 / (n_components * 50) lets the ridge interpolate the "
                    "training tiles"
                )
            out.append(
                f"- Full SIGMMA vs frozen backbone ({base}), {label}: {f:.3f} vs {b:.3f} ({rel:+.1f}%; {verdict})"
            )
    if "n_cells" in s:
        c = s["n_cells"]
        out.append(
            f"- No image at all: the tile's log cell count alone reaches paper-protocol gene-wise PCC "
            f"{c['paper_gene_pcc'][0]:.3f} and HEST PCC {c['hest_gene_pcc'][0]:.3f} (full SIGMMA: "
            f"{full['paper_gene_pcc'][0]:.3f} and {full['hest_gene_pcc'][0]:.3f})"
        )
    if "bleep" in s:
        b = s["bleep"]
        for metric, label in metrics:
            out.append(
                f"- Full SIGMMA vs BLEEP-style, {label}: {_pm(full[metric])} vs {_pm(b[metric])} (mean ± std over seeds)"
            )
        n = int(info.get("n_eval") or 0)
        if n:
            chance = "/".join(f"{max(1, int(np.floor(p * n))) / n:.3f}" for p in FRACTIONS)
            out.append(f"- Retrieval chance level on {n} tiles (R@5/10/15% = K/N): {chance}")
        for d in ("image->st", "st->image"):
            fr = [full[f"{d} R@{p}%"][0] for p in (5, 10, 15)]
            br = [b[f"{d} R@{p}%"][0] for p in (5, 10, 15)]
            out.append(
                f"- Full SIGMMA vs BLEEP-style, {d} R@5/10/15%: {'/'.join(f'{x:.3f}' for x in fr)} vs "
                f"{'/'.join(f'{x:.3f}' for x in br)}"
            )
    out += _issue9_answers(s)
    order = [n for n in PAPER_TABLE5 if n in s]
    for metric, paper_key, label in (
        ("paper_pcc", "pcc", "probe PCC"),
        ("image->st R@10%", "i2s_r10", "image->ST R@10%"),
        ("st->image R@10%", "s2i_r10", "ST->image R@10%"),
    ):
        ours = [s[n][metric][0] for n in order]
        paper = [PAPER_TABLE5[n][paper_key] for n in order]
        same = list(np.argsort(ours)) == list(np.argsort(paper))
        out.append(
            f"- Ranking of the trained rows {order} by {label}: ours {', '.join(_pm(s[n][metric]) for n in order)}; "
            f"paper {', '.join(f'{x:.3f}' for x in paper)}; same order as the paper: {'yes' if same else 'no'} "
            "(differences within the seed std are not resolved)"
        )
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; return the path of the markdown table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.n_genes = 50
    if args.from_json is not None:
        return _rerender(args.from_json)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sigmma_sc").setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    sdata, bundle, info = prepare(args)
    logger.info("Section: %s", info)

    rows = list(ROWS) if args.rows is None else [r for n in args.rows for r in ROWS if r["name"] == n]  # run order
    unknown = set(args.rows or ()) - {r["name"] for r in ROWS}
    if unknown:
        raise SystemExit(f"Unknown rows {sorted(unknown)}; choose from {[r['name'] for r in ROWS]}.")
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    store: dict[str, list[list[dict[str, np.ndarray]]]] = {}  # row -> seeds -> folds -> per-tile arrays
    if args.add_to is not None:
        raw = json.loads(args.add_to.read_text())
        results = raw["results"]
        if _arrays_path(args.add_to).exists():
            store = load_arrays(_arrays_path(args.add_to))
    splits = _fold_splits(sdata, bundle, args)
    own_split = (sdata.tables["sigmma_tiles"].obs["split"].astype(str).to_numpy().copy(), bundle.split.clone())
    for row in rows:
        seeds = args.seeds if "config" in row else [None]
        per_fold = {seed: [] for seed in seeds}
        for f, (tile_split, bundle_split) in enumerate(splits):
            _set_split(sdata, bundle, tile_split, bundle_split)
            for seed in seeds:
                r = run_backbone(row, sdata, args) if seed is None else run_model(row, sdata, bundle, seed, args)
                per_fold[seed].append(r)
                logger.info("%s seed %s fold %d: %s", row["name"], seed, f, _brief(r["model"]))
        results[row["name"]] = [_pool_folds(runs) for runs in per_fold.values()]
        store[row["name"]] = [[r.pop("_arrays") for r in runs] for runs in per_fold.values()]
        if args.add_to is None and row is not rows[-1]:  # a partial report after every row (long runs)
            _write(args, argv, info, results, store, sdata, t_start, own_split, partial=True)
    if args.add_to is not None:
        order = [r["name"] for r in ROWS]
        raw["results"] = dict(sorted(results.items(), key=lambda kv: order.index(kv[0])))
        raw.setdefault("extra_commands", []).append(argv)
        args.add_to.write_text(json.dumps(raw, indent=1, default=float))
        save_arrays(_arrays_path(args.add_to), store)
        return _rerender(args.add_to)
    return _write(args, argv, info, results, store, sdata, t_start, own_split)


def _write(args, argv, info, results, store, sdata, t_start: float, own_split, *, partial: bool = False) -> Path:
    """Write the markdown, the JSON and the per-tile arrays of the rows run so far."""
    import sigmma_sc as sg

    tiles = sdata.tables["sigmma_tiles"]
    fold_split = tiles.obs["split"].copy()
    _set_split(sdata, None, own_split[0], None)  # the reference baseline on the section's own split
    baseline = {p: sg.metrics.mean_baseline(sdata, protocol=p, eval_split=args.eval_split) for p in ("paper", "hest")}
    tiles.obs["split"] = fold_split
    runtime = time.perf_counter() - t_start
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    tag = f"_{args.tag}" if args.tag else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"paper_table_{args.dataset}{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_arrays(_arrays_path(out), store)
    text = render(results, info, args, argv, runtime, baseline, date, store=store)
    if partial:
        text = "**Partial report: the run is still going (rows so far).**\n\n" + text
    out.write_text(text)
    raw = {
        "argv": argv,
        "date": date,
        "info": info,
        "results": results,
        "baseline": baseline,
        "runtime_seconds": runtime,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=float))
    logger.info("Wrote %s (%.1f min)", out, runtime / 60)
    if not partial:
        print(text)
    return out


def _rerender(path: Path) -> Path:
    """Markdown of a finished run from its JSON (same command-line arguments, current rendering code)."""
    raw = json.loads(Path(path).read_text())
    args = parse_args(raw["argv"])
    store = load_arrays(_arrays_path(path)) if _arrays_path(path).exists() else None
    text = render(
        raw["results"], raw["info"], args, raw["argv"], raw["runtime_seconds"], raw["baseline"], raw["date"],
        raw.get("extra_commands", ()), store=store,
    )  # fmt: skip
    out = Path(path).with_suffix(".md")
    out.write_text(text)
    print(text)
    return out


def _arrays_path(path: Path) -> Path:
    """Where a run's per-tile evaluation arrays are kept (next to its JSON)."""
    path = Path(path)
    return path.with_name(path.stem + "_tiles.npz")


def _fold_splits(sdata, bundle, args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(tile-table split names, bundle split codes)`` per fold: the section's own split, or with ``--folds K``
    fold ``f`` of ``sg.metrics.spatial_folds`` as test, fold ``f + 1`` as validation and the rest as training
    (tiles without cells: unused)."""
    import sigmma_sc as sg

    tiles = sdata.tables["sigmma_tiles"]
    if bundle.n_tiles != tiles.n_obs:
        raise SystemExit(f"The bundle has {bundle.n_tiles} tiles, the tile table {tiles.n_obs}: rebuild the cache.")
    own = (tiles.obs["split"].astype(str).to_numpy().copy(), bundle.split.clone())
    if args.folds is None:
        return [own]
    fold = sg.metrics.spatial_folds(tiles, args.folds)
    out = []
    for f in range(args.folds):
        names = np.where(fold == f, "test", np.where(fold == (f + 1) % args.folds, "val", "train")).astype(object)
        names[fold < 0] = "buffer"
        codes = {"train": 0, "val": 1, "test": 2, "buffer": 3}
        out.append((names, torch_split(np.array([codes[n] for n in names]), bundle.split)))
    return out


def torch_split(codes: np.ndarray, like):
    """``codes`` as a tensor of ``like``'s dtype and device."""
    import torch

    return torch.as_tensor(codes, dtype=like.dtype, device=like.device)


def _set_split(sdata, bundle, tile_split: np.ndarray, bundle_split) -> None:
    """Set the split of the tile table (in memory; the cache is never rewritten) and of the bundle."""
    import pandas as pd

    tiles = sdata.tables["sigmma_tiles"]
    tiles.obs["split"] = pd.Categorical(tile_split, categories=["train", "val", "test", "buffer"])
    if bundle is not None:
        bundle.split = bundle_split


def _pool_folds(runs: list[dict]) -> dict:
    """One seed's result over folds: each number weighted by the fold's evaluation tiles (one fold: as it is)."""
    if len(runs) == 1:
        return runs[0]
    out: dict = {}
    for part in runs[0]:
        if part in ("config",):
            out[part] = runs[0][part]
            continue
        if part == "curve":
            out[part] = runs[0][part]  # the first fold's curve
            continue
        if part.startswith("_"):
            continue
        w = np.array([r[part].get("n_eval", 1.0) for r in runs], dtype=float)
        out[part] = {}
        for k in runs[0][part]:
            v = np.array([r[part].get(k, np.nan) for r in runs], dtype=float)
            ok = np.isfinite(v)
            out[part][k] = float((w[ok] * v[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")
        out[part]["n_eval"] = float(w.sum())
    out["n_folds"] = len(runs)
    return out


def _brief(m: dict[str, float]) -> str:
    keys = ("paper_pcc", "paper_gene_pcc", "hest_gene_pcc", "image->st R@10%", "st->image R@10%", "train_seconds")
    return ", ".join(f"{k}={m.get(k, float('nan')):.3f}" for k in keys)


if __name__ == "__main__":
    main()
