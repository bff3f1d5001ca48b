"""Training defaults (issue 14): a sweep on validation tiles, then new defaults vs Table 3 on test tiles.

Usage::

    python benchmarks/train_defaults.py prepare --tile-size-um 96            # demo section, featurize once
    python benchmarks/train_defaults.py sweep --tile-size-um 96               # choose on validation tiles
    python benchmarks/train_defaults.py compare --tile-size-um 96 --seeds 0 1 2   # report on test tiles
    python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --seeds 0 1 2 --threads 1
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --seeds 0 1 2 \
        --only "paper (Table 3)" --micro-batch 52 --tag _width512     # Table 3 at width 512 on a 24 GiB CPU
    # the package defaults at width 512, one seed per process (2 cores: two 1-thread jobs), resumable:
    python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --hidden 512 --seeds 0 \
        --only defaults --micro-batch 26 --threads 1 --checkpoint --tag _defaults512_s0        # ... _s1, _s2
    python benchmarks/train_defaults.py merge --files benchmarks/results/train_defaults_compare_defaults512_s*_bonemarrow_128um.json \
        --name compare_defaults512
    # references without training: the initial weights of each seed, the frozen backbone
    python benchmarks/train_defaults.py compare --dataset bonemarrow --tile-size-um 128 --hidden 512 --seeds 0 1 2 \
        --only "initial weights, hidden 512 (no training)" "frozen backbone, 3 scales (no training)" --tag _references512
    # score checkpointed runs again with both probes (results written before the paper probe was added)
    python benchmarks/train_defaults.py rescore --hidden 512 --files benchmarks/results/train_defaults_compare_defaults512_s0_bonemarrow_128um.json
    # the tables of BENCHMARKS.md, from the results files (mean ± std over seeds)
    python benchmarks/train_defaults.py table --files benchmarks/results/train_defaults_compare_defaults512_bonemarrow_128um.json \
        benchmarks/results/train_defaults_compare_references512_bonemarrow_128um.json

The section is tiled, graphed and featurized once (as ``sigmma demo`` does: EfficientNet-Lite0, crops at
``--input-size`` px) and cached under ``bench_out/train_defaults/``. ``sweep`` trains each candidate setting
and scores it on the VALIDATION tiles only (retrieval R@10% both directions, HEST gene-wise PCC); ``compare``
trains the package defaults and the ``paper`` preset (Table 3) with several seeds and scores the TEST tiles,
next to references that are not trained (what the probes reach with no learning). Each run also records the
best validation loss against its chance level and how spread out the validation tiles' embeddings are, per
modality. Probes: HEST's (fixed penalty) and the paper's (penalty chosen on the validation tiles). With
``--checkpoint`` every run resumes where it stopped (a results file is rewritten after each run).

Private imports on purpose: the embedding spread is measured with the functions behind ``model.diagnostics``
(``sigmma_sc.train._diagnostics.embedding_health`` on ``sigmma_sc.train._validation.embed_tiles``).
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
OUT = ROOT / "bench_out" / "train_defaults"  # cached sections and checkpoints (--out-dir)
RESULTS = ROOT / "benchmarks" / "results"  # results files (--results-dir)
logger = logging.getLogger("train_defaults")


def _cache(args) -> Path:
    name = f"{args.dataset}_{args.tile_size_um:g}um_{args.input_size}px"
    if args.dataset == "synthetic":
        name += f"_{args.n_cells}cells"
    backbone, pretrained = getattr(args, "backbone", DEFAULT_BACKBONE), not getattr(args, "no_pretrained", False)
    if (backbone, pretrained) != (DEFAULT_BACKBONE, True):
        name += f"_{backbone}{'' if pretrained else '_random'}"
    return OUT / name


DEFAULT_BACKBONE = "efficientnet_lite0"


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
    elif args.dataset == "synthetic":  # the small test section (tests)
        sys.path.insert(0, str(ROOT / "tests"))
        from _section import make_section

        sdata = make_section(n_cells=args.n_cells, image_px=256, n_genes=30)
        image_key = next(iter(sdata.images))
    else:
        sdata, image_key = sg.datasets.demo(), "he"
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=args.tile_size_um, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    t0 = time.perf_counter()
    backbone, pretrained = getattr(args, "backbone", DEFAULT_BACKBONE), not getattr(args, "no_pretrained", False)
    sg.tl.featurize(sdata, backbone=backbone, pretrained=pretrained, input_size=args.input_size)
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
    if (backbone, pretrained) != (DEFAULT_BACKBONE, True):
        info |= {"backbone": backbone, "pretrained": pretrained}
    if args.dataset == "synthetic":
        info["n_cells"] = args.n_cells
    slim.write_h5ad(files["tiles"])
    bundle.save(files["bundle"])
    files["info"].write_text(json.dumps(info, indent=1))
    logger.info("prepared %s: %s", folder, info)
    return slim, bundle, info


def run(
    tiles, bundle, cfg: dict[str, Any], seed: int, split: str, checkpoint_dir: Path | None = None
) -> dict[str, float]:
    """Train one setting with one seed; score its embeddings on ``split`` tiles.

    With ``checkpoint_dir`` the run writes a checkpoint after every epoch and resumes from it when started again
    (a long CPU run that was stopped loses at most one epoch; ``seconds`` then counts only the last process).
    ``cfg["untrained"]``: score the initial weights of that seed without training (the level the probe and the
    retrieval reach with no learning at all).
    """
    from sigmma_sc.model import SigmmaModel

    preset = cfg.pop("preset", "default")
    untrained = cfg.pop("untrained", False)
    model = SigmmaModel.from_bundle(bundle, seed=seed, preset=preset, **(RUN_OPTIONS | cfg))
    t0 = time.perf_counter()
    resume = {"checkpoint_dir": checkpoint_dir, "resume": True} if checkpoint_dir is not None else {}
    history = [] if untrained else model.fit(bundle, seed=seed, progress=False, **resume)
    model.eval()
    seconds = time.perf_counter() - t0
    row = score(model, tiles, bundle, split)
    diag = {} if untrained else model.diagnostics
    val = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    ranks = [h["val_rank"] for h in history if h.get("val_rank") is not None]
    row |= {
        "seed": seed,
        "best_val_rank": float(min(ranks)) if ranks else float("nan"),
        "kept_step": int(history[diag["best_epoch"] - 1]["step"]) if "best_epoch" in diag else float("nan"),
        "seconds": seconds,
        "epoch_seconds": float(sum(h["seconds"] for h in history)),  # training + validation, summed over resumes
        "steps": int(history[-1]["step"]) if history else 0,
        "epochs": len(history),
        "best_val_loss": float(min(val)) if val else float("nan"),
        "val_chance": float(history[-1].get("val_chance", float("nan"))) if history else float("nan"),
        # the same over both modalities (what the results of 2026-12-03..05 called "mean_cosine_st": see rescore)
        "mean_cosine_all": float(np.mean(list(diag.get("mean_cosine", {}).values()) or [np.nan])),
        "participation_ratio_all": float(np.mean(list(diag.get("participation_ratio", {}).values()) or [np.nan])),
    }
    return row


def score(model, tiles, bundle, split: str) -> dict[str, float]:
    """Retrieval and both probes (HEST's fixed penalty; the paper's, chosen on validation tiles) on ``split``."""
    import sigmma_sc as sg

    z_img = model.encode_image(bundle)
    z_st, _ = model.encode_st(bundle)
    scored = tiles.copy()
    for s in model.scales:
        scored.obsm[f"X_sigmma_{s}_image"] = z_img[s].numpy()
        scored.obsm[f"X_sigmma_{s}_st"] = z_st[s].numpy()
    df = sg.metrics.evaluate(scored, embeddings={"all": [f"X_sigmma_{s}_image" for s in model.scales]},
                             protocols=PROTOCOLS, split=split)  # fmt: skip
    return {k: float(v) for k, v in df.loc["all"].items()} | health(model, bundle)


def health(model, bundle) -> dict[str, float]:
    """How spread out the validation tiles' embeddings are, per modality (mean over the scales), as training reports.

    ``mean_cosine_{image,st}`` (mean pairwise cosine; 1 = collapsed) and ``participation_ratio_{image,st}``
    (effective number of dimensions), on the same tiles and with the same functions as ``model.diagnostics``.
    """
    from sigmma_sc.train._diagnostics import embedding_health
    from sigmma_sc.train._validation import embed_tiles

    val = bundle.tiles_in("val").cpu()
    h = embedding_health(embed_tiles(model, bundle, val, model.config.batch_size))
    return {f"{m}_{side}": float(np.mean([v for k, v in h[m].items() if k.startswith(f"{side}_")]))
            for m in ("mean_cosine", "participation_ratio") for side in ("image", "st")}  # fmt: skip


def _legacy_spread(row: dict[str, float]) -> bool:
    """Rename the spread of a row written before 2026-12-06 (both modalities averaged under ``_st``) to ``_all``.

    Returns whether the row was such a row.
    """
    if "mean_cosine_st" not in row or "mean_cosine_image" in row or "mean_cosine_all" in row:
        return False
    for m in ("mean_cosine", "participation_ratio"):
        row[f"{m}_all"] = row.pop(f"{m}_st")
    return True


def rescore(args) -> None:
    """Score the kept weights of checkpointed runs again with both probes (rows written before the paper probe).

    For every row of the results file ``--files`` (one file) whose run has a checkpoint (``--checkpoint``), the
    best-validation weights are loaded, the recorded HEST gene-wise PCC is recomputed as a check that they are the
    scored weights, and the missing columns are added.
    """
    import torch

    from sigmma_sc.model import SigmmaModel

    (path,) = [Path(f) for f in args.files]
    payload = json.loads(path.read_text())
    info = payload["info"]
    ns = argparse.Namespace(
        dataset=info["dataset"], tile_size_um=info["tile_size_um"], input_size=info["input_size"],
        n_cells=info.get("n_cells"), backbone=info.get("backbone", DEFAULT_BACKBONE),
        no_pretrained=not info.get("pretrained", True),
    )  # fmt: skip
    tiles, bundle, _ = prepare(ns)
    name = path.stem.removeprefix("train_defaults_").removesuffix(f"_{info['dataset']}_{info['tile_size_um']:g}um")
    grid = _compare_grid(args.hidden)
    for k, runs in payload["rows"].items():
        for row in runs:
            slug = "".join(c if c.isalnum() else "_" for c in k)
            ckpt = (
                OUT
                / "checkpoints"
                / f"{name}_{info['dataset']}_{info['tile_size_um']:g}um"
                / f"{slug}_seed{row['seed']}"
            )
            if not (ckpt / "last.pt").exists():
                logger.warning("no checkpoint for %r seed %s in %s: not rescored", k, row["seed"], ckpt)
                continue
            cfg = dict(grid[k])
            preset = cfg.pop("preset", "default")
            saved = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=False)
            model = SigmmaModel.from_bundle(bundle, seed=row["seed"], preset=preset,
                                            **(cfg | {"micro_batch": saved["config"]["micro_batch"]}))  # fmt: skip
            model.load_state_dict(saved["best_state"])
            model.eval()
            new = score(model, tiles, bundle, "test")
            # inference chunks follow the free memory, so embeddings agree to float tolerance, not bit for bit
            off = max(abs(new[c] - row[c]) for c in ("hest_gene_pcc", "hest_pcc"))
            if off > 1e-3:
                raise SystemExit(f"{k} seed {row['seed']}: HEST gene PCC {new['hest_gene_pcc']} != recorded "
                                 f"{row['hest_gene_pcc']}: these are not the scored weights.")  # fmt: skip
            logger.info("%r seed %s: recorded HEST PCCs recomputed to within %.1e", k, row["seed"], off)
            if _legacy_spread(row):
                for m in ("mean_cosine", "participation_ratio"):
                    both = (new[f"{m}_image"] + new[f"{m}_st"]) / 2
                    if not np.isclose(both, row[f"{m}_all"], rtol=1e-4):
                        raise SystemExit(f"{k} seed {row['seed']}: {m} {both} != recorded {row[f'{m}_all']}.")
            row.update({c: v for c, v in new.items() if c not in row})
            logger.info("rescored %r seed %s: paper gene PCC %.3f", k, row["seed"], row.get("paper_gene_pcc"))
    payload.setdefault("rescored", []).append({"date": datetime.date.today().isoformat(), "columns": list(PROTOCOLS)})
    path.write_text(json.dumps(payload, indent=1))
    _write(name, payload["rows"], args, info)  # prints the table (and rewrites the file with this command)
    payload2 = json.loads(path.read_text())
    payload2 |= {k: payload[k] for k in ("date", "command", "environment", "rescored") if k in payload}
    payload2["rescore_command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    path.write_text(json.dumps(payload2, indent=1))


def backbone_row(tiles, split: str) -> dict[str, float]:
    """The frozen backbone's features (its three scales concatenated) under the same probe: no training at all."""
    import sigmma_sc as sg

    keys = [f"sigmma_backbone_{s}" for s in ("micro", "meso", "macro")]
    df = sg.metrics.evaluate(tiles, embeddings={"backbone": keys}, protocols=PROTOCOLS, split=split)
    return {k: float(v) for k, v in df.loc["backbone"].items()}


