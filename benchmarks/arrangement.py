"""Does the cell graph carry arrangement? Full SIGMMA vs no-graph vs no-edges on a section where only arrangement differs.

Usage::

    python benchmarks/arrangement.py --seeds 0 1 2          # ~16 x 16 tiles of 128 µm, CPU widths

The section is :func:`sigmma_sc.datasets.synthetic_arrangement`: every tile holds the same number of cells, half
tumour and half T cells, with expression drawn from the type alone; tiles differ only in how the two types are
arranged (segregated patches to random intermixing), which the H&E shows. Each row trains on the same bundle and
spatial split; its ST tile embeddings (all its scales, concatenated) are scored on held-out test tiles by

- ridge R² of the tile's mixing score (ridge fitted on training tiles, penalty chosen on validation tiles);
- cross-modal retrieval R@10% (image -> ST) among the test tiles, which all have the same composition.

Paired bootstrap over test tiles (the same resampled tiles for every row and seed; the difference averaged over
seeds) gives 95% CIs of the differences between rows. References on the same split: the mean node features of the
tile (what a mean pool sees) and the frozen backbone's image features. Results go to
``benchmarks/results/arrangement.md`` and ``.json``.
"""

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import common_args  # noqa: E402

SCALES = ("micro", "meso", "macro")
logger = logging.getLogger("arrangement")

ROWS = {
    "sigmma": ("Full SIGMMA", {}),
    "graph_multiscale": ("Cell graph + multi-scale (no edge addition)", {"edge_addition": False}),
    "rewired": ("Control: full SIGMMA, edges rewired inside their blocks (degrees kept)", {"edges": "rewired"}),
    "rewired_tile": ("Control: full SIGMMA, edges rewired across the whole tile (degrees kept)", {"edges": "rewired_tile"}),
    "no_edges": ("Control: same GNN and pooling, no edges", {"edge_addition": False, "edges": "none"}),
    "no_graph": ("No graph, multi-scale (MLP of the mean node features)", {"use_graph": False, "edge_addition": False}),
    "sigmma_expected": ("Full SIGMMA, edge_evaluation='expected'", {"edge_evaluation": "expected"}),
    "sigmma_untrained": ("Reference: full SIGMMA at initialisation (no training)", {}),
    "no_edges_untrained": ("Reference: no-edges control at initialisation", {"edge_addition": False, "edges": "none"}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-tiles-side", type=int, default=16)
    p.add_argument("--cells-per-tile", type=int, default=100)
    p.add_argument("--input-size", type=int, default=112, help="backbone input size (crops are resized to it)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--n-comps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--rows",
        nargs="+",
        default=[r for r in ROWS if "untrained" not in r and r != "sigmma_expected"],
        choices=list(ROWS),
    )
    common_args(p, seeds=(0,), threads=2)
    p.add_argument("--section-seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "bench_out" / "arrangement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "arrangement.md")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace):
    """The featurized section's bundle and each tile's mixing score (cached)."""
    import sigmma_sc as sg
    from sigmma_sc.model import TrainingBundle

    key = (
        f"n{args.n_tiles_side}_c{args.cells_per_tile}_s{args.section_seed}_{args.backbone}_{args.input_size}"
        f"_pc{args.n_comps}{'_rand' if args.no_pretrained else ''}"
    )
    folder = args.cache_dir / key
    if (folder / "bundle.pt").exists():
        return TrainingBundle.load(folder / "bundle.pt"), np.load(folder / "extra.npz")
    folder.mkdir(parents=True, exist_ok=True)
    sdata = sg.datasets.synthetic_arrangement(
        n_tiles_side=args.n_tiles_side, cells_per_tile=args.cells_per_tile, seed=args.section_seed
    )
    sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata, n_comps=args.n_comps)
    sg.tl.featurize(sdata, backbone=args.backbone, pretrained=not args.no_pretrained, input_size=args.input_size)
    bundle, rows = sg.data.build_bundle(sdata)
    cells = sdata.tables["table"]
    tiles = sdata.tables["sigmma_tiles"]
    tile_of = cells.obs["sigmma_tile"].to_numpy()
    ok = tile_of >= 0
    score_cells = cells.obs["mixing_score"].to_numpy()
    score = np.bincount(tile_of[ok], weights=score_cells[ok], minlength=tiles.n_obs) / np.maximum(
        np.bincount(tile_of[ok], minlength=tiles.n_obs), 1
    )
    x = bundle.x.numpy()
    ptr = bundle.cell_ptr.numpy()
    mean_x = np.stack([x[ptr[t] : ptr[t + 1]].mean(0) for t in range(bundle.n_tiles)])
    backbone = np.concatenate([tiles.obsm[f"sigmma_backbone_{s}"] for s in SCALES], 1)
    np.savez(folder / "extra.npz", score=score, mean_x=mean_x, backbone=backbone)
    bundle.save(folder / "bundle.pt")
    return bundle, np.load(folder / "extra.npz")


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-8
    return [(a - mu) / sd for a in (train, *others)]


