"""CPU training with glibc's default allocator vs one that keeps freed memory (``MALLOC_MMAP_MAX_=0`` ...).

Usage::

    python benchmarks/cpu_allocator.py --repeats 2          # the paper preset (width 512) on bone marrow
    python benchmarks/cpu_allocator.py --hidden 128 --preset default --epochs 10
    python benchmarks/cpu_allocator.py --repeats 1 --micro-batch 0 --tag _planner   # the memory planner splits

Each run is a fresh process (the allocator is configured when the process starts) that trains on the cached
bone-marrow bundle of ``train_defaults.py`` (run its ``prepare`` first) for a few epochs with a fixed seed and
reports the training time, its page faults and the final losses; the settings alternate run by run so that
load on the machine affects both alike. The losses must be identical: the allocator changes no arithmetic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # cpu_allocator{--tag}.json
KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(1 << 30)}


def one(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_defaults import prepare

    from sigmma_sc.model import SigmmaModel

    bundle = prepare(argparse.Namespace(dataset="bonemarrow", tile_size_um=128.0, input_size=112))[1]
    model = SigmmaModel.from_bundle(bundle, seed=0, preset=args.preset, hidden=args.hidden, out_dim=args.hidden,
                                    epochs=args.epochs, steps=None, micro_batch=args.micro_batch or None)  # fmt: skip
    planned: list[str] = []  # what the CPU memory planner logged (--micro-batch 0: it chooses the split)
    handler = logging.Handler()
    handler.emit = lambda record: planned.append(record.getMessage()) if "micro-batch" in record.getMessage() else None
    logging.getLogger("sigmma_sc.model").addHandler(handler)
    logging.getLogger("sigmma_sc.model").setLevel(logging.INFO)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    history = model.fit(bundle, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "steps": history[-1]["step"], "minor_faults": after.ru_minflt - before.ru_minflt,
            "system_seconds": after.ru_stime - before.ru_stime, "user_seconds": after.ru_utime - before.ru_utime,
            "peak_rss_gib": after.ru_maxrss / 2**20,  # KiB on Linux
            "losses": [h["train_loss"] for h in history], "planner": planned}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=52, help="GradCache micro-batch; 0: the memory planner's choice")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the results file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    rows = {"glibc default": [], "keep freed memory": []}
    cmd = [sys.executable, __file__, "--one", *(sys.argv[1:] if argv is None else argv)]
    for _ in range(args.repeats):
        for name, extra in (("glibc default", {}), ("keep freed memory", KEEP)):
            out = subprocess.run(cmd, env=base | extra, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[name].append(row)
            print(f"{name:18s} {row['seconds']:7.1f} s for {row['steps']} steps, {row['minor_faults'] / 1e6:.1f} M minor "
                  f"faults, system {row['system_seconds']:.0f} s, peak RSS {row['peak_rss_gib']:.1f} GiB", flush=True)  # fmt: skip
            for line in row["planner"]:
                print("  planner:", line, flush=True)
    same = all(r["losses"] == rows["glibc default"][0]["losses"] for rs in rows.values() for r in rs)
    best = {k: min(r["seconds"] for r in v) for k, v in rows.items()}
    ratio = {k: best["glibc default"] / v for k, v in best.items()}
    print(f"best-of-{args.repeats} speed-up over glibc's default: {ratio}; identical losses: {same}")
    (RESULTS / f"cpu_allocator{args.tag}.json").write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, 2 cores",
                                   "command": " ".join(["cpu_allocator.py", *(argv or sys.argv[1:])]), "settings": KEEP,
                                   "rows": rows, "speedup": ratio, "identical_losses": same}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
