"""Statistics with power on the demo section (issue 26): bootstrap CI widths, paired comparisons, graph reliance.

Stage ``prepare`` trains the demo model as ``sigmma demo`` does (96 µm tiles, 112 px crops, width 128, 600-step
budget, seed 0) and a no-graph control with the same settings (``use_graph=False``), and writes the section
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

DEMO_TILE_UM, DEMO_STEPS = 96.0, 600
TRAIN = {"input_size": 112, "hidden": 128, "out_dim": 128, "steps": DEMO_STEPS, "seed": 0}


def prepare(out: Path) -> None:
    import sigmma_sc as sg

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=DEMO_TILE_UM)
    sg.pp.cell_graph(sdata)
    full = sg.tl.train_sigmma(sdata, **TRAIN)
    full.save(out / "full.pt")
    sg.tl.embed(sdata, full, key_added="full")
    nograph = sg.tl.train_sigmma(sdata, **TRAIN, use_graph=False)
    nograph.save(out / "nograph.pt")
    sg.tl.embed(sdata, nograph, key_added="nograph")
    sdata.write(out / "demo.zarr", overwrite=True)
    print(f"prepared in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("prepare", "measure"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/stats_power"))
    args = ap.parse_args()
    if args.stage == "prepare":
        prepare(args.out)
    else:
        measure(args.out)


def measure(out: Path) -> None:  # filled in once the statistics exist
    raise NotImplementedError


if __name__ == "__main__":
    main()
