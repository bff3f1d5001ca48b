"""Statistics with power on the demo section (issue 26): bootstrap CI widths, paired comparisons, graph reliance.

Stage ``prepare`` trains the demo model as ``sigmma demo`` does (96 µm tiles, 112 px crops, width 128, 600-step
budget by default, seed 0) and a no-graph control with the same settings (``use_graph=False``), and writes the section
(``--out``/demo.zarr) and both models. Stage ``measure`` reads them and, through the public API only, reports:
each metric's 95 % paired-bootstrap CI over the test tiles (``sg.metrics.evaluate``), the paired comparison of
the two models and of SIGMMA against the frozen backbone (``sg.metrics.compare``), the spatial k-fold probe
(``evaluate(folds=5)``) and the inference-time perturbations (``sg.metrics.graph_reliance``).

    python benchmarks/stats_power.py prepare --out bench_out/stats_power
    python benchmarks/stats_power.py measure --out bench_out/stats_power
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_TILE_UM = 96.0
TRAIN = {"input_size": 112, "hidden": 128, "out_dim": 128, "seed": 0}


def prepare(out: Path, steps: int) -> None:
    import sigmma_sc as sg

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=DEMO_TILE_UM)
    sg.pp.cell_graph(sdata)
    full = sg.tl.train_sigmma(sdata, **TRAIN, steps=steps)
    full.save(out / "full.pt")
    sg.tl.embed(sdata, full, key_added="full")
    nograph = sg.tl.train_sigmma(sdata, **TRAIN, steps=steps, use_graph=False)
    nograph.save(out / "nograph.pt")
    sg.tl.embed(sdata, nograph, key_added="nograph")
    sdata.write(out / "demo.zarr", overwrite=True)
    print(f"prepared in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("prepare", "measure"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/stats_power"))
    ap.add_argument("--steps", type=int, default=600, help="training budget (sigmma demo: 600)")
    args = ap.parse_args()
    if args.stage == "prepare":
        prepare(args.out, args.steps)
    else:
        measure(args.out)


def _power(ci_low: float, ci_high: float) -> dict:
    """Half-width of a 95% CI and the difference detectable with 80% power at two-sided 5% (2.80 standard errors)."""
    se = (ci_high - ci_low) / (2 * 1.96)
    return {"half_width": (ci_high - ci_low) / 2, "mde80": 2.80 * se}


def measure(out: Path, n_boot: int = 2000) -> None:
    import numpy as np
    import pandas as pd
    import spatialdata as sd

    import sigmma_sc as sg
    from sigmma_sc.model import SigmmaModel

    t0 = time.perf_counter()
    sdata = sd.read_zarr(out / "demo.zarr")
    models = {name: SigmmaModel.load(out / f"{name}.pt") for name in ("full", "nograph")}
    res: dict = {
        "n_boot": n_boot,
        "train": TRAIN,
        "steps_trained": {n: m.history[-1]["step"] for n, m in models.items()},
    }
    backbone = [f"sigmma_backbone_{s}" for s in ("micro", "meso", "macro")]
    ev = pd.concat([
        sg.metrics.evaluate(sdata, use_rep=list(models), n_boot=n_boot),  # rows '{model} {scale}' and '{model} all'
        sg.metrics.evaluate(sdata, embeddings={"backbone_concat": backbone}, n_boot=n_boot),
    ])  # fmt: skip
    rows = list(ev.index)
    n = int(ev["n_eval"].iloc[0])
    res["n_test"] = n
    res["evaluate"] = ev.reset_index(names="row").to_dict(orient="records")
    res["binomial_se_r10"] = {r: float(np.sqrt(ev.loc[r, "image->st R@10%"] * (1 - ev.loc[r, "image->st R@10%"]) / n))
                             for r in rows if r.endswith(" all")}  # fmt: skip
    cmp = {
        "full - nograph": sg.metrics.compare(sdata, a="full", b="nograph", use_rep=list(models), n_boot=n_boot),
        "full - backbone": sg.metrics.compare(sdata, a="full", b=backbone, n_boot=n_boot),
    }
    res["compare"] = {k: v.to_dict(orient="records") for k, v in cmp.items()}
    res["power"] = {
        k: {r.metric: _power(r.ci_low, r.ci_high) | {"diff": r.diff, "p": r.p} for r in v.itertuples()}
        for k, v in cmp.items()
    }
    kfold = sg.metrics.evaluate(
        sdata, embeddings={"backbone_concat": backbone}, folds=5, n_boot=n_boot, retrieval=False
    )
    res["kfold_backbone"] = kfold.reset_index(names="row").to_dict(orient="records")
    rel = {name: sg.metrics.graph_reliance(sdata, m, use_rep=name, n_boot=n_boot) for name, m in models.items()}
    res["graph_reliance"] = {k: v.to_dict(orient="records") for k, v in rel.items()}
    res["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    dest = Path(__file__).parent / "results" / "stats_power_demo.json"
    dest.write_text(json.dumps(res, indent=1, default=float))
    print(report(res))


def report(res: dict) -> str:
    """Markdown summary of a ``measure`` result."""
    lines = [f"n_test = {res['n_test']} tiles, {res['n_boot']} resamples; steps trained {res['steps_trained']}", ""]
    lines += ["| row | image->st R@10% [95% CI] | st->image R@10% [95% CI] | paper_pcc [95% CI] | hest_gene_pcc [95% CI] |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in res["evaluate"]:
        cells = []
        for c in ("image->st R@10%", "st->image R@10%", "paper_pcc", "hest_gene_pcc"):
            v = r[c]
            cells.append("-" if v != v else f"{v:.3f} [{r[c + '_ci_low']:.3f}, {r[c + '_ci_high']:.3f}]")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison | metric | diff [95% CI] | p | CI half-width | detectable (80% power) |",
        "|---|---|---|---|---|---|",
    ]
    for k, rows in res["compare"].items():
        for r in rows:
            pw = res["power"][k][r["metric"]]
            lines.append(
                f"| {k} | {r['metric']} | {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p']:.3f} | "
                f"{pw['half_width']:.3f} | {pw['mde80']:.3f} |"
            )
    lines += ["", "| model | perturbation | scale | metric | perturbed | unperturbed | diff [95% CI] | p | changed |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, rows in res["graph_reliance"].items():
        for r in rows:
            if r["scale"] == "all" and r["metric"] in ("cosine to unperturbed", "image->st R@10%", "st->image R@10%"):
                lines.append(
                    f"| {k} | {r['perturbation']} | {r['scale']} | {r['metric']} | {r['perturbed']:.3f} | "
                    f"{r['unperturbed']:.3f} | {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                    f"{r['p']:.3f} | {r['changed']:.2f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
