"""Paired bootstrap over evaluation tiles: a CI for each metric and for the difference of two embeddings.

Every metric is recomputed on each resample of the tiles (drawn with replacement, ``n`` of ``n``), never
averaged from fixed per-tile numbers where the metric is not a per-tile mean:

- Recall@p% (:class:`RecallMetric`): the resampled tiles are both the queries and the gallery (paired:
  a tile drawn twice is two queries and two gallery entries); ``K = floor(p * n)``; a query's own partner
  counts once however often it was drawn, the other gallery entries with their multiplicity.
- gene-wise PCC (:class:`GenePccMetric`): each gene's correlation across the resampled tiles, then the mean
  over genes.
- tile-level PCC and MSE, or any per-tile score (:class:`MeanMetric`): the mean over the resampled tiles.

Two embeddings are compared on the same resamples (the same tiles drawn), so the CI of their difference
is paired. The probes are not refitted: the CI is over the evaluation tiles given the fitted probe.

Tiles are not independent (neighbouring tiles look alike), so these intervals, like any bootstrap over
units, are narrower than intervals over independent sections would be; compare embeddings on the same
tiles, where the shared tile-to-tile variation cancels in the paired difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ._retrieval import DEFAULT_FRACTIONS, _l2, recall_label

#: bootstrap resamples of ``sg.metrics.evaluate`` (``compare`` and ``graph_reliance`` default to 2000)
DEFAULT_N_BOOT = 1000
_CHUNK = 256  # resamples per matrix product


class MeanMetric:
    """Mean over the tiles of a per-tile score (NaN scores are skipped, as ``np.nanmean`` does).

    Parameters
    ----------
    values
        ``(n,)`` per-tile scores.
    """

    def __init__(self, values: np.ndarray):
        self.v = np.asarray(values, dtype=np.float64).reshape(-1)
        self.n = self.v.size

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample; ``counts`` is ``(n, B)``: how often each tile was drawn."""
        ok = np.isfinite(self.v)
        w = counts[ok].astype(np.float64)
        den = w.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, self.v[ok] @ w / np.where(den > 0, den, 1.0), np.nan)


class RecallMetric:
    """Recall@p% of retrieving each query's partner among the targets, as :func:`sigmma_sc.metrics.recall_at`.

    Parameters
    ----------
    query, target
        ``(n, D)`` paired embeddings (row ``i`` of each is tile ``i``).
    p
        Fraction ``p`` of Recall@p%.
    """

    def __init__(self, query: np.ndarray, target: np.ndarray, p: float):
        q, t = np.asarray(query, dtype=np.float64), np.asarray(target, dtype=np.float64)
        if q.ndim != 2 or q.shape != t.shape or q.shape[0] < 2:
            raise ValueError(
                f"`query` and `target` must be (n, D) arrays of one shape, n >= 2; got {q.shape}, {t.shape}."
            )
        if not (np.isfinite(q).all() and np.isfinite(t).all()):
            raise ValueError("`query` and `target` must be finite (NaN embeddings?).")
        if not 0 < p <= 1:
            raise ValueError(f"`p` must be in (0, 1], got {p}.")
        sim = _l2(q) @ _l2(t).T
        own = np.diag(sim)[:, None]
        tol = 1e-9 * np.maximum(1.0, np.abs(own))  # the tie tolerance of recall_at
        off = ~np.eye(sim.shape[0], dtype=bool)  # a query's own partner is never its competitor
        # 0/1 matrices in float32: their products with the draw counts are exact integers (< 2**24), at half the memory
        self.better = ((sim > own + tol) & off).astype(np.float32)
        self.ties = ((np.abs(sim - own) <= tol) & off).astype(np.float32)
        self.p = float(p)
        self.n = sim.shape[0]

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample; ``counts`` is ``(n, B)``: how often each tile was drawn."""
        c = counts.astype(np.float64)
        size = c.sum(0)
        k = np.maximum(1.0, np.floor(self.p * size))
        c32 = counts.astype(np.float32)
        better, ties = (self.better @ c32).astype(np.float64), (self.ties @ c32).astype(np.float64)  # with multiplicity
        score = np.clip((k - better) / (ties + 1.0), 0.0, 1.0)
        return (c * score).sum(0) / size


class GenePccMetric:
    """Mean over genes of each gene's Pearson correlation across the tiles (HEST's ``pearson_mean``).

    Parameters
    ----------
    y_true, y_pred
        ``(n, n_genes)`` targets and predictions.
    """

    def __init__(self, y_true: np.ndarray, y_pred: np.ndarray):
        yt, yp = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
        if yt.ndim != 2 or yt.shape != yp.shape:
            raise ValueError(f"`y_true` and `y_pred` must be (n, n_genes) of one shape, got {yt.shape}, {yp.shape}.")
        self.yt, self.yp = yt - yt.mean(0), yp - yp.mean(0)  # centred: no cancellation in the moments
        self.scale = (self.yt**2).mean(0) * (self.yp**2).mean(0)
        self.n = yt.shape[0]

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample; ``counts`` is ``(n, B)``: how often each tile was drawn."""
        w = (counts / counts.sum(0)).T  # (B, n)
        mt, mp = w @ self.yt, w @ self.yp
        var_t = w @ self.yt**2 - mt**2
        var_p = w @ self.yp**2 - mp**2
        cov = w @ (self.yt * self.yp) - mt * mp
        den = var_t * var_p
        ok = den > 1e-12 * np.maximum(self.scale, 1e-300)  # a gene constant on the resample: undefined, as in HEST
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(ok, cov / np.sqrt(np.where(ok, den, 1.0)), np.nan)
        out = np.full(r.shape[0], np.nan)
        has = ok.any(1)
        out[has] = np.nanmean(r[has], axis=1)
        return out


