"""Frozen vs fine-tuned SIGMMA on the demo section, scored on VALIDATION tiles (issue 25, a first look).

Usage::

    python benchmarks/finetune_demo.py run --blocks 0 --seed 0     # one model per process (blocks 0 = frozen)
    python benchmarks/finetune_demo.py summarize                   # table of the runs in benchmarks/results/

Set-up of ``sigmma demo``: demo section, 96 um tiles at 0.5 um/px, EfficientNet-Lite0 (ImageNet weights) at 112 px
crops, width 128, the package's default training (600-step budget, early stopping, kept by validation retrieval),
through the public API (``sg.tl.train_sigmma(..., finetune_blocks=k)``: the cached fine-tuning path). Scores on the
validation tiles only (the test tiles are not looked at): the HEST linear probe's gene-wise PCC of SIGMMA's image
embeddings (3 scales concatenated), of the frozen backbone's features and, fine-tuned, of the fine-tuned encoder's
pooled features; image<->ST retrieval (Recall@10% of the 3 scales), mean pairwise cosine and participation ratio of
the validation embeddings (``model.diagnostics``). The per-gene PCCs are kept for paired comparisons. Caveat: the
validation tiles also chose the kept weights (retrieval) and the probe's penalty, so their retrieval is optimistic.
"""

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md) and tl._probe_features.encoder_features (the fine-tuned encoder's features compared here).

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(args: argparse.Namespace) -> None:
    import torch

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.tl._probe_features import encoder_features

    if args.threads:
        torch.set_num_threads(args.threads)
    sg.settings.progress_bar = False
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=96.0, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    sg.tl.featurize(sdata, input_size=112)
    t0 = time.perf_counter()
    extra = {"finetune_blocks": args.blocks} if args.blocks else {}
    model = sg.tl.train_sigmma(sdata, input_size=112, hidden=128, out_dim=128, steps=args.steps, seed=args.seed,
                               **extra)  # fmt: skip
    train_s = time.perf_counter() - t0
    sg.tl.embed(sdata, model)
    tiles = sdata.tables[Keys.TILE_TABLE]
    rows = {"sigmma": [Keys.embedding()["image"][s] for s in SCALES],
            "backbone": [Keys.BACKBONE.format(scale=s) for s in SCALES]}  # fmt: skip
    if args.blocks:
        for k, v in encoder_features(sdata, model).items():
            tiles.obsm[k] = v
        rows["encoder"] = [f"X_sigmma_{s}_encoder" for s in SCALES]
    probes = {}
    for name, keys in rows.items():
        p = sg.metrics.linear_probe(sdata, keys, protocol="hest", eval_split="val")
        probes[name] = {"gene_pcc": float(np.nanmean(p.gene_pcc)), "gene_pcc_per_gene": p.gene_pcc.tolist(),
                        "genes": list(p.genes), "n_val": int(p.y_true.shape[0])}  # fmt: skip
    ret = sg.metrics.cross_modal_retrieval(sdata, split="val")
    ret = ret[ret["scale"] == "all"] if "scale" in ret else ret
    d = model.diagnostics
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, 2-core shared CPU (other jobs)",
        "command": "python " + " ".join(sys.argv),
        "blocks": args.blocks,
        "seed": args.seed,
        "train_s": train_s,
        "steps_run": d.get("steps"),
        "best_epoch": d.get("best_epoch"),
        "probes_val_hest": probes,
        "retrieval_val": json.loads(ret.to_json(orient="records")),
        "mean_cosine": d.get("mean_cosine"),
        "participation_ratio": d.get("participation_ratio"),
        "warnings": d.get("warnings"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"finetune_demo_b{args.blocks}_s{args.seed}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k not in ("probes_val_hest",)}, indent=1, default=str))
    print({k: round(v["gene_pcc"], 4) for k, v in probes.items()})


def summarize(_: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("finetune_demo_b*_s*.json"))]
    for r in runs:
        pr = r["participation_ratio"] or {}
        rec = {f"{x['direction']} R@10%": x.get("R@10%") for x in r["retrieval_val"]}
        print(f"blocks={r['blocks']} seed={r['seed']} train {r['train_s']:.0f}s steps {r['steps_run']}: "
              + ", ".join(f"{k} gene PCC {v['gene_pcc']:.3f}" for k, v in r["probes_val_hest"].items())
              + f"; {rec}; participation ratio image macro {pr.get('image_macro')}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--blocks", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--threads", type=int, default=0)
    sub.add_parser("summarize")
    args = p.parse_args()
    {"run": run, "summarize": summarize}[args.cmd](args)


if __name__ == "__main__":
    main()
