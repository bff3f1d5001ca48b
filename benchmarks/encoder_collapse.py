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

# Private imports on purpose: sigmma_sc._constants (key names, docs/keys.md) and data._build.build_bundle (the bundle the collapse options train on).

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


def _name(variant: str, seed: int) -> str:
    return f"{variant.replace('.', 'p')}_s{seed}"


def _load_runs(tiles, variants) -> dict[tuple[str, int], str]:
    """Put every finished run's tile embeddings into ``tiles.obsm`` under ``X_{variant}_s{seed}_{scale}_{kind}``."""
    import numpy as np

    from sigmma_sc._constants import SCALES

    found = {}
    for variant in variants:
        for path in sorted(OUT.glob(f"{variant}_s*.npz")):
            seed = int(path.stem.rsplit("_s", 1)[1])
            z = np.load(path)
            name = _name(variant, seed)
            for s in SCALES:
                for kind in ("image", "st"):
                    tiles.obsm[f"X_{name}_{s}_{kind}"] = z[f"X_sigmma_{s}_{kind}"]
            found[(variant, seed)] = name
    return found


def _image_keys(name: str) -> list[str]:
    from sigmma_sc._constants import SCALES

    return [f"X_{name}_{s}_image" for s in SCALES]


METRICS = ("hest_gene_pcc", "paper_gene_pcc", "image->st R@10%", "st->image R@10%")


def _compare_rows(sg, tiles, a_name, b_name, split, a_keys=None, b_keys=None, n_boot=2000) -> list[dict]:
    df = sg.metrics.compare(
        tiles, a=a_keys or _image_keys(a_name), b=b_keys or _image_keys(b_name), split=split, n_boot=n_boot,
        use_rep=[n for n in (a_name, b_name) if n], protocols=("paper", "hest"),
    )  # fmt: skip
    df = df[df["metric"].isin(METRICS)]
    return json.loads(df.drop(columns=["tiles"]).to_json(orient="records"))


def summarize(args: argparse.Namespace) -> None:
    """Validation table of the variants (mean over seeds) and the paired difference of each vs ``base`` per seed."""
    import anndata as ad
    import numpy as np

    import sigmma_sc as sg

    tiles = ad.read_zarr(SECTION / "tables" / "sigmma_tiles")
    runs = _load_runs(tiles, VARIANTS)
    res = {json.loads(p.read_text())["variant"] + f"_s{json.loads(p.read_text())['seed']}": json.loads(p.read_text())
           for p in (RESULTS / "encoder_collapse").glob("*_s*.json")}  # fmt: skip
    table, pairs = [], []
    for variant in VARIANTS:
        seeds = sorted(s for v, s in runs if v == variant)
        if not seeds:
            continue
        recs = [res[f"{variant}_s{s}"] for s in seeds if f"{variant}_s{s}" in res]
        col = {c["key"]: c for r in recs for c in r["collapse_val"]}
        by = {}
        for r in recs:
            for c in r["collapse_val"]:
                by.setdefault(c["key"], []).append((c["participation_ratio"], c["mean_cosine"]))
        row = {"variant": variant, "seeds": seeds, "train_s": [round(r["train_s"]) for r in recs],
               "steps": [r["steps_run"] for r in recs], "temperature": [r["temperature_learned"] for r in recs]}  # fmt: skip
        for key, vals in by.items():
            row[f"PR {key}"] = float(np.mean([v[0] for v in vals]))
            row[f"cos {key}"] = float(np.mean([v[1] for v in vals]))
        row["hest_gene_pcc_val"] = float(np.mean([r["hest_gene_pcc_val"] for r in recs]))
        table.append(row)
        del col
        if variant != "base":
            for s in seeds:
                if ("base", s) in runs:
                    for rec in _compare_rows(sg, tiles, runs[(variant, s)], runs[("base", s)], "val"):
                        pairs.append({"variant": variant, "seed": s} | rec)
    # the inputs' own spread on the same tiles: the backbone features and the tiles' log expression
    x = tiles.X.toarray() if hasattr(tiles.X, "toarray") else np.asarray(tiles.X)
    tiles.obsm["log_expression"] = np.log1p(x)
    inputs = sg.metrics.embedding_collapse(
        tiles, [f"sigmma_backbone_{s}" for s in ("micro", "meso", "macro")] + ["log_expression"], split="val"
    )
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "split": "val",
           "command": "python " + " ".join(sys.argv), "table": table, "paired_vs_base": pairs,
           "inputs_val": json.loads(inputs.to_json(orient="records"))}  # fmt: skip
    (RESULTS / "encoder_collapse.json").write_text(json.dumps(out, indent=1))
    for row in table:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    for p in pairs:
        print(p["variant"], p["seed"], p["metric"], f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]")