class FoldMetric:
    """A metric computed within each fold and averaged over folds, weighted by the folds' tiles (k-fold probes).

    Parameters
    ----------
    folds
        ``(index array into the n tiles, metric of those tiles)`` per fold.
    n
        Number of tiles.
    min_tiles
        Fewest tiles of a fold drawn in a resample for its metric to count there (2 for retrieval, which ranks
        among the fold's tiles).
    """

    def __init__(self, folds: Sequence[tuple[np.ndarray, object]], n: int, *, min_tiles: int = 1):
        self.folds = [(np.asarray(i), m) for i, m in folds]
        self.n = int(n)
        self.min_tiles = int(min_tiles)

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample; ``counts`` is ``(n, B)``: how often each tile was drawn."""
        num = np.zeros(counts.shape[1])
        den = np.zeros(counts.shape[1])
        for idx, metric in self.folds:
            c = counts[idx]
            size = c.sum(0).astype(np.float64)
            v = np.full(counts.shape[1], np.nan)
            some = size >= self.min_tiles
            if some.any():
                v[some] = metric.values(c[:, some])
            ok = np.isfinite(v)
            num[ok] += size[ok] * v[ok]
            den[ok] += size[ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def point(metric) -> float:
    """The metric on the tiles as they are (every tile once)."""
    return float(metric.values(np.ones((metric.n, 1)))[0])


def resample_counts(n: int, n_boot: int, seed: int | None) -> np.ndarray:
    """``(n, n_boot)`` how often each of ``n`` tiles is drawn in each of ``n_boot`` resamples of ``n`` tiles."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_boot)).T


def _replicates(metric, counts: np.ndarray) -> np.ndarray:
    return np.concatenate([metric.values(counts[:, i : i + _CHUNK]) for i in range(0, counts.shape[1], _CHUNK)])


