"""Benchmark a synthetic cohort: preprocessing, bundling and a few training epochs for 1, 2, 4, ... sections.

Usage::

    python benchmarks/bench_cohort.py --sections 1 2 4 --n-cells 10000 --epochs 2

Synthetic Xenium folders (one per section, seeds 0, 1, ...) are written once under ``bench_out/`` (git-ignored)
and re-used. Each cohort size runs in a fresh process (peak RSS is per process) and reports wall time of
preprocessing (read + ``sg.pp.tile`` + ``sg.pp.cell_graph`` per section, one at a time), bundling (shared PCA,
``sg.tl.featurize`` and ``build_bundle`` per section, ``TrainingBundle.concat``) and training, plus the peak
RSS after each section's preprocessing and at the end. The sections stay in memory until the bundles are built
(the shared PCA needs all of them), so peak RSS grows with the cohort here.

``--dist-procs 1 2`` then trains the largest cohort's bundle (saved under ``bench_out/``) with 1 and with 2
processes (``torchrun``, gloo on the CPU, one thread each; ``SigmmaModel.fit`` joins the process group from
the environment) for the same epochs and reports wall time and each process's peak RSS.

Private import on purpose: the cohort's preparation (``sigmma_sc.tl._cohort.prepare_cohort``: shared PCA, splits)
is timed apart from featurization and bundling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def _folder(out: Path, n_cells: int, seed: int) -> Path:
    import sigmma_sc as sg

    folder = out / f"cohort_{n_cells}_{seed}"
    if not (folder / "experiment.xenium").exists():
        sg.datasets.synthetic_xenium(folder, n_cells=n_cells, seed=seed, transcripts=False, morphology=False,
                                     overwrite=True)  # fmt: skip
    return folder


MODEL = {"hidden": 64, "out_dim": 64}


def train_child(bundle_path: str, epochs: int, out: str) -> None:
    """Train on a saved bundle (run under torchrun); every rank writes its wall time and peak RSS."""
    import os

    import torch

    from sigmma_sc.model import SigmmaModel, TrainingBundle

    torch.set_num_threads(1)
    bundle = TrainingBundle.load(bundle_path)
    n_train = int((bundle.split == 0).sum())
    model = SigmmaModel.from_bundle(bundle, **MODEL, batch_size=min(256, n_train), epochs=epochs)
    t0 = time.perf_counter()
    model.fit(bundle, device="cpu", progress=False)
    rank = int(os.environ.get("RANK", 0))
    Path(f"{out}.rank{rank}").write_text(
        json.dumps(
            {
                "train_s": round(time.perf_counter() - t0, 1),
                "steps": model.history[-1]["step"],
                "peak_rss_gb": _rss_gb(),
            }
        )
    )


def one(n_sections: int, n_cells: int, epochs: int, out: Path, *, save_bundle: bool = False) -> dict:
    import sigmma_sc as sg
    from sigmma_sc.model import SigmmaModel, TrainingBundle
    from sigmma_sc.tl._cohort import prepare_cohort

    sg.settings.progress_bar = False
    folders = [_folder(out, n_cells, s) for s in range(n_sections)]
    t0 = time.perf_counter()
    sections, rss = {}, []
    for i, f in enumerate(folders):
        sdata = sg.io.xenium(f, he_image="auto")
        sg.pp.tile(sdata, image_key="he", tile_size_um=128, pixel_size_um=0.5)
        sg.pp.cell_graph(sdata)
        sections[f"s{i}"] = sdata
        rss.append(_rss_gb())
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare_cohort(sections)
    bundles = []
    for sdata in sections.values():
        sg.tl.featurize(sdata, backbone="efficientnet_lite0", input_size=32)
        bundles.append(sg.data.build_bundle(sdata)[0])
    bundle = TrainingBundle.concat(bundles, names=list(sections))
    t_bundle = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_train = int((bundle.split == 0).sum())
    model = SigmmaModel.from_bundle(bundle, **MODEL, batch_size=min(256, n_train), epochs=epochs)
    model.fit(bundle, device="cpu", progress=False)
    t_train = time.perf_counter() - t0
    if save_bundle:
        bundle.save(out / f"cohort_bundle_{n_sections}x{n_cells}.pt")
    return {
        "sections": n_sections,
        "cells_per_section": n_cells,
        "tiles": bundle.n_tiles,
        "cells": bundle.n_cells,
        "preprocess_s": round(t_pre, 1),
        "bundle_s": round(t_bundle, 1),
        "train_s": round(t_train, 1),
        "epochs": epochs,
        "steps": model.history[-1]["step"],
        "peak_rss_gb_after_each_section": rss,
        "peak_rss_gb": _rss_gb(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument(
        "--dist-procs", type=int, nargs="*", default=[], help="also train the largest cohort on N processes"
    )
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single cohort size (child)
    parser.add_argument("--save-bundle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-child", nargs=2, default=None, help=argparse.SUPPRESS)  # BUNDLE OUT (under torchrun)
    args = parser.parse_args(argv)
    if args.train_child is not None:
        train_child(args.train_child[0], args.epochs, args.train_child[1])
        return []
    if args.one is not None:
        print(json.dumps(one(args.one, args.n_cells, args.epochs, args.out, save_bundle=args.save_bundle)), flush=True)
        return []
    for s in range(max(args.sections)):  # write the folders first, outside the timed runs
        _folder(args.out, args.n_cells, s)
    results = []
    for n in args.sections:
        cmd = [sys.executable, __file__, "--one", str(n), "--n-cells", str(args.n_cells), "--epochs",
               str(args.epochs), "--out", str(args.out)]  # fmt: skip
        if args.dist_procs and n == max(args.sections):
            cmd.append("--save-bundle")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    bundle = args.out / f"cohort_bundle_{max(args.sections)}x{args.n_cells}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for procs in args.dist_procs:
        stem = args.out / f"dist_{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), __file__,
               "--train-child", str(bundle), str(stem), "--epochs", str(args.epochs)]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        ranks = [json.loads(Path(f"{stem}.rank{r}").read_text()) for r in range(procs)]
        results.append({"train_processes": procs, "sections": max(args.sections), "wall_s": round(time.perf_counter() - t0, 1),
                        "ranks": ranks})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": "2-core CPU, 24 GiB, no GPU",
                      "command": "python benchmarks/bench_cohort.py " + " ".join(argv or sys.argv[1:])}))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
