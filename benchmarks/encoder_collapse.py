"""Dimensional collapse of SIGMMA's embeddings on the demo, and what stops it: scored on VALIDATION tiles (issue 25).

Usage::

    python benchmarks/encoder_collapse.py prepare                       # demo section, tiled, graphed, featurized
    python benchmarks/encoder_collapse.py run --variant base --seed 0   # one model per process
    python benchmarks/encoder_collapse.py summarize                     # table + paired CIs vs the base variant

Set-up of ``sigmma demo`` (demo section, 96 um tiles at 0.5 um/px, EfficientNet-Lite0 with ImageNet weights at
112 px crops, frozen backbone, width 128, 600-step budget, early stopping and selection on validation
retrieval), through the public API (``sg.tl.train_sigmma(..., **variant)``). Each variant changes one setting
of the training (see ``VARIANTS``). Scored on the 23 validation tiles only (the test tiles are not looked at):
participation ratio and mean pairwise cosine of the image and ST tile embeddings per scale
(``sg.metrics.embedding_collapse``), HEST-protocol gene-wise PCC of SIGMMA's image embeddings (3 scales) and
image<->ST Recall@10% (the 3 scales concatenated), each variant paired with the base variant of the same seed
(``sg.metrics.compare(split="val")``: bootstrap over the validation tiles). Caveat: the validation tiles also
chose the kept weights (retrieval), so every variant's retrieval is optimistic alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "bench_out" / "encoder_collapse"
SECTION = OUT / "demo96.zarr"

#: one setting changed at a time against ``base`` (the ``sigmma demo`` training)
VARIANTS: dict[str, dict] = {
    "base": {},
    "temp0.07": {"temperature": 0.07},
    "learned_temp": {"temperature": 0.07, "learn_temperature": True},
    "uniformity": {"uniformity": 0.1},
    "head_wd0.1": {"head_weight_decay": 0.1},
    "head_linear": {"head_layers": 1},
    "width512": {"hidden": 512, "out_dim": 512},
}
BASE = {"input_size": 112, "hidden": 128, "out_dim": 128, "steps": 600}


def prepare(args: argparse.Namespace) -> None:
    import torch

    import sigmma_sc as sg

    if args.threads:
        torch.set_num_threads(args.threads)
    sg.settings.progress_bar = False
    OUT.mkdir(parents=True, exist_ok=True)
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=96.0, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    t0 = time.perf_counter()
    sg.tl.featurize(sdata, input_size=112)
    print(f"featurized in {time.perf_counter() - t0:.0f} s")
    sdata.write(SECTION)


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import spatialdata
    import torch

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys

    if args.threads:
        torch.set_num_threads(args.threads)
    sg.settings.progress_bar = False
    sdata = spatialdata.read_zarr(SECTION)
    settings = BASE | VARIANTS[args.variant]
    t0 = time.perf_counter()
    model = sg.tl.train_sigmma(sdata, seed=args.seed, **settings)
    train_s = time.perf_counter() - t0
    sg.tl.embed(sdata, model, shifts=None)
    tiles = sdata.tables[Keys.TILE_TABLE]
    keys = {m: [Keys.embedding(Keys.PREFIX)[m][s] for s in SCALES] for m in ("image", "st")}
    health = sg.metrics.embedding_collapse(tiles, [*keys["image"], *keys["st"]], split="val")
    probe = sg.metrics.linear_probe(sdata, keys["image"], protocol="hest", eval_split="val")
    ret = sg.metrics.cross_modal_retrieval(sdata, split="val")
    OUT.mkdir(parents=True, exist_ok=True)
    emb = {k: np.asarray(tiles.obsm[k]) for k in [*keys["image"], *keys["st"]]}
    np.savez(OUT / f"{args.variant}_s{args.seed}.npz", **emb)
    d = model.diagnostics
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, 2-core shared CPU (other jobs)",
        "command": "python " + " ".join(sys.argv),
        "variant": args.variant,
        "settings": settings,
        "seed": args.seed,
        "train_s": train_s,
        "steps_run": model.history[-1]["step"] if model.history else None,
        "best_epoch": d.get("best_epoch"),
        "temperature_learned": model.temperature if hasattr(model, "temperature") else None,
        "hest_gene_pcc_val": float(np.nanmean(probe.gene_pcc)),
        "retrieval_val": json.loads(ret.to_json(orient="records")),
        "collapse_val": json.loads(health.to_json(orient="records")),
        "warnings": d.get("warnings"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encoder_collapse").mkdir(exist_ok=True)
    (RESULTS / "encoder_collapse" / f"{args.variant}_s{args.seed}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "retrieval_val"}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"prepare": prepare, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
