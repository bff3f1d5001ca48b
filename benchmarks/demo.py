"""``sigmma demo``, timed, and the demo paragraph of BENCHMARKS.md rendered from its JSON summary (issue 28).

The demo's numbers that the docs quote come from one file, ``benchmarks/results/demo_summary.json``: the
summary ``sigmma demo`` writes next to its zarr, plus the wall time and peak memory measured here.
``tests/test_demo_numbers.py`` checks that BENCHMARKS.md holds exactly what ``render`` prints.

    python benchmarks/demo.py run [--fresh-cache]   # runs `sigmma demo` (about 4.5 min on a quiet 2-core CPU)
    python benchmarks/demo.py render                # the markdown block for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "demo_summary.json"
BEGIN, END = "<!-- demo-summary: begin (python benchmarks/demo.py render) -->", "<!-- demo-summary: end -->"


def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sigmma_demo_"))
    env = dict(os.environ)
    if args.fresh_cache:  # as on a new machine: the synthetic section is written first
        env["SIGMMA_SC_CACHE"] = str(work / "cache")
    out = work / "demo.zarr"
    cmd = [str(Path(sys.executable).with_name("sigmma")), "demo", "--out", str(out), *args.extra]
    load = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    summary = json.loads((work / "demo.summary.json").read_text())
    summary["measured"] = {
        "command": " ".join(["sigmma", "demo", "--out", "demo.zarr", *args.extra]),
        "fresh_cache": bool(args.fresh_cache),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
        "load_average_1min_start": round(load[0], 2),
        "machine": args.machine,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(render(summary))


def _min(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def render(summary: dict | None = None) -> str:
    """The BENCHMARKS.md block (between the BEGIN/END markers) from the JSON summary."""
    s = json.loads(RESULT.read_text()) if summary is None else summary
    m, t, tr, test = s["measured"], s["timings_s"], s["training"], s["test_retrieval"]
    rows = {(r["scale"], r["direction"]): r for r in test["rows"]}
    fr = (5, 10, 15)

    def line(scale: str, direction: str) -> str:
        r = rows[(scale, direction)]
        return f"| {scale} | {direction} | " + " | ".join(f"{r[f'R@{p}%']:.3f}" for p in fr) + " |"

    table = [
        "| scale | direction | R@5% | R@10% | R@15% |",
        "|---|---|---:|---:|---:|",
        *(
            line(sc, d)
            for sc in ("micro", "meso", "macro", "all")
            for d in ("image->st", "st->image")
            if (sc, d) in rows
        ),
        "| chance | | " + " | ".join(f"{test['chance'][f'R@{p}%']:.3f}" for p in fr) + " |",
    ]
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    return "\n".join([
        BEGIN,
        f"Command: `{m['command']}` (`python benchmarks/demo.py run{' --fresh-cache' if m['fresh_cache'] else ''}`), "
        f"{s['date_utc']} UTC, seed {s['settings']['seed']}, sigmma_sc {s['version']}; {m['machine']} (load average "
        f"{m['load_average_1min_start']:.1f} at the start, {s['machine']['load_average_1min_end']:.1f} at the end; "
        f"{s['machine']['torch_threads']} torch threads, OMP_WAIT_POLICY {s['machine'].get('omp_wait_policy')}). "
        f"**{_min(m['wall_s'])} wall, peak RSS {m['peak_rss_gib']:.2f} GiB** ({steps}). Tiles "
        f"{s['tiles']['train']} train / {s['tiles']['val']} val / {s['tiles']['test']} test; training stopped at "
        f"step {tr['steps']} ({tr['stopped']}), kept epoch {tr['kept_epoch']} of {tr['epochs']} by validation "
        f"retrieval (partner rank {tr['val_rank_kept']:.3f}, chance 0.5). Held-out test retrieval "
        f"({test['n']} tiles), as `sigmma demo` prints it (`all`: the scales concatenated):",
        "",
        *table,
        END,
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--fresh-cache", action="store_true", help="write the synthetic section first (a new machine)")
    r.add_argument("--machine", default="2-core shared CPU, other jobs running")
    r.add_argument("--result", type=Path, default=RESULT, help="where to write the JSON (default: %(default)s)")
    r.add_argument("extra", nargs="*", help="more `sigmma demo` arguments (after --)")
    sub.add_parser("render")
    args = p.parse_args()
    if args.command == "run":
        run(args)
    else:
        print(render())


if __name__ == "__main__":
    main()
