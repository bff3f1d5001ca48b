"""Helpers shared by the graph benchmarks (``paper_table.py``, ``arrangement.py``, ``split_buffer.py``).

- :func:`common_args`: the training and bootstrap flags every one of them takes (``--seeds``, ``--threads``,
  ``--n-boot``);
- per-tile arrays of one trained run on the evaluation tiles (:func:`run_arrays`), turned back into
  ``sg.metrics.tile_metrics`` objects (:func:`metrics_of`), so that a finished run can be re-scored;
- paired comparisons of two rows over several seeds (and, with spatial k-fold, several folds) through
  ``sg.metrics.paired_bootstrap`` (:func:`paired_rows`). **Pooling:** on each bootstrap resample of the
  evaluation tiles, every seed's metric is recomputed on that resample and the metric is averaged over the seeds
  (:class:`SeedMean`); with folds, each fold's metric is computed among the fold's resampled tiles and the folds
  are averaged weighted by their resampled tiles (the k-fold pooling of ``sg.metrics``, ``FoldMetric`` with
  ``min_tiles=2``: retrieval ranks among the tiles of one fold). The interval is that of the difference of the two rows' seed means; both rows are recomputed on the
  same resamples.
"""

# Private import on purpose: sigmma_sc.metrics._bootstrap.FoldMetric (the package's k-fold pooling of a metric).

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np

SCALES = ("micro", "meso", "macro")
#: the metrics compared between rows: (column of ``sg.metrics.evaluate``, label)
PAIRED_METRICS = (
    ("image->st R@10%", "I→ST R@10%"),
    ("st->image R@10%", "ST→I R@10%"),
    ("paper_pcc", "paper tile PCC"),
    ("hest_gene_pcc", "HEST gene PCC"),
)


def common_args(p: argparse.ArgumentParser, *, seeds: Sequence[int] = (0, 1, 2), threads: int | None = 1) -> None:
    """Add ``--seeds``, ``--threads`` and ``--n-boot`` (bootstrap resamples of the paired CIs) to a parser."""
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    p.add_argument("--n-boot", "--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired CIs")


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_arrays(tiles, written: Mapping[str, Mapping[str, str]], mask: np.ndarray, probes: Sequence) -> dict:
    """Per-tile arrays of one run on the evaluation tiles ``mask``, enough to recompute its metrics.

    ``written`` is the record ``sg.tl.embed`` keeps of its keys (``{'image': {scale: key}, 'st': {...}}``); the
    retrieval embedding is built as ``sg.metrics.evaluate`` builds it (one scale as stored, several L2-normalised per
    scale and concatenated). ``probes`` are ``sg.metrics.linear_probe`` results on the same tiles.
    """
    scales = [s for s in SCALES if s in written["image"] and s in written["st"]]
    out: dict[str, np.ndarray] = {}
    for kind in ("image", "st") if scales else ():
        parts = [np.asarray(tiles.obsm[written[kind][s]], dtype=np.float64)[mask] for s in scales]
        out[kind] = parts[0] if len(parts) == 1 else np.hstack([_l2(x) for x in parts])
    for pr in probes:
        out[f"{pr.protocol}|y_true"] = np.asarray(pr.y_true, dtype=np.float64)
        out[f"{pr.protocol}|y_pred"] = np.asarray(pr.y_pred, dtype=np.float64)
        out[f"{pr.protocol}|train_mean"] = np.asarray(pr.train_mean, dtype=np.float64)
        out[f"{pr.protocol}|tile_pcc"] = np.asarray(pr.tile_pcc, dtype=np.float64)
        out[f"{pr.protocol}|tile_mse"] = np.asarray(pr.tile_mse, dtype=np.float64)
    return out


def metrics_of(arrays: Mapping[str, np.ndarray]) -> dict[str, object]:
    """``sg.metrics.tile_metrics`` of one run's arrays (:func:`run_arrays`)."""
    import sigmma_sc as sg

    probes = []
    for protocol in ("paper", "hest"):
        if f"{protocol}|y_true" in arrays:
            probes.append(
                SimpleNamespace(
                    protocol=protocol,
                    **{k: np.asarray(arrays[f"{protocol}|{k}"]) for k in ("y_true", "y_pred", "train_mean")},
                    **{k: np.asarray(arrays[f"{protocol}|{k}"]) for k in ("tile_pcc", "tile_mse")},
                )
            )
    return sg.metrics.tile_metrics(image=arrays.get("image"), st=arrays.get("st"), probes=probes)


