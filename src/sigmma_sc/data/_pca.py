"""PCA of log-normalised counts: the default node features of the cell graphs (fitted on training cells)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import sparse


def _sparse_is_faster(X: sparse.csr_matrix) -> bool:
    """Sparse products beat densify-then-BLAS below ~5% non-zeros (e.g. Xenium's ~10 counts per cell)."""
    return X.nnz < 0.05 * X.shape[0] * X.shape[1]


def _log_normalise(counts: sparse.csr_matrix, target_sum: float) -> sparse.csr_matrix:
    lib = np.add.reduceat(counts.data, counts.indptr[:-1]) if counts.nnz else np.zeros(counts.shape[0])
    lib = np.where(np.diff(counts.indptr) > 0, lib, 0)  # reduceat repeats the next value for empty rows
    scale = np.divide(target_sum, lib, out=np.zeros(lib.shape, dtype=np.float64), where=lib > 0).astype(np.float32)
    data = np.log1p(counts.data * np.repeat(scale, np.diff(counts.indptr)))
    # share indices/indptr with the counts: only the values are new
    return sparse.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape, copy=False)


def _single_threaded_blas(func):
    """Run ``func`` with one BLAS thread.

    These products are small, and a multi-threaded BLAS spins badly when other processes share the cores
    (measured here: a 200x200 ``eigh`` took 0.6 s instead of ~10 ms).
    """
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return func(*args, **kwargs)

    return wrapper


@_single_threaded_blas
def fit_log_pca(
    counts: sparse.csr_matrix, fit_mask: np.ndarray, n_comps: int, *, max_cells: int = 20_000, seed: int = 0
) -> dict[str, Any]:
    """Fit a PCA of log-normalised counts on the rows in ``fit_mask``.

    Counts are scaled to the median library size of the fitted rows and ``log1p``-transformed. At most
    ``max_cells`` fitted rows (a seeded random subset) enter the covariance: the leading components of a
    20,000-cell sample match those of all cells closely, and the cost no longer grows with the section.
    Returns ``{'target_sum', 'mean', 'components'}`` (``components``: genes x comps), for :func:`apply_log_pca`.
    """
    rows = np.flatnonzero(fit_mask)
    if rows.size < 2:
        raise ValueError("Fewer than 2 cells lie in training tiles; cannot fit the PCA of node features.")
    if rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    sub = counts[rows]
    lib = np.asarray(sub.sum(1)).ravel()
    target = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
    Xf = _log_normalise(sub, target)
    n_comps = int(min(n_comps, Xf.shape[1] - 1, Xf.shape[0] - 1))
    if n_comps < 1:
        raise ValueError("Too few genes or training cells for a PCA of node features; pass `features=` instead.")
    mean = np.asarray(Xf.mean(0)).ravel()
    if Xf.shape[1] <= 2000:  # exact: eigendecomposition of the gene covariance
        gram = (Xf.T @ Xf).toarray() if _sparse_is_faster(Xf) else (lambda d: d.T @ d)(Xf.toarray())
        cov = gram.astype(np.float64) / Xf.shape[0] - np.outer(mean, mean)
        _, evecs = np.linalg.eigh(cov)
        comps = evecs[:, ::-1][:, :n_comps]
    else:  # whole-transcriptome panels: randomized SVD of the centred sample
        from sklearn.utils.extmath import randomized_svd

        _, _, vt = randomized_svd(Xf.toarray() - mean, n_comps, random_state=seed)
        comps = vt.T
    # deterministic sign: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.abs(comps).argmax(0), np.arange(n_comps)])
    comps = comps * np.where(signs == 0, 1, signs)
    return {"target_sum": target, "mean": mean.astype(np.float32), "components": comps.astype(np.float32)}


@_single_threaded_blas
def apply_log_pca(counts: sparse.csr_matrix, pca: Mapping[str, Any], *, chunk: int = 65_536) -> np.ndarray:
    """Project counts onto a PCA from :func:`fit_log_pca`.

    Panels of up to 2,000 genes are projected in dense row chunks (BLAS), larger ones as sparse products.
    """
    X = _log_normalise(counts, float(pca["target_sum"]))
    comps = np.asarray(pca["components"], dtype=np.float32)
    offset = np.asarray(pca["mean"], dtype=np.float32) @ comps
    if X.shape[1] > 2000 or _sparse_is_faster(X):
        return (np.asarray(X @ comps) - offset).astype(np.float32)
    out = np.empty((X.shape[0], comps.shape[1]), dtype=np.float32)
    for start in range(0, X.shape[0], chunk):
        out[start : start + chunk] = X[start : start + chunk].toarray() @ comps - offset
    return out
