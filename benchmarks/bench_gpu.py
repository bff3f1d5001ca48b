"""GPU benchmark of the pure-torch core: featurisation throughput and training time.

Needs only torch, torch-geometric, timm and numpy (no anndata/spatialdata); from the repository root::

    PYTHONPATH=src python benchmarks/bench_gpu.py --out bench_gpu.md      # one GPU, a few minutes
    PYTHONPATH=src python benchmarks/bench_gpu.py --dry-run --out dry.md  # tiny sizes on the CPU, < 60 s

Measurements (each printed as one JSON line and appended as a markdown row to ``--out``):

1. ``featurize/<backbone>``: crops/s of the real pipeline (``sigmma_sc.nn.featurize`` over a list of
   uint8 numpy tiles: host stacking, pinned host-to-device copies, cropping, resizing, normalisation,
   bf16 autocast) against the bare backbone forward on the same batch of normalised crops already on the
   device (bf16 autocast, same memory format), and their ratio (target >= 0.9). Random weights.
2. ``train`` (and ``train/tf32``, ``train/bf16``: ``SigmmaConfig.precision``): ``SigmmaModel.fit`` for 100
   epochs on a synthetic 6,000-tile bundle with cached features at the paper's defaults: total seconds
   (target < 60 s on one H100), seconds per epoch, peak GPU memory, whether the OOM fallback triggered, and
   the host syncs counted in training steps.
3. ``env``: versions, device, and the scverse modules loaded by the whole run (must be none).

Private imports on purpose: the host syncs of a training step are counted on the step itself
(``sigmma_sc.train._step.train_step``); the synthetic bundle is the tests' ``tests/_toy.py`` (torch and numpy only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sigmma_sc import settings
from sigmma_sc.model import SigmmaModel, TrainingBundle
from sigmma_sc.model._finetune import optimizer_groups
from sigmma_sc.nn import MultiCropEncoder, build_backbone, featurize
from sigmma_sc.train._device import autocast_for
from sigmma_sc.train._step import train_step as _train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _toy import toy_bundle  # tests/_toy.py: numpy + torch only

N_CROPS = 21  # 16 micro + 4 meso + 1 macro per tile
SCVERSE = ("anndata", "spatialdata", "scanpy", "squidpy", "dask", "zarr", "xarray", "spatialdata_io")

FULL = {
    "backbones": "uni,efficientnet_lite0",
    "tile_px": 256,
    "feat_batches": 16,
    "feat_batch": 32,
    "repeats": 5,
    "warmup": 2,
    "train_tiles": 6000,
    "min_cells": 150,
    "max_cells": 300,
    "n_features": 50,
    "image_dim": 1024,
    "hidden": 512,
    "batch_size": 1280,
    "epochs": 100,
}
DRY = {
    "backbones": "test_vit,test_efficientnet",
    "tile_px": 64,
    "feat_batches": 2,
    "feat_batch": 2,
    "repeats": 1,
    "warmup": 1,
    "train_tiles": 48,
    "min_cells": 10,
    "max_cells": 30,
    "n_features": 8,
    "image_dim": 16,
    "hidden": 16,
    "batch_size": 16,
    "epochs": 2,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()``: CUDA events on the GPU (device time), the wall clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def _wall(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn()`` with the device idle before and drained after (host work included)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- featurize
def bench_featurize(name: str, cfg: dict, device: torch.device, *, dry_run: bool) -> dict:
    """Pipeline vs bare-backbone crops/s for one backbone."""
    cuda = device.type == "cuda"
    model, info = build_backbone(name, pretrained=False)
    if dry_run and not info.is_vit:
        info = dataclasses.replace(info, input_size=64)  # small crops: fast on the CPU
    enc = MultiCropEncoder(model, info).to(device).eval()
    bs, n_batches = cfg["feat_batch"], cfg["feat_batches"]
    rng = np.random.default_rng(0)
    px = cfg["tile_px"]
    tiles = [rng.integers(0, 256, (3, px, px), dtype=np.uint8) for _ in range(bs * n_batches)]
    n_crops = len(tiles) * N_CROPS

    def pipeline() -> None:
        featurize(tiles, enc, batch_size=bs, device=device)

    for _ in range(cfg["warmup"]):
        pipeline()  # also switches a CNN to channels_last on CUDA, as featurize does for users
    t_pipe = [_wall(pipeline, device) for _ in range(cfg["repeats"])]

    with torch.inference_mode():
        batch = torch.from_numpy(np.stack(tiles[:bs])).to(device)
        crops = enc.crops(batch)  # the same crops the pipeline makes, same memory format
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

        def bare(x: torch.Tensor = crops) -> None:
            with autocast:
                for _ in range(n_batches):
                    enc.backbone(x)

        def crop_only() -> None:
            for _ in range(n_batches):
                enc.crops(batch)

        for _ in range(cfg["warmup"]):
            bare()
        t_bare = [_timed(bare, device) for _ in range(cfg["repeats"])]
        t_crop = [_timed(crop_only, device) for _ in range(cfg["repeats"])]
        nchw = None
        if cuda and enc.channels_last:  # reference: the bare backbone in the default NCHW layout
            enc.use_channels_last(enabled=False)
            plain = enc.crops(batch)
            bare(plain)
            nchw = n_crops / statistics.median(_timed(lambda: bare(plain), device) for _ in range(cfg["repeats"]))
            enc.use_channels_last(enabled=True)

    def host_only() -> None:  # what the CPU does per batch: stacking into a (pinned) buffer
        out = torch.empty((bs, 3, px, px), dtype=torch.uint8, pin_memory=cuda)
        for i in range(n_batches):
            np.stack(tiles[i * bs : (i + 1) * bs], out=out.numpy())

    t_host = statistics.median(_wall(host_only, torch.device("cpu")) for _ in range(cfg["repeats"]))
    pipe_cps = n_crops / statistics.median(t_pipe)
    bare_cps = n_crops / statistics.median(t_bare)
    ratio = pipe_cps / bare_cps
    return {
        "name": f"featurize/{name}",
        "value": round(ratio, 3),
        "unit": "pipeline/bare",
        "target": ">= 0.9",
        "met": ratio >= 0.9,
        "pipeline_crops_per_s": round(pipe_cps, 1),
        "bare_crops_per_s": round(bare_cps, 1),
        "bare_nchw_crops_per_s": None if nchw is None else round(nchw, 1),
        "crop_resize_crops_per_s": round(n_crops / statistics.median(t_crop), 1),
        "host_stack_crops_per_s": round(n_crops / t_host, 1),
        "channels_last": bool(cuda and not info.is_vit),
        "tiles": len(tiles),
        "tile_px": px,
        "crop_px": info.input_size,
        "batch_tiles": bs,
        "repeats": cfg["repeats"],
        "pipeline_s": [round(t, 4) for t in t_pipe],
        "bare_s": [round(t, 4) for t in t_bare],
    }


# ---------------------------------------------------------------------------------------------- training
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def make_bundle(cfg: dict, device: torch.device, cache: str | None) -> tuple[TrainingBundle, float]:
    """The synthetic training bundle (validated on ``device``), optionally cached in a file."""
    t0 = time.perf_counter()
    if cache and Path(cache).is_file():
        bundle = TrainingBundle.load(cache, map_location=device)
    else:
        bundle = toy_bundle(
            n_tiles=cfg["train_tiles"],
            n_features=cfg["n_features"],
            image_dim=cfg["image_dim"],
            min_cells=cfg["min_cells"],
            max_cells=cfg["max_cells"],
            n_neighs=6,
            n_cand=3,
            seed=0,
            device=device,
        )
        if cache:
            bundle.save(cache)
    return bundle, time.perf_counter() - t0


def count_step_syncs(model: SigmmaModel, bundle: TrainingBundle, device: torch.device, batch_size: int) -> dict:
    """Host synchronisations in training steps after ``fit`` (the model's weights change; it is not reused).

    CUDA: ``torch.cuda.set_sync_debug_mode('warn')`` over 2 steps (after a warm-up step), warnings counted.
    CPU: the step is run on the meta device, where every data-dependent shape or host read raises.
    """
    idx = bundle.tiles_in("train")[:batch_size].cpu()
    opt_groups = optimizer_groups(model, model.image_encoder, 1e-6, 1e-6)
    if device.type == "cuda":
        data = bundle.to(device, tiles=model.finetuned)
        opt = torch.optim.AdamW(opt_groups, fused=True)
        amp = autocast_for(model.config.precision, device)
        state = {"micro_batch": model.config.micro_batch}
        model.train()
        _train_step(model, data, idx, opt, state, amp)  # warm-up; halves the micro-batch on OOM like fit
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(2):
                    _train_step(model, data, idx, opt, state, amp)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"host_syncs_per_step": len(syncs) / 2, "sync_examples": sorted(set(syncs))[:3]}
    small = model.to("meta").train()
    opt = torch.optim.AdamW(optimizer_groups(small, small.image_encoder, 1e-6, 1e-6))
    try:
        _train_step(small, bundle.to("meta", tiles=False), idx, opt, {"micro_batch": None})
        return {"host_syncs_per_step": 0, "sync_check": "meta device"}
    except (RuntimeError, NotImplementedError) as e:
        return {"host_syncs_per_step": None, "sync_check": f"meta device failed: {str(e)[:120]}"}


def bench_train(cfg: dict, device: torch.device, bundle: TrainingBundle, *, precision: str = "fp32") -> dict:
    """Total fit time, per-epoch time and peak memory of the paper-default model."""
    cuda = device.type == "cuda"
    model = SigmmaModel.from_bundle(
        bundle,
        hidden=cfg["hidden"],
        out_dim=cfg["hidden"],
        layers_per_scale=2,
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        precision=precision,
        seed=0,
    )
    handler = _Records()
    log = logging.getLogger("sigmma_sc.train")
    log.addHandler(handler)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        total = _wall(lambda: model.fit(bundle, device=device, progress=False), device)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    finally:
        log.removeHandler(handler)
    epochs = [h["seconds"] for h in model.history]
    syncs = count_step_syncs(model, bundle, device, cfg["batch_size"])
    n_train = int(bundle.tiles_in("train").numel())
    return {
        "name": "train" if precision == "fp32" else f"train/{precision}",
        "value": round(total, 2),
        "unit": "s",
        "target": "< 60 (H100)",
        "met": total < 60,
        "epochs": len(epochs),
        "first_epoch_s": round(epochs[0], 3),
        "epoch_s_median": round(statistics.median(epochs[1:] or epochs), 3),
        "peak_gpu_mem_gb": None if peak is None else round(peak / 1024**3, 2),
        "oom_fallback": any("out of memory" in m for m in handler.messages),
        "tiles": bundle.n_tiles,
        "train_tiles": n_train,
        "cells": bundle.n_cells,
        "steps_per_epoch": -(-n_train // cfg["batch_size"]),
        "final_train_loss": round(model.history[-1]["train_loss"], 4),
        "precision": precision,
        **syncs,
    }


# ---------------------------------------------------------------------------------------------- output
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def _append_row(out: Path, record: dict, device_name: str, stamp: str) -> None:
    header = "| date | device | measurement | value | target | met | details |\n|---|---|---|---|---|---|---|\n"
    keys = ("name", "value", "unit", "target", "met")
    details = ", ".join(f"{k}={v}" for k, v in record.items() if k not in keys and not isinstance(v, list))
    value = f"{record.get('value')} {record.get('unit', '')}".strip()
    row = f"| {stamp} | {device_name} | {record['name']} | {value} | {record.get('target', '')} | "
    row += f"{record.get('met', '')} | {details} |\n"
    new = not out.exists() or out.stat().st_size == 0
    with out.open("a") as f:
        f.write((header if new else "") + row)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the records (also printed as JSON lines and appended to ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_gpu.md", help="markdown file the result rows are appended to")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and test backbones (CPU, < 60 s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--only", choices=("featurize", "train"), default=None, help="run one part only")
    p.add_argument("--backbones", default=None, help="comma-separated build_backbone names")
    p.add_argument(
        "--precisions",
        default=None,
        help="comma-separated SigmmaConfig.precision values to train with (default on CUDA: fp32,tf32,bf16)",
    )
    p.add_argument("--bundle-cache", default=None, help="save/load the synthetic training bundle here")
    for key, value in FULL.items():
        if key != "backbones":
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    args = p.parse_args(argv)
    cfg = dict(DRY if args.dry_run else FULL)
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    if device.type != "cuda" and not args.dry_run:
        print("warning: no CUDA device; full sizes on the CPU take very long (use --dry-run)", file=sys.stderr)
    settings.progress_bar = False
    torch.manual_seed(0)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    dev_name = _device_name(device)
    out = Path(args.out)
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)
        _append_row(out, record, dev_name, stamp)

    if args.only in (None, "featurize"):
        for name in cfg["backbones"].split(","):
            emit(bench_featurize(name.strip(), cfg, device, dry_run=args.dry_run))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.only in (None, "train"):
        bundle, seconds = make_bundle(cfg, device, args.bundle_cache)
        print(json.dumps({"name": "bundle", "seconds": round(seconds, 2), "repr": repr(bundle)}), flush=True)
        default = "fp32,tf32,bf16" if device.type == "cuda" else "fp32"
        for precision in (args.precisions or default).split(","):
            emit(bench_train(cfg, device, bundle, precision=precision.strip()))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    emit(
        {
            "name": "env",
            "value": "dry-run" if args.dry_run else "full",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "commit": _git_commit(),
            "scverse_modules_loaded": sorted(m for m in SCVERSE if m in sys.modules),
        }
    )
    return records


if __name__ == "__main__":
    main()