RUN_OPTIONS: dict[str, Any] = {}  # set from the command line, applied to every run
PROTOCOLS = ("hest", "paper")  # probes: HEST's fixed penalty, and the paper's penalty chosen on validation tiles

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


def _compare_grid(hidden: int) -> dict[str, dict[str, Any]]:
    """The package defaults (at width ``hidden``), Table 3, and references without training."""
    h = {"hidden": hidden, "out_dim": hidden}
    return {"defaults": h, "defaults, selected on the val loss": h | {"select_by": "loss"},
            "paper (Table 3)": {"preset": "paper"}, "paper, hidden 128": {"preset": "paper", "hidden": 128, "out_dim": 128},
            f"initial weights, hidden {hidden} (no training)": h | {"untrained": True},
            "frozen backbone, 3 scales (no training)": {"backbone": True}}  # fmt: skip


def _write(name: str, rows: dict[str, list[dict[str, float]]], args, info) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train_defaults_{name}_{info['dataset']}_{info['tile_size_um']:g}um.json"
    payload = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores (shared)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "info": info,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=1))
    cols = ("image->st R@10%", "st->image R@10%", "hest_gene_pcc", "paper_gene_pcc", "best_val_loss", "val_chance", "best_val_rank",
            "mean_cosine_image", "mean_cosine_st", "kept_step", "steps", "seconds")  # fmt: skip
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
            if cfg.get("backbone"):  # deterministic: scored once
                if seed == args.seeds[0]:
                    rows[k].append(backbone_row(tiles, split))
                    _write(name, {k: v for k, v in rows.items() if v}, args, info)
                continue
            ckpt = None
            if args.checkpoint:  # one folder per run, so that the same command resumes every run where it stopped
                slug = "".join(c if c.isalnum() else "_" for c in k)
                ckpt = OUT / "checkpoints" / f"{name}_{args.dataset}_{args.tile_size_um:g}um" / f"{slug}_seed{seed}"
            rows[k].append(run(tiles, bundle, dict(cfg), seed, split, ckpt))
            _write(name, {k: v for k, v in rows.items() if v}, args, info)


