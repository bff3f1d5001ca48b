"""What do the edge scorers learn, and does the paper's candidate rule (all pairs in a block) beat k-nearest?

Usage::

    python benchmarks/edge_scorers.py --steps 200            # reuses benchmarks/arrangement.py's cached bundle

On the arrangement section (:func:`sigmma_sc.datasets.synthetic_arrangement`, the bundle cached by
``benchmarks/arrangement.py``), full SIGMMA is trained once with each candidate rule of stochastic edge addition:

- ``knn``: each cell's 6 nearest not-yet-linked cells of its meso block / tile (the package default);
- ``all``: every not-yet-linked pair of its meso block / tile (the paper's §3.2 rule,
  ``sigmma_sc.data._build.all_pair_edges``).

Both are compared on **validation** tiles (the choice of a default must not look at test tiles): cross-modal
retrieval R@10% (image -> ST, mean over scales of the cosine similarity) and ridge R² of the tiles' mixing score
(ridge fitted on training tiles, penalty 10 on standardised embeddings). Then :func:`sigmma_sc.model.edge_scores`
lists every scored candidate's probability ``s_uv``: its mean by the two cells' distance and by same vs different
cell type (types recovered from the node features by 2-means: the section has two types with strong markers),
with the share the evaluation threshold keeps. Results: ``benchmarks/results/edge_scorers.md`` / ``.json``.
"""

# Private imports on purpose: sigmma_sc._constants.GRID, the paper's candidate rule (data._build.all_pair_edges) and nn._edges.block_ids (what the edge scorers see, measured here).

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
logger = logging.getLogger("edge_scorers")
DIST_BINS_UM = (0, 15, 25, 40, 60, 90, 200)


def with_all_pairs(bundle):
    """The same bundle with the paper's candidate rule (every not-yet-linked pair in the meso block / tile)."""
    from scipy import sparse

    from sigmma_sc._constants import GRID
    from sigmma_sc.data._build import all_pair_edges
    from sigmma_sc.model import TrainingBundle
    from sigmma_sc.nn._edges import block_ids

    tile = bundle._cell_tile
    micro = block_ids(bundle.pos, tile, GRID["micro"]).numpy()
    meso = block_ids(bundle.pos, tile, GRID["meso"]).numpy()
    n = bundle.n_cells
    src, dst = bundle.edge_index.numpy()
    same = micro[src] == micro[dst]
    micro_edges = sparse.csr_matrix((np.ones(int(same.sum()), np.int8), (src[same], dst[same])), shape=(n, n))
    cand_meso = all_pair_edges(meso, micro_edges)
    linked = micro_edges + sparse.csr_matrix(
        (np.ones(cand_meso.shape[1], np.int8), (cand_meso[0], cand_meso[1])), shape=(n, n)
    )
    cand_macro = all_pair_edges(tile.numpy(), linked)
    return TrainingBundle(
        x=bundle.x, cell_ptr=bundle.cell_ptr, pos=bundle.pos, edge_index=bundle.edge_index, cand_meso=cand_meso,
        cand_macro=cand_macro, image_features=bundle.image_features, split=bundle.split,
        meta={**bundle.meta, "candidates": "all"},
    )  # fmt: skip


