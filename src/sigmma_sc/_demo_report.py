"""What ``sigmma demo`` tells its user at the end: the held-out score against chance, and a JSON summary.

The summary is the one source of the demo's numbers that the docs quote (``benchmarks/demo.py`` renders
BENCHMARKS.md's demo paragraph from it, and a test checks that the two agree).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._constants import SPLITS, Keys

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from .model import SigmmaModel

#: Recall@p% reported by the demo (the quick start's and the paper's fractions)
FRACTIONS = (5, 10, 15)
#: The demo's time, stated once: README.md and docs/installation.md quote this sentence (a test checks), the demo's
#: log repeats it next to the time it took. Measured on a quiet machine (BENCHMARKS.md, "The demo").
DEMO_TIME = "about 4.5 minutes on a quiet 2-core CPU"


def chance(n: int, p: float) -> float:
    """Recall@p% of uninformative embeddings among ``n`` tiles: ``K / n`` with ``K = max(1, floor(p n / 100))``."""
    return max(1, math.floor(p / 100 * n)) / n


def demo_summary(sdata: SpatialData, model: SigmmaModel, *, settings: dict, timings: dict[str, float]) -> dict:
    """The demo's results as plain JSON types: held-out test retrieval against chance, training, time, machine."""
    import torch

    from . import __version__
    from .metrics import cross_modal_retrieval

    tiles = sdata.tables[Keys.TILE_TABLE]
    split = tiles.obs[Keys.SPLIT].astype(str).to_numpy()
    scores = cross_modal_retrieval(sdata, split="test", fractions=[p / 100 for p in FRACTIONS])
    n_test = int(scores["n"].iloc[0])
    rows = [
        {"scale": r["scale"], "direction": r["direction"], **{f"R@{p}%": float(r[f"R@{p}%"]) for p in FRACTIONS}}
        for _, r in scores.iterrows()
    ]
    history, diag = model.history or [], model.diagnostics or {}
    kept = int(diag.get("best_epoch", 0) or 0)

    def at(epoch: int, key: str) -> float | None:
        value = history[epoch - 1].get(key) if history and 1 <= epoch <= len(history) else None
        return None if value is None else float(value)

    training = {
        "steps": int(diag.get("steps", 0) or 0),
        "epochs": len(history),
        "stopped": diag.get("stopped"),
        "kept_epoch": kept,
        "select_by": diag.get("select_by"),
        "train_loss_first": at(1, "train_loss"),
        "train_loss_last": at(len(history), "train_loss"),
        "val_loss_first": at(1, "val_loss"),
        "val_loss_kept": at(kept, "val_loss"),
        "val_loss_last": at(len(history), "val_loss"),
        "val_loss_chance": at(kept, "val_chance"),
        "val_rank_kept": at(kept, "val_rank"),
        "val_rank_chance": 0.5,
        "warnings": [str(w) for w in diag.get("warnings", [])],
        "collapsed": _collapsed(diag),
    }
    return {
        "generated_by": "sigmma demo",
        "version": __version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "settings": settings,
        "tiles": {s: int((split == s).sum()) for s in SPLITS},
        "training": training,
        "test_retrieval": {
            "n": n_test,
            "chance": {f"R@{p}%": chance(n_test, p) for p in FRACTIONS},
            "rows": rows,
        },
        "timings_s": {k: round(float(v), 1) for k, v in timings.items()},
        "machine": {
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }


def _collapsed(diag: dict) -> list[str]:
    """The embeddings that the collapse check flagged (``'image meso'``, ...), from the recorded health numbers."""
    from .train._diagnostics import COLLAPSE_COSINE, COLLAPSE_PR

    cos, pr = diag.get("mean_cosine") or {}, diag.get("participation_ratio") or {}
    return [k.replace("_", " ") for k in cos if cos[k] > COLLAPSE_COSINE or pr.get(k, math.inf) < COLLAPSE_PR]


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def format_summary(summary: dict) -> str:
    """The lines ``sigmma demo`` prints at its end (plain text)."""
    test, tr = summary["test_retrieval"], summary["training"]
    n, ch = test["n"], test["chance"]
    both = {r["direction"]: r for r in test["rows"] if r["scale"] == "all"}
    fr = "/".join(str(p) for p in FRACTIONS)

    def row(values) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    ks = ", ".join(str(max(1, math.floor(p / 100 * n))) for p in FRACTIONS)
    lines = [
        f"Held-out test tiles ({n} tiles in regions no training tile touches; all scales), R@{fr}%:",
        *(
            f"  {label:<16}{row(both[d][f'R@{p}%'] for p in FRACTIONS)}"
            for d, label in (("image->st", "image -> cells"), ("st->image", "cells -> image"))
            if d in both
        ),
        f"  {'chance':<16}{row(ch[f'R@{p}%'] for p in FRACTIONS)}   (the partner among the top K = {ks} of {n})",
    ]
    if "image->st" in both and "st->image" in both:
        r10 = [both[d]["R@10%"] / ch["R@10%"] for d in ("image->st", "st->image")]
        lines.append(f"  R@10% is {r10[0]:.1f}x (image -> cells) and {r10[1]:.1f}x (cells -> image) chance.")
    if tr.get("kept_epoch"):
        lines.append(
            f"Training: {tr['steps']} optimiser steps ({tr['stopped']}); kept the weights of epoch {tr['kept_epoch']} "
            f"of {tr['epochs']} by validation retrieval (partner rank {tr['val_rank_kept']:.3f}; chance 0.5)."
        )
    if any("collapsed" in w for w in tr.get("warnings", [])):
        which = f"the {', '.join(tr['collapsed'])} embeddings" if tr.get("collapsed") else "some embeddings"
        lines.append(
            f"About the 'collapsed' warning: on the {summary['tiles']['val']} validation tiles {which} point in nearly one direction or spread over only a few "
            "dimensions, so at those scales tiles are told apart along one or two axes. It is a flag, not an error: "
            "the held-out scores above are what the model achieves with it. It comes with this small section and "
            "short CPU budget; on your own data follow its advice and compare the validation retrieval."
        )
    last, chance_loss = tr.get("val_loss_last"), tr.get("val_loss_chance")
    first_train, last_train = tr.get("train_loss_first"), tr.get("train_loss_last")
    fitted = first_train is not None and last_train is not None and last_train < 0.5 * first_train
    if fitted and last is not None and chance_loss is not None and last > chance_loss:
        lines.append(
            f"About the validation loss: it ends at {last:.1f}, above its chance level {chance_loss:.1f}, while "
            f"the training loss fell {tr['train_loss_first']:.1f} -> {tr['train_loss_last']:.2f}: the model fits "
            f"its {summary['tiles']['train']} training tiles closely and is over-confident on the held-out tiles it "
            "gets wrong, which the contrastive loss punishes hard. Which tile ranks first is what retrieval scores, "
            "so the weights were kept by validation retrieval, and the test scores above are the ones to read."
        )
    t = summary["timings_s"]
    parts = ", ".join(f"{k} {_minutes(v)}" for k, v in t.items() if k != "total")
    machine = summary["machine"]
    busy = machine.get("load_average_1min_end")
    note = ""
    if busy is not None and busy > machine["cpus"]:
        note = f"; the machine was busy (load average {busy:.1f} on {machine['cpus']} CPUs at the end)"
    expected = f"; with these settings it takes {DEMO_TIME}" if summary["settings"].get("demo_defaults") else ""
    lines.append(f"Took {_minutes(t['total'])} ({parts}){expected}{note}.")
    return "\n".join(lines)


def summary_path(out: str | Path) -> Path:
    """Where the demo writes its JSON summary: next to the zarr, ``<out stem>.summary.json``."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.zarr')}.summary.json")


def write_summary(summary: dict, path: str | Path) -> None:
    """Write the summary as indented JSON (atomically: a temporary file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