def merge(args) -> None:
    """One results file from several (e.g. seeds run in parallel processes, each with its own ``--tag``)."""
    payloads = [json.loads(Path(f).read_text()) for f in args.files]
    info = payloads[0]["info"]
    if any(p["info"]["split"] != info["split"] or p["info"]["dataset"] != info["dataset"] for p in payloads):
        raise SystemExit("These results are not on the same section and split; not merging them.")
    rows: dict[str, list[dict[str, float]]] = {}
    for p in payloads:
        for k, runs in p["rows"].items():
            rows.setdefault(k, []).extend(runs)
    path = _write(args.name, rows, args, info)
    payload = json.loads(path.read_text())
    payload["merged_from"] = [{"file": Path(f).name, "date": p["date"], "command": p["command"],
                               "environment": p.get("environment", {})} for f, p in zip(args.files, payloads, strict=True)]  # fmt: skip
    path.write_text(json.dumps(payload, indent=1))
    print(f"Wrote {path}")


TABLE_COLUMNS = ("image->st R@5%", "image->st R@10%", "image->st R@15%", "st->image R@10%", "hest_gene_pcc",
                 "paper_gene_pcc", "best_val_rank", "mean_cosine_image", "mean_cosine_st", "participation_ratio_image",
                 "participation_ratio_st", "kept_step", "steps")  # fmt: skip