def two_means(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels 0/1 of a 2-means clustering (Lloyd, a few restarts)."""
    rng = np.random.default_rng(seed)
    best = (np.inf, None)
    for _ in range(5):
        c = x[rng.choice(x.shape[0], 2, replace=False)]
        for _ in range(50):
            lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([x[lab == k].mean(0) if (lab == k).any() else c[k] for k in range(2)])
        inertia = ((x - c[lab]) ** 2).sum()
        if inertia < best[0]:
            best = (inertia, lab)
    return best[1]


def contact_section(args, n_cells: int, cache: Path):
    """The synthetic Xenium section with the planted contact programme: bundle, cell types and contact per row."""
    import pandas as pd

    import sigmma_sc as sg
    from sigmma_sc.model import TrainingBundle

    folder = cache / f"contact_{n_cells}_{args.input_size}"
    if (folder / "bundle.pt").exists():
        extra = np.load(folder / "extra.npz")
        return TrainingBundle.load(folder / "bundle.pt"), extra
    section = folder / "xenium"
    sg.datasets.synthetic_xenium(section, n_cells=n_cells, contact_program=True, transcripts=False, overwrite=True)
    sdata = sg.io.xenium(section, he_image="auto")
    sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata)
    sg.tl.featurize(sdata, input_size=args.input_size)
    bundle, rows = sg.data.build_bundle(sdata)
    cells = sdata.tables["table"]
    truth = pd.read_parquet(section / "sigmma_truth.parquet").set_index("cell_id")
    ids = cells.obs["cell_id"].astype(str).to_numpy() if "cell_id" in cells.obs else cells.obs_names.astype(str)
    tr = truth.loc[np.asarray(ids)[rows]]
    np.savez(
        folder / "extra.npz",
        cell_type=tr["cell_type"].astype(str).to_numpy().astype("U16"),
        contact=tr["contact"].to_numpy(bool),
    )
    bundle.save(folder / "bundle.pt")
    return bundle, np.load(folder / "extra.npz")


def contact_summary(d: dict, cell_type: np.ndarray, contact: np.ndarray, tile_um: float) -> dict:
    """s_uv of tumour-T-cell pairs closer than the contact distance (15 µm) vs the other pairs at that distance."""
    dist = d["distance"] * tile_um
    a, b = cell_type[d["src"]], cell_type[d["dst"]]
    tt = ((a == "tumour") & (b == "T_cell")) | ((a == "T_cell") & (b == "tumour"))
    near = dist < 15.0
    out = {}
    for name, m in (
        ("tumour-T < 15 µm (the contacts)", tt & near),
        ("tumour-T >= 15 µm", tt & ~near),
        ("other pairs < 15 µm", ~tt & near),
        ("other pairs >= 15 µm", ~tt & ~near),
        ("pairs touching a contacted tumour cell", contact[d["src"]] | contact[d["dst"]]),
    ):
        out[name] = [float(d["prob"][m].mean()) if m.any() else float("nan"), int(m.sum())]
    return out


def main(argv=None):
    import arrangement

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", nargs="+", default=["knn", "all"], choices=["knn", "all"])
    p.add_argument("--dataset", choices=["arrangement", "contact"], default="arrangement")
    p.add_argument("--contact-cells", type=int, default=15000, help="cells of the contact section")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "edge_scorers.md")
    own, rest = p.parse_known_args(argv)
    args = arrangement.parse_args(rest)  # the section, backbone and widths of benchmarks/arrangement.py
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from sigmma_sc.model import SigmmaModel, edge_scores

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if own.dataset == "contact":
        bundle, extra = contact_section(args, own.contact_cells, args.cache_dir)
        y = None
        types = extra["cell_type"]
    else:
        bundle, extra = arrangement.prepare(args)
        y = extra["score"]
        types = two_means(bundle.x.numpy())
        ptr = bundle.cell_ptr.numpy()
        per_tile = np.array([types[ptr[t] : ptr[t + 1]].mean() for t in range(bundle.n_tiles)])
        logger.info("2-means type share per tile: %.3f-%.3f (0.5 expected)", per_tile.min(), per_tile.max())
    split = bundle.split.numpy()
    tile_um = float(bundle.meta.get("tile_size_um", 128.0))
    out: dict = {"info": {}, "rules": {}}
    for rule in own.rules:
        b = bundle if rule == "knn" else with_all_pairs(bundle)
        t1 = time.perf_counter()
        model = SigmmaModel.from_bundle(
            b, seed=own.seed, hidden=args.hidden, out_dim=args.hidden, steps=own.steps, batch_size=args.batch_size,
            patience=None,
        )  # fmt: skip
        model.fit(b, progress=False, seed=own.seed)
        train_s = time.perf_counter() - t1
        st, _ = model.encode_st(b)
        img = model.encode_image(b)
        val = split == 1
        norm = {k: np.concatenate([v[s].numpy() / np.linalg.norm(v[s].numpy(), axis=1, keepdims=True)
                                   for s in model.config.scales], 1) for k, v in (("st", st), ("img", img))}  # fmt: skip
        h = arrangement.hits_at(norm["img"][val], norm["st"][val])
        xs = np.concatenate([st[s].numpy() for s in model.config.scales], 1).astype(np.float64)
        tr = split == 0
        mu, sd = xs[tr].mean(0), xs[tr].std(0) + 1e-8
        z = (xs - mu) / sd
        yy = y if y is not None else np.zeros(len(split))
        w = np.linalg.solve(z[tr].T @ z[tr] + 10 * np.eye(z.shape[1]), z[tr].T @ (yy[tr] - yy[tr].mean()))
        r2_val = arrangement.r2(z[val] @ w + y[tr].mean(), y[val]) if y is not None else float("nan")
        res = {
            "train_seconds": train_s,
            "candidates": {"meso": int(b.cand_meso.shape[1]), "macro": int(b.cand_macro.shape[1])},
            "val_i2s_r10": float(h.mean()),
            "val_r2": r2_val,
            "history_edge_prob": {k: float(v) for k, v in model.history[-1].items() if k.startswith("edge_")},
            "scales": {},
        }
        scores = edge_scores(model, b)
        for s, d in scores.items():
            dist = d["distance"] * tile_um
            same = types[d["src"]] == types[d["dst"]]
            bins = np.digitize(dist, DIST_BINS_UM[1:-1])
            by_dist = {
                f"{DIST_BINS_UM[i]}-{DIST_BINS_UM[i + 1]} µm": [float(d["prob"][bins == i].mean()), int((bins == i).sum())]
                for i in range(len(DIST_BINS_UM) - 1) if (bins == i).any()
            }  # fmt: skip
            # AUC of s_uv for same-type vs different-type pairs (0.5: the scorer ignores the types)
            ranks = np.argsort(np.argsort(d["prob"])) + 1
            n1, n0 = int(same.sum()), int((~same).sum())
            auc = float((ranks[same].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))
            res["scales"][s] = {
                "n": int(d["prob"].size),
                "prob_mean": float(d["prob"].mean()),
                "prob_sd": float(d["prob"].std()),
                "kept_share": float(d["kept"].mean()),
                "prob_same_type": float(d["prob"][same].mean()),
                "prob_diff_type": float(d["prob"][~same].mean()),
                "auc_same_vs_diff": auc,
                "prob_by_distance": by_dist,
                "corr_prob_distance": float(np.corrcoef(d["prob"], dist)[0, 1]),
            }
            if own.dataset == "contact":
                res["scales"][s]["contact"] = contact_summary(d, types, extra["contact"], tile_um)
        out["rules"][rule] = res
        logger.info("%s: %s", rule, json.dumps(res)[:600])
    out["info"] = {
        "command": "python benchmarks/edge_scorers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {args.threads}",
        "runtime_s": time.perf_counter() - t0,
        "tiles": {k: int((split == i).sum()) for i, k in enumerate(("train", "val", "test"))},
    }
    own.out.parent.mkdir(parents=True, exist_ok=True)
    own.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Edge scorers and candidate rules on the {own.dataset} section",
        "",
        f"- Command: `{out['info']['command']}`",
        f"- Date {out['info']['date']}; {out['info']['machine']}; runtime {out['info']['runtime_s'] / 60:.1f} min",
        f"- Tiles {out['info']['tiles']}; full SIGMMA, seed {own.seed}, {own.steps} steps; validation tiles only",
        "",
        "| rule | candidates meso / macro | train s | val I→ST R@10% | val R² (mixing) |",
        "|---|---|---|---|---|",
    ]
    for rule, r in out["rules"].items():
        c = r["candidates"]
        lines.append(
            f"| {rule} | {c['meso']} / {c['macro']} | {r['train_seconds']:.0f} | {r['val_i2s_r10']:.3f} | "
            f"{r['val_r2']:.3f} |"
        )
    lines += ["", "| rule | scale | mean s_uv (sd) | kept at eval | same type | different type | AUC same vs diff | "
              "corr(s_uv, distance) | s_uv by distance (n) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for rule, r in out["rules"].items():
        for s, d in r["scales"].items():
            dist = "; ".join(f"{k}: {v[0]:.3f} ({v[1]})" for k, v in d["prob_by_distance"].items())
            lines.append(
                f"| {rule} | {s} | {d['prob_mean']:.3f} ({d['prob_sd']:.3f}) | {d['kept_share']:.2f} | "
                f"{d['prob_same_type']:.3f} | {d['prob_diff_type']:.3f} | {d['auc_same_vs_diff']:.3f} | "
                f"{d['corr_prob_distance']:+.3f} | {dist} |"
            )
    if own.dataset == "contact":
        lines += ["", "Planted contact programme: mean s_uv (n pairs)", ""]
        lines += [
            "| rule | scale | " + " | ".join(next(iter(out["rules"].values()))["scales"]["meso"]["contact"]) + " |"
        ]
        lines += ["|---|---|" + "---|" * 5]
        for rule, r in out["rules"].items():
            for s, d in r["scales"].items():
                lines.append(
                    f"| {rule} | {s} | " + " | ".join(f"{v[0]:.3f} ({v[1]})" for v in d["contact"].values()) + " |"
                )
    own.out.write_text("\n".join(lines) + "\n")
    logger.info("Wrote %s", own.out)
    return own.out


if __name__ == "__main__":
    main()
