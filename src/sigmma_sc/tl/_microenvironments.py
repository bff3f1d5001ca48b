"""``sg.tl.microenvironments``: Leiden clusters of each cell's per-scale SIGMMA embedding."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import SCALES, Keys
from .._docs import doc_params, doc_seed, doc_use_rep
from .._utils._record import embedding_keys, missing_embedding, read_record
from .._utils._validate import get_table
from .._utils._write import save_outputs, save_record
from ._records import resolve_seed

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: default Leiden resolution per scale (``resolution=None``), chosen on the demo section (BENCHMARKS)
RESOLUTION: dict[str, float] = {"micro": 0.5, "meso": 0.2, "macro": 0.1}


@doc_params(use_rep=doc_use_rep, seed=doc_seed)
def microenvironments(
    sdata: SpatialData,
    *,
    scale: str | Sequence[str] | None = None,
    table_key: str = "table",
    use_rep: str = Keys.PREFIX,
    resolution: float | None = None,
    n_neighbors: int = 15,
    seed: int | None = 0,
    key_added: str | None = None,
    inplace: bool = True,
) -> dict[str, pd.Categorical] | None:
    """Cluster cells into microenvironments with Leiden on their SIGMMA embedding at each scale.

    A k-nearest-neighbour graph of the embedding (:func:`scanpy.pp.neighbors`, cosine metric, since the
    embeddings are L2-normalised) is clustered with :func:`scanpy.tl.leiden` (igraph flavour). Untiled cells
    (no embedding) get a missing label.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.embed`.
    scale
        Scale(s) to cluster: ``'micro'``, ``'meso'``, ``'macro'`` or several; default: every scale embedded.
    table_key
        Cell table.
    {use_rep}
        Or a full ``.obsm`` key of cell embeddings (scanpy's meaning; with ``{scale}`` for several scales).
    resolution
        Leiden resolution (higher: more microenvironments). Default: per scale, micro 0.5, meso 0.2, macro 0.1
        (coarser scales describe larger, fewer domains; at one resolution they give more clusters), chosen on the
        demo section (BENCHMARKS, "Cell maps").
        The resolution and number of microenvironments of each scale are logged.
    n_neighbors
        Neighbours of the embedding graph.
    {seed}
    key_added
        Stem of the label columns: scale ``s`` is written to ``.obs[f'{key_added}_{s}']``
        (``Keys.microenvironments(key_added)``, see :doc:`/keys`). Default
        ``f'{use_rep}_microenv'``. A ``{scale}`` template (the older form) still works, with a ``FutureWarning``.
    inplace
        Write into the cell table and return ``None``; otherwise return scale -> labels and leave ``sdata``
        unchanged.

    Returns
    -------
    ``None`` if ``inplace``, else scale -> labels. In place, writes into the cell table:

    `.obs['sigmma_microenv_{scale}' | key_added]`
        Microenvironment of each cell (categorical; missing for untiled cells), for each scale.
    `.uns['sigmma' | use_rep]['microenvironments']`
        Leiden resolution, neighbours, seed, and under ``'keys'`` scale -> ``.obs`` key of every scale
        clustered so far (readers such as :func:`sigmma_sc.pl.microenvironments` find the labels there).
    """
    import anndata as ad
    import scanpy as sc

    cells = get_table(sdata, table_key)
    scales = _scales(cells, scale, use_rep)
    if resolution is not None and not (isinstance(resolution, int | float) and resolution > 0):
        raise ValueError(f"`resolution` must be a positive number or None (per-scale defaults), got {resolution!r}.")
    obs_keys = _label_keys(key_added, use_rep, scales)
    rep_keys = _cell_embedding_keys(cells, use_rep, scales, table_key)
    seed = resolve_seed(seed)
    out: dict[str, pd.Categorical] = {}
    used: dict[str, float] = {}
    for s in scales:
        key = rep_keys[s]
        Z = np.asarray(cells.obsm[key])
        ok = np.isfinite(Z).all(1)
        if ok.sum() < 3:
            raise ValueError(f"Fewer than 3 cells have a {s} embedding; nothing to cluster.")
        tmp = ad.AnnData(obsm={"X": Z[ok]}, obs=pd.DataFrame(index=cells.obs_names[ok]))
        k = min(n_neighbors, int(ok.sum()) - 1)
        sc.pp.neighbors(
            tmp, use_rep="X", n_neighbors=k, metric="cosine", transformer=_knn_transformer(int(ok.sum()), k, seed)
        )
        res = RESOLUTION[s] if resolution is None else float(resolution)
        sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        labels = np.full(cells.n_obs, None, dtype=object)
        labels[ok] = tmp.obs["leiden"].astype(str).to_numpy()
        cats = sorted(tmp.obs["leiden"].astype(str).unique(), key=int)
        out[s] = pd.Categorical(labels, categories=cats)
        used[s] = res
        logger.info("%s scale: %d microenvironments over %d cells (Leiden resolution %g).", s, len(cats), int(ok.sum()), res)
    if not inplace:
        return out
    save_outputs(cells, "obs", {obs_keys[s]: labels for s, labels in out.items()}, table=table_key,
                 what="microenvironments")  # fmt: skip
    previous = read_record(cells, use_rep, "microenvironments") or {}
    save_record(
        cells,
        use_rep,
        "microenvironments",
        {
            "resolution": {**(before if isinstance(before := previous.get("resolution"), Mapping) else {}), **used},
            "n_neighbors": n_neighbors,
            "seed": seed,
            "scales": list(scales),
            "keys": {**dict(previous.get("keys") or {}), **obs_keys},
            "use_rep": {**dict(previous.get("use_rep") or {}), **rep_keys},
        },
        table=table_key,
    )
    return None


def _label_keys(key_added: str | None, use_rep: str, scales: tuple[str, ...]) -> dict[str, str]:
    """Scale -> ``.obs`` key of the labels: ``f'{key_added}_{scale}'`` (a ``{scale}`` template: FutureWarning)."""
    if key_added is None or "{scale}" not in key_added:
        return Keys.microenvironments(key_added, scales, use_rep=use_rep)
    stem = key_added.replace("{scale}", "").strip("_")
    warnings.warn(
        f"`key_added` of `sg.tl.microenvironments` is the stem of the label columns (`f'{{key_added}}_{{scale}}'`, "
        f"see docs/keys.md); a `{{scale}}` template is deprecated. Pass e.g. `key_added={stem!r}`.",
        FutureWarning,
        stacklevel=3,
    )
    return {s: key_added.format(scale=s) for s in scales}


def _scales(cells, scale: str | Sequence[str] | None, use_rep: str) -> tuple[str, ...]:
    """The scales to cluster: those asked for (checked against the scales embedded), or every scale embedded."""
    record = read_record(cells, use_rep, "embed") or {}
    trained = tuple((record.get("config") or {}).get("scales") or ())
    if scale is None:
        embedded = tuple(s for s in SCALES if s in embedding_keys(cells, use_rep, "cell", SCALES))
        return embedded or trained or SCALES  # nothing embedded: the error of the first scale names the fix
    scales = (scale,) if isinstance(scale, str) else tuple(scale)
    if not scales or set(scales) - set(SCALES):
        raise ValueError(f"`scale` must be among {SCALES}, got {scale!r}.")
    untrained = [s for s in scales if trained and s not in trained]
    if untrained:
        raise ValueError(
            f"The model behind `use_rep={use_rep!r}` was trained at scale(s) {trained} only, so it embedded no cells "
            f"at {untrained}. Pass `scale=` among {trained} (or leave `scale=None`), or train a model at these scales."
        )
    return scales


def _cell_embedding_keys(cells, use_rep: str, scales: tuple[str, ...], table_key: str) -> dict[str, str]:
    """Scale -> ``.obsm`` key of the cell embeddings of ``use_rep`` (an embed prefix, or an ``.obsm`` key)."""
    recorded = embedding_keys(cells, use_rep, "cell", scales)
    out = {}
    for s in scales:
        if s in recorded:
            out[s] = recorded[s]
        elif use_rep.format(scale=s) in cells.obsm:
            out[s] = use_rep.format(scale=s)
        elif read_record(cells, use_rep, "embed") is not None:
            raise KeyError(f"`sg.tl.embed(..., key_added={use_rep!r})` wrote no {s!r} cell embedding (the model's "
                           "scales differ); choose `scale=` among the scales it wrote.")  # fmt: skip
        else:
            raise missing_embedding(table_key, use_rep, cells, "cell embeddings")
    return out


#: up to this many cells the k-NN search is exact (brute force: ~7 s for 15,000 cells on 2 cores, growing with
#: the square of the number of cells); above it approximate (pynndescent, ~40 s of numba compilation once)
EXACT_KNN_MAX_CELLS = 20_000


def _knn_transformer(n_obs: int, n_neighbors: int, seed: int):
    """The k-NN search: exact up to :data:`EXACT_KNN_MAX_CELLS` cells, else pynndescent as a ``csr_matrix``.

    Exact search (scanpy's ``'sklearn'`` transformer) is both better and faster than pynndescent on tens of
    thousands of cells, whose numba kernels take most of a minute to compile on first use. Above the limit
    scanpy's default pynndescent search runs, wrapped: its ``csr_array`` output breaks scanpy 1.11's
    ``getnnz`` call under scipy >= 1.17, so the same transformer (UMAP's defaults, as scanpy sets them)
    is wrapped and its output converted.
    """
    if n_obs <= EXACT_KNN_MAX_CELLS:
        return "sklearn"
    from pynndescent import PyNNDescentTransformer
    from scipy import sparse
    from sklearn.base import BaseEstimator, TransformerMixin

    class _CSRMatrixKNN(TransformerMixin, BaseEstimator):
        def __init__(self, n_neighbors: int = 15, metric: str = "cosine", random_state: int = 0):
            self.n_neighbors = n_neighbors
            self.metric = metric
            self.random_state = random_state

        def _inner(self):
            return PyNNDescentTransformer(
                n_neighbors=self.n_neighbors,
                metric=self.metric,
                random_state=self.random_state,
                n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
                n_iters=max(5, round(np.log2(n_obs))),
            )

        def fit(self, X, y=None):
            self.inner_ = self._inner().fit(X)
            return self

        def transform(self, X):
            return sparse.csr_matrix(self.inner_.transform(X))

        def fit_transform(self, X, y=None):
            self.inner_ = self._inner()
            return sparse.csr_matrix(self.inner_.fit_transform(X))

    return _CSRMatrixKNN(n_neighbors=n_neighbors, metric="cosine", random_state=seed)