def _interval(x: np.ndarray, ci: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def _share(d: np.ndarray) -> float:
    """Two-sided bootstrap share: twice the smaller share of replicates on either side of 0, at most 1."""
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def tile_metrics(
    *,
    image: np.ndarray | None = None,
    st: np.ndarray | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    probes: Sequence[object] = (),
    per_tile: Mapping[str, np.ndarray] | None = None,
) -> dict[str, object]:
    """The metrics of one embedding on ``n`` evaluation tiles, as objects the bootstrap can recompute.

    Parameters
    ----------
    image, st
        ``(n, D)`` paired image and ST embeddings of the tiles (row ``i`` of each is tile ``i``): retrieval
        ``image->st R@p%`` and ``st->image R@p%``.
    fractions
        Fractions ``p`` of Recall@p%.
    probes
        Fitted probes (:class:`~sigmma_sc.metrics.ProbeResult`) scored on these tiles, in this order:
        ``{protocol}_pcc``, ``{protocol}_mse`` (tile-level), ``{protocol}_gene_pcc`` and ``{protocol}_mse_raw``.
    per_tile
        Name -> ``(n,)`` any per-tile score, reported as its mean.

    Returns
    -------
    Metric name (the column names of :func:`sigmma_sc.metrics.evaluate`) -> metric; pass two such mappings on
    the same tiles to :func:`sigmma_sc.metrics.paired_bootstrap`.
    """
    out: dict[str, object] = {}
    if (image is None) != (st is None):
        raise ValueError("Retrieval needs both `image` and `st` embeddings (or neither).")
    if image is not None:
        for direction, (q, t) in (("image->st", (image, st)), ("st->image", (st, image))):
            for p in fractions:
                out[f"{direction} {recall_label(p)}"] = RecallMetric(q, t, p)
    for probe in probes:
        cal = probe.y_pred + probe.train_mean if probe.protocol == "hest" else probe.y_pred
        out[f"{probe.protocol}_pcc"] = MeanMetric(probe.tile_pcc)
        out[f"{probe.protocol}_mse"] = MeanMetric(probe.tile_mse)
        out[f"{probe.protocol}_gene_pcc"] = GenePccMetric(probe.y_true, cal)  # PCC ignores HEST's missing intercept
        out[f"{probe.protocol}_mse_raw"] = MeanMetric(np.mean((probe.y_true - probe.y_pred) ** 2, axis=1))
    for name, v in (per_tile or {}).items():
        out[str(name)] = MeanMetric(v)
    sizes = {m.n for m in out.values()}
    if len(sizes) > 1:
        raise ValueError(f"The metrics are on different numbers of tiles {sorted(sizes)}; pass one set of tiles.")
    return out


def paired_bootstrap(
    a: Mapping[str, object],
    b: Mapping[str, object] | None = None,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
) -> pd.DataFrame:
    """Bootstrap CIs of metrics on ``n`` tiles, or of the paired differences ``a - b`` between two embeddings.

    The tiles are resampled with replacement (``n`` of ``n``) ``n_boot`` times with a fixed seed, and every metric
    is recomputed on each resample (module documentation): for retrieval the gallery is resampled together
    with the queries. With ``b``, both embeddings are scored on the same resamples, so the interval is that of
    the paired difference. Percentile intervals.

    Parameters
    ----------
    a
        Metric name -> metric of the first embedding (:func:`sigmma_sc.metrics.tile_metrics`).
    b
        The same for the second embedding on the same tiles in the same order; ``None``: CIs of ``a`` alone.
    n_boot
        Resamples.
    ci
        Coverage of the intervals.
    seed
        Seed of the resamples.

    Returns
    -------
    One row per metric (those of ``a``, and with ``b`` those in both). Without ``b``: ``metric``, ``value``,
    ``ci_low``, ``ci_high``, ``n_tiles``, ``n_boot``. With ``b``: ``metric``, ``a``, ``b``, ``diff`` (``a - b``),
    ``ci_low``, ``ci_high`` (of the difference), ``p`` (twice the smaller share of resampled differences on
    either side of 0, at most 1: a bootstrap p-value-like share, resolution ``1 / n_boot``; small when the sign
    of the difference survives resampling the tiles), ``n_tiles``, ``n_boot``.
    """
    if int(n_boot) < 1:
        raise ValueError(f"`n_boot` must be >= 1, got {n_boot}.")
    if not 0 < ci < 1:
        raise ValueError(f"`ci` must be in (0, 1), got {ci}.")
    names = [k for k in a if b is None or k in b]
    if not names:
        raise ValueError("No metric to bootstrap" + (" (`a` and `b` share no metric name)." if b else "."))
    sizes = {m.n for m in a.values()} | ({m.n for m in b.values()} if b is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"The metrics are on different numbers of tiles {sorted(sizes)}; compare the same tiles.")
    n = sizes.pop()
    counts = resample_counts(n, n_boot, seed)
    rows = []
    for name in names:
        ra = _replicates(a[name], counts)
        if b is None:
            lo, hi = _interval(ra, ci)
            rows.append({"metric": name, "value": point(a[name]), "ci_low": lo, "ci_high": hi})
        else:
            d = ra - _replicates(b[name], counts)
            pa, pb = point(a[name]), point(b[name])
            lo, hi = _interval(d, ci)
            rows.append(
                {"metric": name, "a": pa, "b": pb, "diff": pa - pb, "ci_low": lo, "ci_high": hi, "p": _share(d)}
            )
    df = pd.DataFrame(rows)
    df["n_tiles"] = n
    df["n_boot"] = int(n_boot)
    return df