def heldout(args: argparse.Namespace) -> None:
    """Test-tile table: frozen backbone, untrained model, SIGMMA frozen (``base``) and ``--variants``, paired CIs."""
    import numpy as np
    import spatialdata
    import torch

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.data._build import build_bundle
    from sigmma_sc.model import SigmmaModel

    torch.set_num_threads(args.threads)
    sg.settings.progress_bar = False
    sdata = spatialdata.read_zarr(SECTION)
    tiles = sdata.tables[Keys.TILE_TABLE]
    runs = _load_runs(tiles, ["base", *args.variants])
    bundle, _ = build_bundle(sdata)
    backbone = [Keys.BACKBONE.format(scale=s) for s in SCALES]
    rows = []
    for seed in sorted({s for _, s in runs if args.seeds is None or s in args.seeds}):
        name = f"untrained_s{seed}"  # the initial weights of the seed (no training)
        model = SigmmaModel.from_bundle(bundle, seed=seed, hidden=BASE["hidden"], out_dim=BASE["out_dim"])
        sg.tl.embed(sdata, model, shifts=None, key_added=name)
        models = {"untrained": name} | {v: runs[(v, seed)] for v in ["base", *args.variants] if (v, seed) in runs}
        for label, run_name in models.items():
            for rec in _compare_rows(sg, tiles, run_name, None, "test", b_keys=backbone):
                rows.append({"model": label, "seed": seed, "vs": "backbone"} | rec)
            if label != "base" and "base" in models:
                for rec in _compare_rows(sg, tiles, run_name, models["base"], "test"):
                    rows.append({"model": label, "seed": seed, "vs": "base"} | rec)
    # how many directions each embedding uses on the test tiles, next to its inputs' (backbone, log expression)
    x = tiles.X.toarray() if hasattr(tiles.X, "toarray") else np.asarray(tiles.X)
    tiles.obsm["log_expression"] = np.log1p(x)
    names = [k for k in tiles.obsm if k.startswith("X_") and k.endswith(("_image", "_st"))]
    health = sg.metrics.embedding_collapse(tiles, [*backbone, "log_expression", *sorted(names)], split="test")
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "split": "test",
           "command": "python " + " ".join(sys.argv), "paired": rows,
           "collapse_test": json.loads(health.to_json(orient="records"))}  # fmt: skip
    tag = "" if args.seeds is None else "_s" + "".join(map(str, args.seeds))
    (RESULTS / f"encoder_heldout_demo{tag}.json").write_text(json.dumps(out, indent=1))
    for r in rows:
        print(r["model"], r["seed"], "vs", r["vs"], r["metric"], f"a {r['a']:.3f} b {r['b']:.3f}",
              f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("summarize")
    h = sub.add_parser("heldout")
    h.add_argument("--variants", nargs="*", default=[])
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--seeds", type=int, nargs="*", default=None, help="only these seeds (one output file per call)")
    args = p.parse_args()
    {"prepare": prepare, "run": run, "summarize": summarize, "heldout": heldout}[args.cmd](args)


if __name__ == "__main__":
    main()
