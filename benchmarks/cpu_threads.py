"""CPU training under load: torch's threads spinning vs sleeping vs one thread (issue 28, first run).

On a 2-core machine where another process used 1.5-2 cores, ``sigmma demo``'s featurization took 2x its
quiet time but training 12x. This script reproduces it with CPU hogs (``python -c 'while 1: pass'``, killed at
the end) next to a demo-sized training run (a toy bundle of 219 tiles, 40-100 cells each, width 128, image
features 1280 wide: the demo's sizes) and compares, in fresh processes, interleaved:

- ``spin``: torch imported before sigmma_sc, no ``OMP_WAIT_POLICY`` (libgomp's default: threads spin between
  parallel regions), the machine's threads;
- ``passive``: sigmma_sc imported first (it sets ``OMP_WAIT_POLICY=PASSIVE``), the same threads;
- ``1 thread``: as ``spin`` with ``torch.set_num_threads(1)``.

It reports seconds per optimiser step (wall, and the CPU time the process burnt), the ratio to the same
variant without hogs, and a checksum of the trained weights (the wait policy must not change them).

    python benchmarks/cpu_threads.py --hogs 0 2 --repeats 2 --steps 8
"""

# Private imports on purpose: sigmma_sc._threads.STATE (the thread policy measured here).

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {"spin": {}, "passive": {}, "1 thread": {"threads": 1}}


def worker(variant: str, steps: int) -> None:
    """One training run in this (fresh) process; prints one JSON line."""
    if variant == "passive":
        import sigmma_sc  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)
    import hashlib

    import torch

    from sigmma_sc._threads import STATE
    from sigmma_sc.model import SigmmaModel

    sys.path.insert(0, str(HERE.parent / "tests"))
    from _toy import toy_bundle  # tests/_toy.py: the synthetic bundle

    if VARIANTS[variant].get("threads"):
        torch.set_num_threads(VARIANTS[variant]["threads"])
    bundle = toy_bundle(n_tiles=219, n_features=50, image_dim=1280, min_cells=40, max_cells=100, n_neighs=6, n_cand=8,
                        seed=1)  # fmt: skip
    model = SigmmaModel.from_bundle(bundle, hidden=128, out_dim=128, steps=steps, warmup=0, patience=None,
                                    max_batch_fraction=0.25, seed=0)  # fmt: skip
    t, c = time.perf_counter(), time.process_time()
    model.fit(bundle, progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    digest = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    print(json.dumps({
        "variant": variant, "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "policy_source": STATE["source"], "steps": steps, "wall_s": wall, "cpu_s": cpu,
        "s_per_step": wall / steps, "cpu_s_per_step": cpu / steps, "weights_sha1": digest.hexdigest()[:12],
    }))  # fmt: skip


def run_one(variant: str, steps: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, str(Path(__file__)), "--worker", variant, "--steps", str(steps)]
    load = os.getloadavg()[0]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                             check=True).stdout  # fmt: skip
        row = json.loads(out.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        row = {"variant": variant, "steps": steps, "timed_out": timeout, "s_per_step": float("inf")}
    return row | {"load_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 2], help="numbers of CPU hogs to run next to it")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run (a run past it counts as inf)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_threads.json")
    args = p.parse_args()
    if args.worker is not None:
        if args.worker != "passive":  # torch first: sigmma_sc cannot set the policy (the case measured)
            import torch  # noqa: F401
        worker(args.worker, args.steps)
        return
    rows = []
    for hogs in args.hogs:
        procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(hogs)]
        try:
            time.sleep(1.0)
            for rep in range(args.repeats):
                for variant in args.variants:  # interleaved, so a change of background load hits every variant
                    row = run_one(variant, args.steps, args.timeout) | {"hogs": hogs, "repeat": rep}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    table = []
    for hogs in args.hogs:
        for variant in args.variants:
            mine = [r for r in rows if r["hogs"] == hogs and r["variant"] == variant]
            base = [r for r in rows if r["hogs"] == min(args.hogs) and r["variant"] == variant]
            med = statistics.median(r["s_per_step"] for r in mine)
            med0 = statistics.median(r["s_per_step"] for r in base)
            cpu = [r["cpu_s_per_step"] for r in mine if "cpu_s_per_step" in r]
            table.append({
                "hogs": hogs, "variant": variant, "s_per_step": med, "ratio_to_no_hogs": med / med0,
                "cpu_s_per_step": statistics.median(cpu) if cpu else None,
                "load_before": [round(r["load_before"], 1) for r in mine],
                "weights_sha1": sorted({r.get("weights_sha1", "-") for r in mine}),
            })  # fmt: skip
    print("\n| hogs | variant | s/step (median) | x without hogs | CPU s/step | load before | weights |")
    print("|---:|---|---:|---:|---:|---|---|")
    for t in table:
        cpu = "–" if t["cpu_s_per_step"] is None else f"{t['cpu_s_per_step']:.2f}"
        print(f"| {t['hogs']} | {t['variant']} | {t['s_per_step']:.2f} | {t['ratio_to_no_hogs']:.1f} | {cpu} | "
              f"{t['load_before']} | {', '.join(t['weights_sha1'])} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": len(os.sched_getaffinity(0)),
            "command": " ".join(["python", "benchmarks/cpu_threads.py", *sys.argv[1:]]),
            "machine": "2-core shared CPU, other jobs running"}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
