"""``sg.tl.embed`` right after training: the bundle training built, reused, against building it again.

The section's bundle is built with ``sg.data.build_bundle``, a small model is fitted on it with the public model
API (``SigmmaModel.from_bundle`` + ``fit``, which keeps the bundle it trained on as ``model.training_bundle``), and
``sg.tl.embed(..., shifts=None, inplace=False)`` is timed with the kept bundle (reused when the section's inputs
fingerprint matches) and with ``model.training_bundle = None`` (built again), alternating, ``--repeats`` times
each. The embeddings of both must be identical. Reads the cached section read-only (nothing is written there).

    python benchmarks/embed_bundle_reuse.py --section /work/bench_cache/paper_table/bonemarrow_64um_*/section.zarr
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import spatialdata as sd
    import torch

    import sigmma_sc as sg

    p = argparse.ArgumentParser()
    p.add_argument("--section", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/embed_bundle_reuse.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    sdata = sd.read_zarr(args.section)  # in memory from here on; never written back
    t0 = time.perf_counter()
    bundle, _ = sg.data.build_bundle(sdata)
    build_s = time.perf_counter() - t0
    model = sg.model.SigmmaModel.from_bundle(bundle, hidden=16, out_dim=16, batch_size=64, steps=2, seed=0)
    model.fit(bundle, progress=False)
    kept = model.training_bundle
    times: dict[str, list[float]] = {"reused": [], "rebuilt": []}
    outs = {}
    for _ in range(args.repeats):
        for mode in ("reused", "rebuilt"):
            model.training_bundle = kept if mode == "reused" else None
            t0 = time.perf_counter()
            outs[mode] = sg.tl.embed(sdata, model, shifts=None, inplace=False)
            times[mode].append(time.perf_counter() - t0)
    model.training_bundle = kept
    same = all(
        np.array_equal(outs["reused"][k][s], outs["rebuilt"][k][s], equal_nan=True)
        for k in ("st", "cell")
        for s in outs["reused"][k]
    )
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "section": args.section,
        "n_cells": int(bundle.n_cells),
        "n_tiles": int(bundle.n_tiles),
        "build_bundle_s": build_s,
        "embed_s": times,
        "median_s": med,
        "rebuilt_over_reused": med["rebuilt"] / med["reused"],
        "identical_embeddings": bool(same),
        "machine": "2-core shared CPU, other jobs running; torch threads 1",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