def table(args) -> str:
    """The markdown table of BENCHMARKS.md from results files: mean ± std over seeds, one row per setting.

    Rows of the same setting in several files are pooled as seeds (e.g. seeds run as parallel jobs); a seed that
    occurs twice for one setting (e.g. files of two widths) is refused. ``--only`` picks and orders the rows. A
    column no run of a row recorded (e.g. retrieval of the frozen backbone) is shown as ``–``, one that only some
    seeds recorded says how many.
    """
    rows: dict[str, list[dict[str, float]]] = {}
    for f in args.files:
        for k, runs in json.loads(Path(f).read_text())["rows"].items():
            for r in runs:
                _legacy_spread(r)
            seeds = {r.get("seed") for r in rows.get(k, [])}
            if any(r.get("seed") is not None and r.get("seed") in seeds for r in runs):
                raise SystemExit(f"{k!r}: a seed occurs in two files (different runs of one setting?); "
                                 "make one table per run.")  # fmt: skip
            rows.setdefault(k, []).extend(runs)
    names = list(rows) if args.only is None else [k for k in args.only if k in rows]
    if missing := [k for k in (args.only or ()) if k not in rows]:
        raise SystemExit(f"No rows {missing} in {list(args.files)}; they hold {list(rows)}.")
    lines = ["| setting | " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for k in names:
        cells = []
        for c in TABLE_COLUMNS:
            v = np.array([r.get(c, np.nan) for r in rows[k]], dtype=float)
            v, nd = v[np.isfinite(v)], 0 if c in ("kept_step", "steps") else 3
            if len(v) > 1:
                cell = f"{v.mean():.{nd}f} ± {v.std(ddof=1):.{nd}f}"
            else:
                cell = f"{v[0]:.{nd}f}" if len(v) else "–"
            cells.append(cell + (f" ({len(v)} of {len(rows[k])} seeds)" if 0 < len(v) < len(rows[k]) else ""))
        n = len(rows[k])
        lines.append(f"| {k} ({n} seed{'s' if n > 1 else ''}) | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    print(out)
    return out


def main(argv=None):
    global OUT, RESULTS  # one switch (--out-dir, --results-dir) for every function of this script
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "sweep", "compare", "merge", "rescore", "table"))
    p.add_argument(
        "--dataset",
        choices=("demo", "bonemarrow", "synthetic"),
        default="demo",
        help="synthetic: the small test section of tests/_section.py (tests only)",
    )
    p.add_argument("--n-cells", type=int, default=600, help="synthetic: number of cells")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests only)")
    p.add_argument(
        "--steps", type=int, default=None, help="optimiser-step budget of every run (default: each setting's)"
    )
    p.add_argument("--out-dir", type=Path, default=OUT, help="cached sections and checkpoints")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="results files")
    p.add_argument("--tile-size-um", type=float, default=96.0)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, help="only these settings (their names in the table)")
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="GradCache micro-batch of every run (same gradients as the full batch, less memory)",
    )
    p.add_argument(
        "--checkpoint",
        action="store_true",
        help="checkpoint every run after each epoch under bench_out/ and resume it when run again",
    )
    p.add_argument("--log-epochs", action="store_true", help="log every epoch's record (training loop at DEBUG)")
    p.add_argument(
        "--files", nargs="+", default=(), help="merge, table: the results files; rescore: the one file to rescore"
    )
    p.add_argument("--name", default="compare", help="merge: the merged file's name (train_defaults_{name}_...)")
    args = p.parse_args(argv)
    OUT, RESULTS = args.out_dir, args.results_dir
    RUN_OPTIONS.clear()
    if args.steps:
        RUN_OPTIONS["steps"] = args.steps
    if args.micro_batch:
        RUN_OPTIONS["micro_batch"] = args.micro_batch
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.log_epochs:
        logging.getLogger("sigmma_sc.train._trainer").setLevel(logging.DEBUG)
    if args.command == "merge":
        return merge(args)
    if args.command == "rescore":
        return rescore(args)
    if args.command == "table":
        return table(args)
    tiles, bundle, info = prepare(args)
    if args.command == "prepare":
        print(json.dumps(info, indent=1))
        return
    if args.command == "sweep":
        grid = _sweep_grid(args.hidden)
        grid = {k: v for k, v in grid.items() if args.only is None or k in args.only}
        _run_grid("sweep" + args.tag, grid, "val", tiles, bundle, args, info)
    else:
        grid = _compare_grid(args.hidden)
        grid = {k: v for k, v in grid.items() if args.only is None or k in args.only}
        _run_grid("compare" + args.tag, grid, "test", tiles, bundle, args, info)


if __name__ == "__main__":
    main()