class SeedMean:
    """One metric averaged over seeds (or models) on each resample of the same tiles (duck-types sg.metrics')."""

    def __init__(self, metrics: Sequence[object]):
        sizes = {m.n for m in metrics}
        if len(sizes) != 1:
            raise ValueError(f"The seeds' metrics are on different numbers of tiles {sorted(sizes)}.")
        self.metrics = list(metrics)
        self.n = sizes.pop()

    def values(self, counts: np.ndarray) -> np.ndarray:
        return np.mean([m.values(counts) for m in self.metrics], axis=0)


def pooled_metrics(runs: Sequence[Sequence[Mapping[str, np.ndarray]]], names: Sequence[str]) -> dict[str, object]:
    """Metric name -> seed-averaged (and fold-pooled) metric of one row.

    ``runs[seed][fold]`` are the arrays of one seed on one fold's evaluation tiles (one fold: the test split).
    """
    from sigmma_sc.metrics._bootstrap import FoldMetric

    per_seed = []
    for folds in runs:
        ms = [metrics_of(a) for a in folds]
        if len(ms) == 1:
            per_seed.append(ms[0])
            continue
        sizes = [next(iter(m.values())).n for m in ms]
        starts = np.cumsum([0, *sizes])
        per_seed.append(
            {
                k: FoldMetric(
                    [(np.arange(starts[f], starts[f + 1]), ms[f][k]) for f in range(len(ms))],
                    int(starts[-1]),
                    min_tiles=2,
                )
                for k in names
                if all(k in m for m in ms)
            }
        )
    common = [k for k in names if all(k in m for m in per_seed)]
    return {k: SeedMean([m[k] for m in per_seed]) for k in common}


def paired_rows(
    store: Mapping[str, Sequence[Sequence[Mapping[str, np.ndarray]]]],
    pairs: Sequence[tuple[str, str]],
    *,
    metrics: Sequence[tuple[str, str]] = PAIRED_METRICS,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """Paired bootstrap CIs of ``a - b`` for each pair of rows in ``store`` (row -> seeds -> folds -> arrays)."""
    import sigmma_sc as sg

    names = [m for m, _ in metrics]
    out = []
    for a, b in pairs:
        if a not in store or b not in store:
            continue
        ma, mb = pooled_metrics(store[a], names), pooled_metrics(store[b], names)
        df = sg.metrics.paired_bootstrap(ma, mb, n_boot=n_boot, seed=seed)
        for r in df.itertuples():
            out.append(
                {"a": a, "b": b, "metric": r.metric, "value_a": r.a, "value_b": r.b, "diff": r.diff,
                 "ci_low": r.ci_low, "ci_high": r.ci_high, "p": r.p, "n_tiles": int(r.n_tiles),
                 "n_seeds": min(len(store[a]), len(store[b])), "n_boot": int(n_boot)}
            )  # fmt: skip
    return out


def verdict(r: Mapping[str, float], margin: float | None = None) -> str:
    """Reading of one paired CI: which row is ahead, or equal within ``margin``, or undetermined."""
    lo, hi = r["ci_low"], r["ci_high"]
    if lo > 0:
        return "a higher"
    if hi < 0:
        return "b higher"
    if margin is not None and -margin < lo and hi < margin:
        return f"equal within ±{margin:g}"
    return "undetermined"


def save_arrays(path, store: Mapping[str, Sequence[Sequence[Mapping[str, np.ndarray]]]]) -> None:
    """Write ``store`` (row -> seeds -> folds -> arrays) to one ``.npz``."""
    flat = {}
    for row, seeds in store.items():
        for i, folds in enumerate(seeds):
            for f, arrays in enumerate(folds):
                for k, v in arrays.items():
                    flat[f"{row}/{i}/{f}/{k}"] = np.asarray(v, dtype=np.float32)
    np.savez_compressed(path, **flat)


def load_arrays(path) -> dict[str, list[list[dict[str, np.ndarray]]]]:
    """Read what :func:`save_arrays` wrote."""
    store: dict[str, dict[int, dict[int, dict[str, np.ndarray]]]] = {}
    with np.load(path) as z:
        for key in z.files:
            row, i, f, k = key.split("/", 3)
            store.setdefault(row, {}).setdefault(int(i), {}).setdefault(int(f), {})[k] = z[key].astype(np.float64)
    return {row: [[folds[f] for f in sorted(folds)] for _, folds in sorted(s.items())] for row, s in store.items()}
