"""Peak memory of a CPU training step vs the estimate that plans micro-batches (``sigmma_sc.train._memory``).

Usage::

    python benchmarks/cpu_memory.py                 # every configuration, one fresh process each
    python benchmarks/cpu_memory.py --fit           # also fit the two coefficients by least squares

For each (section, width, tiles per forward pass) a fresh process builds the model, selects the tiles,
resets its peak RSS (Linux ``clear_refs``) and runs one training-mode forward + backward of the contrastive
loss; the measured peak-RSS increase is compared with ``step_bytes_per_tile`` summed over those tiles.
Sections: the real bone-marrow section at 128 um (the ``train_defaults.py`` cache; run its ``prepare`` first)
and the synthetic demo section at 96 um, whose image features are random (memory does not depend on them).

Private import on purpose: it measures the internal memory planner (``sigmma_sc.train._memory``) and fits its
coefficients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_memory.json"
CONFIGS = [("bonemarrow", 128, 26), ("bonemarrow", 128, 104), ("bonemarrow", 512, 13), ("bonemarrow", 512, 26),
           ("demo", 128, 32), ("demo", 512, 16), ("demo", 512, 48)]  # fmt: skip


def rss_peak_reset() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs``); ``False`` where that is not possible."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmHWM") -> int | None:
    """Peak (``VmHWM``) or current (``VmRSS``) resident set size of this process in bytes (Linux)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _bundle(section: str):
    if section == "bonemarrow":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train_defaults import prepare

        return prepare(argparse.Namespace(dataset="bonemarrow", tile_size_um=128.0, input_size=112))[1]
    import sigmma_sc as sg

    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=96, pixel_size_um=0.5, seed=0)
    sg.pp.cell_graph(sdata)
    tiles = sdata.tables["sigmma_tiles"]
    rng = np.random.default_rng(0)
    for s in ("micro", "meso", "macro"):
        tiles.obsm[f"sigmma_backbone_{s}"] = rng.random((tiles.n_obs, 1280), dtype=np.float32)
    return sg.data.build_bundle(sdata)[0]


def measure(section: str, hidden: int, n: int) -> dict:
    """One configuration in this process: measured peak increase and the estimate, in bytes."""
    import torch

    from sigmma_sc.model import SigmmaModel
    from sigmma_sc.train import _memory as M

    bundle = _bundle(section)
    model = SigmmaModel.from_bundle(bundle, seed=0, preset="paper", hidden=hidden, out_dim=hidden)
    idx = bundle.tiles_in("train")[:n]
    batch = bundle.select(idx)
    if not rss_peak_reset():
        raise SystemExit("needs Linux /proc/self/clear_refs")
    model.eval()  # first the inference pass (as sg.tl.embed and the validation run it)
    base = rss_bytes("VmRSS")
    with torch.inference_mode():
        model.embed_batch(batch)
    inference = rss_bytes("VmHWM") - base
    model.train()
    rss_peak_reset()
    base = rss_bytes("VmRSS")
    loss = model.loss_from_embeddings(model.embed_batch(batch))
    loss.backward()
    peak = rss_bytes("VmHWM")
    est = float(M.step_bytes_per_tile(model, bundle)[idx].sum())
    est_inference = float(M.inference_bytes_per_tile(model, bundle)[idx].sum())
    terms = []  # the estimate is linear in its two coefficients: each term alone, for --fit
    for edge, cell in ((1.0, 0.0), (0.0, 1.0)):
        terms.append(float(M.step_bytes_per_tile(model, bundle, edge_coef=edge, cell_coef=cell)[idx].sum()))
    counts = {k: int(v[idx].sum()) for k, v in bundle._host_counts.items()}
    return {"section": section, "hidden": hidden, "tiles": n, "measured": peak - base, "estimate": est,
            "inference_measured": inference, "inference_estimate": est_inference,
            "terms": terms, "counts": counts, "torch_threads": torch.get_num_threads()}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("SECTION", "HIDDEN", "TILES"), help=argparse.SUPPRESS)
    p.add_argument("--fit", action="store_true", help="print the least-squares coefficients")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = []
    for section, hidden, n in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", section, str(hidden), str(n)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{section:10s} hidden {hidden:3d} {n:3d} tiles: training step {row['measured'] / 2**30:5.2f} GiB, "
            f"estimate {row['estimate'] / 2**30:5.2f} GiB (x{row['estimate'] / row['measured']:.2f}); inference "
            f"{row['inference_measured'] / 2**30:5.2f} GiB, estimate {row['inference_estimate'] / 2**30:5.2f} GiB "
            f"(x{row['inference_estimate'] / max(row['inference_measured'], 1):.2f})",
            flush=True,
        )
    RESULTS.write_text(json.dumps({"date": datetime.date.today().isoformat(),
                                   "machine": f"{platform.machine()}, 2 cores", "rows": rows}, indent=1))  # fmt: skip
    if args.fit:
        from sigmma_sc.train._memory import CELL_COEF, EDGE_COEF, INFERENCE_COEF

        a = np.array([r["terms"] for r in rows])
        y = np.array([r["measured"] for r in rows], dtype=float)
        w = 1 / y  # relative errors
        coef = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)[0]
        print(
            f"least-squares coefficients (relative error): edge {coef[0]:.2f}, cell {coef[1]:.2f}; "
            f"in use: edge {EDGE_COEF}, cell {CELL_COEF}"
        )
        ratio = [r["inference_measured"] / r["terms"][0] for r in rows]
        print(f"inference peak / edge term: {min(ratio):.2f}-{max(ratio):.2f}; in use: {INFERENCE_COEF}")


if __name__ == "__main__":
    main()
