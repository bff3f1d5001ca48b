"""Cost of fine-tuning the image encoder on a CPU: step time and peak memory, frozen vs cached vs re-encoded.

Usage::

    python benchmarks/finetune_cost.py [--repeats 5] [--blocks 1 2] [--out benchmarks/results/finetune_cost.json]

On the ``sigmma demo`` set-up (demo section, 96 um tiles at 0.5 um/px, EfficientNet-Lite0 with its ImageNet weights
at 112 px crops, width 128, the default batch: a quarter of the training tiles), one process builds a model per
mode and times single training steps (``_train_step``: forward, backward, clipping, AdamW) interleaved over the
modes in each repeat, so that the shared CPU's load hits all modes alike; the ratios to the frozen step of the same
repeat are reported (median over repeats). Modes: ``frozen`` (cached pooled features, ``finetune_blocks=0``),
``cached-k`` (fine-tune the last ``k`` blocks from the cache of the frozen part) and ``full-k`` (``finetune_cache=
'off'``: every crop re-encoded through the whole backbone). Peak memory: the increase of the process's peak RSS
(Linux ``clear_refs``) over one step of each mode, measured after its timed steps; the cache itself is reported
separately (its bytes and build time, one pass of the frozen part over the train + val tiles).

Private import on purpose: it times the training step itself (``sigmma_sc.train._step.train_step``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_memory import rss_bytes, rss_peak_reset  # noqa: E402


def _section(input_size: int):
    import sigmma_sc as sg

    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=96.0, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    t0 = time.perf_counter()
    sg.tl.featurize(sdata, input_size=input_size)
    featurize_s = time.perf_counter() - t0
    bundle = sg.data.build_bundle(sdata, include_tiles=True)[0]
    return bundle, featurize_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_cost.json")
    args = p.parse_args()

    from sigmma_sc.model import SigmmaModel
    from sigmma_sc.train._step import train_step as _train_step

    bundle, featurize_s = _section(args.input_size)
    train_idx = bundle.tiles_in("train")
    cache_idx = torch.cat([train_idx, bundle.tiles_in("val")])
    common = {"hidden": args.hidden, "out_dim": args.hidden, "seed": 0}
    modes: dict[str, dict] = {"frozen": {}}
    for k in args.blocks:
        modes[f"cached-{k}"] = {"finetune_blocks": k, "finetune_cache": "memory"}
        modes[f"full-{k}"] = {"finetune_blocks": k, "finetune_cache": "off"}
    setups, cache_info = {}, {}
    for name, extra in modes.items():
        model = SigmmaModel.from_bundle(bundle, **common, **extra).train()
        data = bundle.to("cpu", tiles=name.startswith("full"))
        if name.startswith("cached"):
            plan = model.plan_boundary_cache(cache_idx.numel(), torch.device("cpu"))  # finetune_cache="memory"
            t0 = time.perf_counter()
            cache = model.build_boundary_cache(bundle.tiles, cache_idx, plan)
            cache_info[name] = {
                "bytes": cache.nbytes,
                "build_s": time.perf_counter() - t0,
                "shape": list(plan["shape"]),
            }
            data = data.with_boundary_cache(cache)
        opt = torch.optim.AdamW(model.optimizer_groups())
        setups[name] = (model, data, opt)
    batch = SigmmaModel.from_bundle(bundle, **common).config.batch_for(train_idx.numel())
    gen = torch.Generator().manual_seed(0)
    batches = [train_idx[torch.randperm(train_idx.numel(), generator=gen)[:batch]] for _ in range(args.repeats + 1)]
    times: dict[str, list[float]] = {n: [] for n in modes}
    for r, idx in enumerate(batches):  # repeat 0 is a warm-up
        for name, (model, data, opt) in setups.items():
            t0 = time.perf_counter()
            _train_step(model, data, idx, opt, {"micro_batch": None})
            if r:
                times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, (model, data, opt) in setups.items():
        base = rss_bytes("VmRSS")
        if rss_peak_reset():
            _train_step(model, data, batches[0], opt, {"micro_batch": None})
            peaks[name] = rss_bytes("VmHWM") - base
    ratios = {n: [t / f for t, f in zip(times[n], times["frozen"], strict=True)] for n in modes}
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared CPU (other jobs running)",
        "command": "python " + " ".join(sys.argv),
        "tiles": {"train": int(train_idx.numel()), "cached": int(cache_idx.numel()), "batch": batch},
        "featurize_s": featurize_s,
        "step_s": {n: statistics.median(v) for n, v in times.items()},
        "step_s_all": times,
        "ratio_to_frozen": {n: statistics.median(v) for n, v in ratios.items()},
        "ratio_range": {n: [min(v), max(v)] for n, v in ratios.items()},
        "peak_step_bytes": peaks,
        "cache": cache_info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("tiles", "featurize_s", "step_s", "ratio_to_frozen", "peak_step_bytes",
                                          "cache")}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
