"""Training defaults (issue 14): a sweep on validation tiles, then new defaults vs Table 3 on test tiles.

Usage::

    python benchmarks/train_defaults.py prepare --tile-size-um 96            # demo section, featurize once
    python benchmarks/train_defaults.py sweep --tile-size-um 96               # choose on validation tiles
    python benchmarks/train_defaults.py compare --tile-size-um 96 --seeds 0 1 2   # report on test tiles
    python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --seeds 0 1 2 --threads 1
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --seeds 0 1 2 \
        --only "paper (Table 3)" --micro-batch 52 --tag _width512     # Table 3 at width 512 on a 24 GiB CPU

The section is tiled, graphed and featurized once (as ``sigmma demo`` does: EfficientNet-Lite0, crops at
``--input-size`` px) and cached under ``bench_out/train_defaults/``. ``sweep`` trains each candidate setting
and scores it on the VALIDATION tiles only (retrieval R@10% both directions, HEST gene-wise PCC); ``compare``
trains the package defaults and the ``paper`` preset (Table 3) with several seeds and scores the TEST tiles.
Each run also records the best validation loss against its chance level and the embedding-collapse
diagnostics the training loop computes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_out" / "train_defaults"
logger = logging.getLogger("train_defaults")


def _cache(args) -> Path:
    name = f"{args.dataset}_{args.tile_size_um:g}um_{args.input_size}px"
    return OUT / name


def prepare(args):
    """``(tile table, bundle, info)``, featurized once and cached."""
    import anndata as ad
    import pandas as pd

    import sigmma_sc as sg
    from sigmma_sc.model import TrainingBundle

    folder = _cache(args)
    files = {"tiles": folder / "tiles.h5ad", "bundle": folder / "bundle.pt", "info": folder / "info.json"}
    if all(f.exists() for f in files.values()):
        return ad.read_h5ad(files["tiles"]), TrainingBundle.load(files["bundle"]), json.loads(files["info"].read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if args.dataset == "bonemarrow":
        from _bonemarrow import load_bonemarrow  # ../shared/data/xenium-bonemarrow

        sdata, image_key = load_bonemarrow(), "dapi"
    else:
        sdata, image_key = sg.datasets.demo(), "he"
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=args.tile_size_um, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    t0 = time.perf_counter()
    sg.tl.featurize(sdata, input_size=args.input_size)
    t_feat = time.perf_counter() - t0
    bundle, _ = sg.data.build_bundle(sdata)
    tiles = sdata.tables["sigmma_tiles"]
    slim = ad.AnnData(X=tiles.X, obs=tiles.obs.copy(), var=pd.DataFrame(index=tiles.var_names.copy()))
    for k, v in tiles.obsm.items():
        slim.obsm[k] = np.asarray(v)
    info = {
        "dataset": args.dataset,
        "n_tiles": int(tiles.n_obs),
        "split": {k: int(v) for k, v in tiles.obs["split"].value_counts().items()},
        "tile_size_um": args.tile_size_um,
        "input_size": args.input_size,
        "featurize_seconds": round(t_feat, 1),
    }
    slim.write_h5ad(files["tiles"])
    bundle.save(files["bundle"])
    files["info"].write_text(json.dumps(info, indent=1))
    logger.info("prepared %s: %s", folder, info)
    return slim, bundle, info


def run(tiles, bundle, cfg: dict[str, Any], seed: int, split: str) -> dict[str, float]:
    """Train one setting with one seed; score its embeddings on ``split`` tiles."""
    import sigmma_sc as sg
    from sigmma_sc.model import SigmmaModel

    preset = cfg.pop("preset", "default")
    model = SigmmaModel.from_bundle(bundle, seed=seed, preset=preset, **(RUN_OPTIONS | cfg))
    t0 = time.perf_counter()
    history = model.fit(bundle, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    z_img = model.encode_image(bundle)
    z_st, _ = model.encode_st(bundle)
    scored = tiles.copy()
    for s in model.scales:
        scored.obsm[f"X_sigmma_{s}_image"] = z_img[s].numpy()
        scored.obsm[f"X_sigmma_{s}_st"] = z_st[s].numpy()
    df = sg.metrics.evaluate(scored, embeddings={"all": [f"X_sigmma_{s}_image" for s in model.scales]},
                             protocols=("hest",), split=split)  # fmt: skip
    row = {k: float(v) for k, v in df.loc["all"].items()}
    diag = model.diagnostics
    val = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    ranks = [h["val_rank"] for h in history if h.get("val_rank") is not None]
    row |= {
        "best_val_rank": float(min(ranks)) if ranks else float("nan"),
        "kept_step": int(history[diag["best_epoch"] - 1]["step"]) if "best_epoch" in diag else float("nan"),
        "seconds": seconds,
        "steps": int(history[-1]["step"]) if history else 0,
        "epochs": len(history),
        "best_val_loss": float(min(val)) if val else float("nan"),
        "val_chance": float(history[-1].get("val_chance", float("nan"))) if history else float("nan"),
        "mean_cosine_st": float(np.mean(list(diag.get("mean_cosine", {}).values()) or [np.nan])),
        "participation_ratio_st": float(np.mean(list(diag.get("participation_ratio", {}).values()) or [np.nan])),
    }
    return row


RUN_OPTIONS: dict[str, Any] = {}  # set from the command line, applied to every run

SWEEP: dict[str, dict[str, Any]] = {
    "paper (Table 3)": {"preset": "paper"},
    "paper, hidden 128": {"preset": "paper", "hidden": 128, "out_dim": 128},
}


def _sweep_grid(hidden: int) -> dict[str, dict[str, Any]]:
    """Table 3, the defaults, and one change from the defaults at a time."""
    h = {"hidden": hidden, "out_dim": hidden}
    grid = dict(SWEEP)
    grid["defaults"] = dict(h)
    for name, change in (
        ("lr 3e-4", {"lr": 3e-4}), ("lr 3e-3", {"lr": 3e-3}),
        ("batch 16", {"batch_size": 16}), ("batch 64 (max_batch_fraction 0.5)", {"batch_size": 64, "max_batch_fraction": 0.5}),
        ("temperature 0.05", {"temperature": 0.05}), ("temperature 0.1", {"temperature": 0.1}),
        ("dropout 0.3", {"dropout": 0.3}), ("weight decay 0.05", {"weight_decay": 0.05}),
        ("patience 150", {"patience": 150}), ("selected on the val loss", {"select_by": "loss"}),
    ):  # fmt: skip
        grid[name] = h | change
    return grid


def _write(name: str, rows: dict[str, list[dict[str, float]]], args, info) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = ROOT / "benchmarks" / "results" / f"train_defaults_{name}_{args.dataset}_{args.tile_size_um:g}um.json"
    payload = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores (shared)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "info": info,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=1))
    cols = ("image->st R@10%", "st->image R@10%", "hest_gene_pcc", "best_val_loss", "val_chance", "best_val_rank",
            "mean_cosine_st", "kept_step", "steps", "seconds")  # fmt: skip
    print(f"\n{name} on {info['dataset']} ({info['split']}):")
    print("| setting | " + " | ".join(cols) + " |")
    for k, runs in rows.items():
        cells = []
        for c in cols:
            v = np.array([r.get(c, np.nan) for r in runs], dtype=float)
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    return path


def _run_grid(name, grid, split, tiles, bundle, args, info) -> None:
    """Seed by seed, every setting, the results file rewritten after each run (a stopped run keeps its rows)."""
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in grid}
    for seed in args.seeds:
        for k, cfg in grid.items():
            rows[k].append(run(tiles, bundle, dict(cfg), seed, split))
            _write(name, {k: v for k, v in rows.items() if v}, args, info)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "sweep", "compare"))
    p.add_argument("--dataset", choices=("demo", "bonemarrow"), default="demo")
    p.add_argument("--tile-size-um", type=float, default=96.0)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, help="only these settings (their names in the table)")
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="GradCache micro-batch of every run (same gradients as the full batch, less memory)")
    args = p.parse_args(argv)
    if args.micro_batch:
        RUN_OPTIONS["micro_batch"] = args.micro_batch
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tiles, bundle, info = prepare(args)
    if args.command == "prepare":
        print(json.dumps(info, indent=1))
        return
    if args.command == "sweep":
        grid = _sweep_grid(args.hidden)
        grid = {k: v for k, v in grid.items() if args.only is None or k in args.only}
        _run_grid("sweep" + args.tag, grid, "val", tiles, bundle, args, info)
    else:
        h = {"hidden": args.hidden, "out_dim": args.hidden}
        grid = {"defaults": h, "defaults, selected on the val loss": h | {"select_by": "loss"},
                "paper (Table 3)": {"preset": "paper"}, "paper, hidden 128": {"preset": "paper"} | h}  # fmt: skip
        grid = {k: v for k, v in grid.items() if args.only is None or k in args.only}
        _run_grid("compare" + args.tag, grid, "test", tiles, bundle, args, info)


if __name__ == "__main__":
    main()