def ridge_predict(x: np.ndarray, y: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge fitted on training tiles with the penalty chosen on validation tiles; predictions for every tile."""
    tr, va = split == 0, split == 1
    xtr, xall = _standardise(x[tr], x)
    ymu = y[tr].mean()
    best = (np.inf, None, None)
    for alpha in 10.0 ** np.arange(-2, 5):
        a = xtr.T @ xtr + alpha * np.eye(x.shape[1])
        w = np.linalg.solve(a, xtr.T @ (y[tr] - ymu))
        pred = xall @ w + ymu
        mse = float(np.mean((pred[va] - y[va]) ** 2))
        if mse < best[0]:
            best = (mse, pred, alpha)
    return best[1], float(best[2])


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    return float(1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2))


def hits_at(query: np.ndarray, target: np.ndarray, p: float = 0.10) -> np.ndarray:
    """Per query: 1 when its partner is among the top floor(p N) targets by cosine similarity (ties: expected)."""
    q = query / (np.linalg.norm(query, axis=1, keepdims=True) + 1e-12)
    t = target / (np.linalg.norm(target, axis=1, keepdims=True) + 1e-12)
    sim = q @ t.T
    own = np.diag(sim)[:, None]
    k = max(1, int(np.floor(p * q.shape[0])))
    better = (sim > own + 1e-9).sum(1)
    ties = (np.abs(sim - own) <= 1e-9).sum(1) - 1
    return np.clip((k - better) / (ties + 1), 0, 1)


def embed_row(bundle, name: str, seed: int, args: argparse.Namespace) -> dict:
    from sigmma_sc.model import SigmmaModel

    cfg = dict(
        hidden=args.hidden, out_dim=args.hidden, steps=args.steps, batch_size=args.batch_size, patience=None,
        **ROWS[name][1],
    )  # fmt: skip
    t0 = time.perf_counter()
    model = SigmmaModel.from_bundle(bundle, seed=seed, **cfg)
    if not name.endswith("_untrained"):
        model.fit(bundle, progress=False, seed=seed)
    st, _ = model.encode_st(bundle)
    img = model.encode_image(bundle)
    st = {s: v.cpu().numpy() for s, v in st.items()}
    img = {s: v.cpu().numpy() for s, v in img.items()}
    hist = model.history
    edge = {k: v for k, v in (hist[-1] if hist else {}).items() if k.startswith("edge_prob")}
    return {
        "st": np.concatenate([st[s] for s in model.config.scales], 1),
        "st_norm": np.concatenate(
            [st[s] / np.linalg.norm(st[s], axis=1, keepdims=True) for s in model.config.scales], 1
        ),
        "img_norm": np.concatenate(
            [img[s] / np.linalg.norm(img[s], axis=1, keepdims=True) for s in model.config.scales], 1
        ),
        "seconds": time.perf_counter() - t0,
        "steps": len(hist),
        "edge": {k: float(v) for k, v in edge.items()},
    }


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    bundle, extra = prepare(args)
    y = extra["score"]
    split = bundle.split.numpy()
    test = split == 2
    logger.info("tiles train/val/test = %s", np.bincount(split, minlength=3).tolist())
    results: dict[str, list[dict]] = {}
    preds: dict[str, list[np.ndarray]] = {}
    hits: dict[str, list[np.ndarray]] = {}
    for ref, x in (("ref_mean_features", extra["mean_x"]), ("ref_backbone", extra["backbone"])):
        pred, alpha = ridge_predict(np.asarray(x, dtype=np.float64), y, split)
        preds[ref] = [pred[test]]
        results[ref] = [{"r2": r2(pred[test], y[test]), "alpha": alpha}]
    for name in args.rows:
        results[name], preds[name], hits[name] = [], [], []
        for seed in args.seeds:
            out = embed_row(bundle, name, seed, args)
            pred, alpha = ridge_predict(out["st"].astype(np.float64), y, split)
            h = hits_at(out["img_norm"][test], out["st_norm"][test])
            preds[name].append(pred[test])
            hits[name].append(h)
            results[name].append(
                {"seed": seed, "r2": r2(pred[test], y[test]), "alpha": alpha, "i2s_r10": float(h.mean()),
                 "seconds": out["seconds"], "steps": out["steps"], "edge": out["edge"]}
            )  # fmt: skip
            logger.info("%s seed %d: %s", name, seed, results[name][-1])
        _report(args, argv, results, preds, hits, y, split, t_start, done=list(results))
    return args.out


def _report(args, argv, results, preds, hits, y, split, t_start, done) -> None:
    """Paired comparisons of the rows run so far; write the JSON and the markdown (after every row)."""
    test = split == 2

    # paired bootstrap over test tiles: the same resamples for every row and seed
    rng = np.random.default_rng(0)
    yt = y[test]
    idx = rng.integers(0, yt.size, (args.n_boot, yt.size))

    def boot_r2(name: str) -> np.ndarray:
        out = []
        for p in preds[name]:
            e = ((p[idx] - yt[idx]) ** 2).sum(1)
            tot = ((yt[idx] - yt[idx].mean(1, keepdims=True)) ** 2).sum(1)
            out.append(1 - e / tot)
        return np.mean(out, 0)

    def boot_hits(name: str) -> np.ndarray:
        return np.mean([h[idx].mean(1) for h in hits[name]], 0)

    comparisons = []
    names = [n for n in args.rows if n in done]
    for a, b in [(x, z) for i, x in enumerate(names) for z in names[i + 1 :]] + [
        (x, "ref_mean_features") for x in names
    ]:
        d = boot_r2(a) - boot_r2(b)
        row = {"a": a, "b": b, "d_r2": [float(np.mean([r["r2"] for r in results[a]]) - np.mean([r["r2"] for r in results[b]])),
                                         *np.nanpercentile(d, [2.5, 97.5]).tolist()]}  # fmt: skip
        if a in hits and b in hits:
            dh = boot_hits(a) - boot_hits(b)
            mean_d = float(np.mean([h.mean() for h in hits[a]]) - np.mean([h.mean() for h in hits[b]]))
            row["d_r10"] = [mean_d, *np.nanpercentile(dh, [2.5, 97.5]).tolist()]
        comparisons.append(row)
    info = {
        "command": "python benchmarks/arrangement.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {args.threads}",
        "runtime_s": time.perf_counter() - t_start,
        "n_tiles": {"train": int((split == 0).sum()), "val": int((split == 1).sum()), "test": int(test.sum())},
        "score_test": {"mean": float(yt.mean()), "sd": float(yt.std()), "min": float(yt.min()), "max": float(yt.max())},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"info": info, "results": results, "comparisons": comparisons}, indent=1)
    )
    partial = [n for n in args.rows if n not in done]
    text = render(info, results, comparisons)
    if partial:
        text = f"**Partial report: rows {partial} still to run.**\n\n" + text
    args.out.write_text(text)
    logger.info("Wrote %s", args.out)


def render(info: dict, results: dict, comparisons: list) -> str:
    def ms(vals: list[float]) -> str:
        vals = [v for v in vals if v is not None]
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = [
        "# Arrangement section: which ST embedding recovers the arrangement?",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}; machine: {info['machine']}; runtime {info['runtime_s'] / 60:.1f} min",
        f"- Tiles train/val/test: {info['n_tiles']}; test mixing score {info['score_test']}",
        "",
        "| row | test R² of the mixing score | I→ST R@10% (test) | seeds |",
        "|---|---|---|---|",
    ]
    labels = {k: v[0] for k, v in ROWS.items()} | {
        "ref_mean_features": "Reference: ridge on the tile's mean node features (what a mean pool sees)",
        "ref_backbone": "Reference: ridge on the frozen backbone's image features (3 scales)",
    }
    for name, res in results.items():
        r10 = ms([r["i2s_r10"] for r in res]) if "i2s_r10" in res[0] else "-"
        lines.append(f"| {labels[name]} | {ms([r['r2'] for r in res])} | {r10} | {len(res)} |")
    lines += ["", "Paired bootstrap (test tiles, 95% CI; differences averaged over seeds):", ""]
    lines += ["| a - b | ΔR² [95% CI] | ΔR@10% [95% CI] |", "|---|---|---|"]
    for c in comparisons:
        d = c["d_r2"]
        h = c.get("d_r10")
        hs = f"{h[0]:+.3f} [{h[1]:+.3f}, {h[2]:+.3f}]" if h else "-"
        lines.append(f"| {c['a']} - {c['b']} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {hs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
