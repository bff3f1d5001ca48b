"""Gene-expression prediction by linear probing of tile embeddings (paper Suppl. D.2; HEST-Benchmark).

Which tiles each step sees
--------------------------
Only tiles with cells take part. Every fitted quantity comes from the **training** tiles alone: the
normalisation constant, the gene filter and the highly variable genes, the scaler, the PCA and the ridge
coefficients. The **validation** tiles only choose the ridge penalty of the paper protocol (HEST fixes it).
The **test** tiles only receive predictions and scores. Changing anything about the test tiles (their
embeddings or their counts) cannot change the genes, the PCA, the penalty or the coefficients; the test
suite checks this by perturbing them.

HEST-Benchmark deviates on one point: it selects its 50 genes on every spot of every sample, test spots
included. Here they are selected on the training tiles only, so that the test tiles stay unseen.

MSE without an intercept
------------------------
HEST fits ``Ridge(fit_intercept=False)`` on PCA scores. The PCA centres the training embeddings, so the
training design has zero column means, the ridge coefficients are exactly those of a ridge *with* intercept,
and the predictions are those of the intercept model minus the training mean of each gene:
``y_hat_hest = y_hat - mean_train(y)``. Gene-wise Pearson correlation ignores a per-gene shift, so HEST's
headline metric is unaffected; but MSE is inflated by about ``mean_train(y_g) ** 2`` per gene (log1p counts
of summed tile counts have means of several units, so the squared bias dwarfs the residual), and tile-level
PCC across genes is scrambled. :func:`linear_probe` therefore reports, for the HEST protocol, the
gene-wise PCC exactly as HEST computes it, the raw HEST MSE as ``mse_raw``, and tile-level PCC/MSE of the
predictions with the training mean added back (``y_hat_hest + mean_train(y)``, identical to a ridge with
intercept and the same penalty), which is what ``mse`` and ``pcc`` mean in both protocols.

Few tiles
---------
HEST's penalty ``100 / (n_components * n_genes)`` was set for thousands of spots. With fewer training tiles
than 256, the PCA keeps ``n_train`` components, the penalty is about ``2 / n_train`` and the ridge
(nearly) interpolates the training tiles: high-dimensional inputs (a 1280-d frozen backbone) then probe far
worse than low-dimensional ones (a 128-d embedding) for reasons unrelated to their content. Compare HEST
numbers across embeddings of different widths only when ``n_train`` clearly exceeds ``n_components``; the
paper protocol, whose penalty is chosen on validation tiles, does not have this problem.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import Keys
from ._retrieval import split_mask, tile_table, too_few_tiles_hint

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 5, 17))
_CONTROL_PATTERNS = ("BLANK", "NegControl", "Control", "DeprecatedCodeword", "Unassigned", "UnassignedCodeword")


@dataclass
class ProbeResult:
    """A fitted linear probe and its scores on the evaluation tiles.

    Attributes
    ----------
    protocol
        ``'paper'`` or ``'hest'``.
    embedding
        Name of the embedding (the key(s) it came from).
    genes
        Target genes (chosen on training tiles).
    alpha
        Ridge penalty used.
    val_mse
        Paper protocol: validation MSE of each candidate penalty (``alpha -> MSE``); empty for HEST.
    n_components
        PCA components actually used (``min(n_components, n_train, n_features)``).
    tiles
        ``'train'`` / ``'val'`` / ``eval_split`` -> names of the tiles used in each role.
    coef
        ``(n_genes, n_components)`` ridge coefficients.
    intercept
        ``(n_genes,)`` ridge intercept (zeros for HEST, which fits none).
    train_mean
        ``(n_genes,)`` mean target of the training tiles.
    y_true, y_pred
        ``(n_eval, n_genes)`` targets and predictions of the evaluation tiles (``y_pred`` as the protocol's
        regressor outputs it: for HEST without intercept).
    tile_pcc, tile_mse
        ``(n_eval,)`` per-tile PCC and MSE across genes (paper eq. 1-2; HEST: of ``y_pred + train_mean``).
    gene_pcc
        ``(n_genes,)`` per-gene Pearson correlation across evaluation tiles (HEST's metric).
    gene_mse_raw
        ``(n_genes,)`` per-gene MSE of ``y_pred`` as is (HEST's ``l2_errors``).
    embedding_keys
        The tile-table ``.obsm`` keys the features came from (``None`` when an array was passed); used by
        :meth:`predict` and :func:`sigmma_sc.tl.predict_expression` to read the same features elsewhere.
    reducer
        The fitted feature transform (HEST: ``StandardScaler`` + ``PCA``; paper: ``PCA``), fitted on the
        training tiles.
    target_sum
        Paper protocol: the training tiles' median total count every tile was normalised to (``None`` for HEST).
    tiling
        ``tile_size_um`` and ``pixel_size_um`` of the tiles the probe was fitted on (empty if unknown).
    """

    protocol: str
    embedding: str
    genes: list[str]
    alpha: float
    val_mse: dict[float, float]
    n_components: int
    tiles: dict[str, list[str]]
    coef: np.ndarray
    intercept: np.ndarray
    train_mean: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    tile_pcc: np.ndarray
    tile_mse: np.ndarray
    gene_pcc: np.ndarray
    gene_mse_raw: np.ndarray
    notes: list[str] = field(default_factory=list)
    embedding_keys: list[str] | None = None
    reducer: object | None = field(default=None, repr=False)
    target_sum: float | None = None
    tiling: dict[str, float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted expression of the probe's genes for tile features ``x`` (same features as it was fitted on).

        Parameters
        ----------
        x
            ``(n_tiles, D)`` tile features, built like the features of the fit (same keys, same order).

        Returns
        -------
        ``(n_tiles, n_genes)`` predictions on the protocol's target scale, with an intercept: ``log1p`` of
        counts normalised to the training tiles' median total (paper) or ``log1p`` of summed raw counts
        (HEST; the training mean is added back, see the module documentation).
        """
        if self.reducer is None:
            raise ValueError("This probe holds no fitted feature transform; fit it with `sg.metrics.linear_probe`.")
        x = np.asarray(x, dtype=np.float64)
        n_features = getattr(self.reducer, "n_features_in_", x.shape[-1])
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(
                f"The probe was fitted on {n_features}-dimensional features ({self.embedding}); got shape "
                f"{x.shape}. Embed the section with the same model and pass the same embedding keys."
            )
        if not np.isfinite(x).all():
            raise ValueError("The features hold NaN or infinite values.")
        pred = self.reducer.transform(x) @ self.coef.T + self.intercept
        return pred + self.train_mean if self.protocol == "hest" else pred

    def summary(self) -> dict[str, float]:
        """Scalar scores.

        Returns
        -------
        ``pcc``, ``pcc_std``: mean and std over evaluation tiles of tile-level PCC (eq. 2); ``mse``,
        ``mse_std``: same for tile-level MSE (eq. 1); ``gene_pcc``, ``gene_pcc_std``: mean and std over genes
        of gene-wise PCC (HEST's ``pearson_mean``/``pearson_std``); ``mse_raw``: MSE of the regressor's own
        predictions averaged over genes (HEST's ``l2_errors`` mean; equals ``mse`` for the paper protocol);
        ``alpha``, ``n_components``, ``n_genes``, ``n_train``, ``n_eval``.
        """
        return {
            "pcc": _nanmean(self.tile_pcc),
            "pcc_std": _nanstd(self.tile_pcc),
            "mse": float(np.mean(self.tile_mse)),
            "mse_std": float(np.std(self.tile_mse)),
            "gene_pcc": _nanmean(self.gene_pcc),
            "gene_pcc_std": _nanstd(self.gene_pcc),
            "mse_raw": float(np.mean(self.gene_mse_raw)),
            "alpha": float(self.alpha),
            "n_components": int(self.n_components),
            "n_genes": len(self.genes),
            "n_train": len(self.tiles["train"]),
            "n_eval": int(self.y_true.shape[0]),
        }


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _nanstd(x: np.ndarray) -> float:
    return float(np.nanstd(x)) if np.isfinite(x).any() else float("nan")


def rowwise_pcc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where a row is constant)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def embedding_matrix(tiles: AnnData, embedding: str | Sequence[str] | np.ndarray) -> tuple[np.ndarray, str]:
    """``(n_tiles, D)`` features and a name: one ``.obsm`` key, several concatenated as stored, or an array."""
    if isinstance(embedding, np.ndarray):
        x, name = embedding, "array"
    else:
        keys = [embedding] if isinstance(embedding, str) else list(embedding)
        if not keys:
            raise ValueError("`embedding` must name at least one `.obsm` key.")
        missing = [k for k in keys if k not in tiles.obsm]
        if missing:
            raise KeyError(
                f"Tile table has no `.obsm` {missing}; available: {sorted(tiles.obsm)}. Run `sg.tl.featurize` "
                "(frozen backbone, 'sigmma_backbone_{scale}') or `sg.tl.embed` ('X_sigmma_{scale}_image') first."
            )
        x = np.hstack([np.asarray(tiles.obsm[k], dtype=np.float64).reshape(tiles.n_obs, -1) for k in keys])
        name = "+".join(keys)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != tiles.n_obs:
        raise ValueError(f"The embedding must have shape (n_tiles, D) = ({tiles.n_obs}, D), got {x.shape}.")
    return x, name


def _counts(tiles: AnnData, layer: str | None) -> np.ndarray:
    from scipy import sparse

    m = tiles.layers[layer] if layer is not None else tiles.X
    if m is None:
        raise ValueError("The tile table has no expression matrix (`.X`); run `sg.pp.tile` again.")
    m = m.toarray() if sparse.issparse(m) else np.asarray(m)
    m = m.astype(np.float64)
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError("Tile-level expression must be finite, non-negative counts (summed raw counts of the cells).")
    return m


def _hvg(log_train: np.ndarray, names: np.ndarray, n_genes: int) -> np.ndarray:
    """Indices (in ``names`` order) of scanpy's top ``n_genes`` highly variable genes of log data (flavour 'seurat')."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    if names.size <= n_genes:
        return np.arange(names.size)
    a = ad.AnnData(X=log_train.astype(np.float32), var=pd.DataFrame(index=pd.Index(names.astype(str))))
    sc.pp.highly_variable_genes(a, n_top_genes=n_genes)
    return np.flatnonzero(a.var["highly_variable"].to_numpy())[:n_genes]


def select_targets(
    counts: np.ndarray,
    gene_names: np.ndarray,
    train: np.ndarray,
    *,
    protocol: Literal["paper", "hest"],
    n_genes: int,
    min_tiles_frac: float,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Targets of every tile and the chosen gene indices; every choice is made on the ``train`` rows only.

    - ``'paper'``: each tile's counts scaled to the median total count of the training tiles, ``log1p``;
      top ``n_genes`` HVGs (scanpy 'seurat' flavour) of the training tiles.
    - ``'hest'``: genes with counts in at least ``ceil(min_tiles_frac * n_train)`` training tiles, no control
      probes; ``log1p`` of the raw counts; scanpy's HVGs (default 'seurat' flavour on log1p data) of the
      training tiles, first ``n_genes`` in panel order (HEST's ``get_k_genes(criteria='var')``).
    """
    keep = np.array([not any(p in str(g) for p in _CONTROL_PATTERNS) for g in gene_names], dtype=bool)
    info: dict = {}
    if protocol == "paper":
        totals = counts.sum(1)
        target_sum = float(np.median(totals[train]))
        if target_sum <= 0:
            raise ValueError("The training tiles hold no counts.")
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        y = np.log1p(counts * scale[:, None])
        info["target_sum"] = target_sum
    else:
        min_tiles = math.ceil(min_tiles_frac * int(train.sum()))
        keep &= (counts[train] > 0).sum(0) >= min_tiles
        y = np.log1p(counts)
        info["min_tiles"] = min_tiles
    cand = np.flatnonzero(keep)
    if cand.size == 0:
        raise ValueError("No gene passes the filters on the training tiles.")
    if cand.size < n_genes:
        logger.warning("Only %d genes pass the filters; using all of them instead of %d.", cand.size, n_genes)
    genes = cand[_hvg(y[train][:, cand], gene_names[cand], n_genes)]
    return y, genes, info


def _ridge_path_mse(
    x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, alphas: Sequence[float]
) -> dict[float, float]:
    """Validation MSE of ridge with intercept for every penalty, from one SVD of the centred training design."""
    xm, ym = x.mean(0), y.mean(0)
    u, sv, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    xv = (x_val - xm) @ vt.T
    out = {}
    for a in alphas:
        pred = ym + xv @ ((sv / (sv**2 + float(a)))[:, None] * uty)
        out[float(a)] = float(np.mean((pred - y_val) ** 2))
    return out


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float, *, protocol: str):
    from sklearn.linear_model import Ridge

    if protocol == "hest":
        reg = Ridge(solver="lsqr", alpha=alpha, random_state=0, fit_intercept=False, max_iter=1000)
    else:
        reg = Ridge(alpha=alpha, fit_intercept=True)
    return reg.fit(x, y)


def linear_probe(
    sdata: SpatialData | AnnData,
    embedding: str | Sequence[str] | np.ndarray,
    *,
    protocol: Literal["paper", "hest"] = "paper",
    n_genes: int = 50,
    n_components: int = 256,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    eval_split: Literal["test", "val"] = "test",
    min_tiles_frac: float = 0.10,
    layer: str | None = None,
    tile_key: str = Keys.TILE_TABLE,
) -> ProbeResult:
    """Predict tile-level gene expression from tile embeddings with a PCA + ridge probe.

    Two protocols (see the module documentation for which tiles each step sees and for MSE under HEST):

    ``'paper'`` (SIGMMA, Suppl. D.2)
        Targets: tile counts normalised to the training tiles' median total, ``log1p``; top ``n_genes`` HVGs of
        the training tiles. Features: ``PCA(n_components)`` fitted on training tiles. Ridge with intercept;
        the penalty is the one of ``alphas`` with the lowest validation MSE; the model is fitted on training
        tiles only. Scores: tile-level PCC and MSE across the genes (eq. 1-2), mean ± std over test tiles,
        and gene-wise PCC.
    ``'hest'`` (HEST-Benchmark's linear probe)
        Targets: ``log1p`` of summed raw counts; genes with counts in >= ``min_tiles_frac`` of the training
        tiles, first ``n_genes`` of scanpy's HVGs. Features: ``StandardScaler`` then ``PCA(n_components)``,
        fitted on training tiles. ``Ridge(solver='lsqr', alpha=100 / (n_components * n_genes),
        fit_intercept=False)``. Score: gene-wise Pearson correlation averaged over genes (``gene_pcc``).

    ``n_components`` is capped at ``min(n_train, n_features)`` (sklearn's PCA cannot give more); the cap is
    logged and recorded in :attr:`ProbeResult.notes`.

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, or the tile table itself.
    embedding
        Tile features: a key of the tile table's ``.obsm`` (``'X_sigmma_macro_image'``, the frozen backbone's
        ``'sigmma_backbone_macro'``, ...), several keys (concatenated as stored), or an ``(n_tiles, D)`` array.
    protocol
        ``'paper'`` or ``'hest'``.
    n_genes
        Number of target genes.
    n_components
        PCA components.
    alphas
        Candidate ridge penalties of the paper protocol (validation MSE picks one).
    eval_split
        Tiles that are scored: ``'test'`` (report) or ``'val'`` (model selection only: the validation tiles
        then both pick the penalty and are scored).
    min_tiles_frac
        HEST gene filter: minimum fraction of training tiles with counts.
    layer
        Layer of the tile table holding the summed counts (default ``.X``).
    tile_key
        Tile table.

    Returns
    -------
    The fitted probe and its scores; :meth:`ProbeResult.summary` gives the scalars.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if protocol not in ("paper", "hest"):
        raise ValueError(f"`protocol` must be 'paper' or 'hest', got {protocol!r}.")
    if eval_split not in ("test", "val"):
        raise ValueError(f"`eval_split` must be 'test' or 'val', got {eval_split!r}.")
    if int(n_genes) < 1 or int(n_components) < 1:
        raise ValueError("`n_genes` and `n_components` must be >= 1.")
    tiles = tile_table(sdata, tile_key)
    x_all, name = embedding_matrix(tiles, embedding)
    keys = (
        None if isinstance(embedding, np.ndarray) else ([embedding] if isinstance(embedding, str) else list(embedding))
    )
    train, ev = split_mask(tiles, "train"), split_mask(tiles, eval_split)
    val = split_mask(tiles, "val") if protocol == "paper" else np.zeros_like(train)  # HEST fixes alpha
    if int(train.sum()) < 2:
        raise ValueError(f"The probe needs at least 2 training tiles. {too_few_tiles_hint(tiles)}")
    for role, mask in (("train", train), ("val", val), (eval_split, ev)):
        if not np.isfinite(x_all[mask]).all():
            raise ValueError(f"The embedding holds NaN or infinite values on {role} tiles.")
    counts = _counts(tiles, layer)
    y_all, genes, target_info = select_targets(
        counts,
        tiles.var_names.to_numpy(),
        train,
        protocol=protocol,
        n_genes=int(n_genes),
        min_tiles_frac=min_tiles_frac,
    )
    y_all = y_all[:, genes]
    notes = []
    n_comp = min(int(n_components), int(train.sum()), x_all.shape[1])
    if n_comp < n_components:
        notes.append(f"PCA capped at {n_comp} components (n_train={int(train.sum())}, n_features={x_all.shape[1]}).")
        logger.info(notes[-1])
    steps = [StandardScaler()] if protocol == "hest" else []
    reduce = make_pipeline(*steps, PCA(n_components=n_comp, random_state=0)).fit(x_all[train])
    x_train, y_train = reduce.transform(x_all[train]), y_all[train]

    val_mse: dict[float, float] = {}
    if protocol == "hest":
        alpha = 100.0 / (n_comp * len(genes))
    else:
        if not alphas:
            raise ValueError("`alphas` must hold at least one penalty.")
        val_mse = _ridge_path_mse(x_train, y_train, reduce.transform(x_all[val]), y_all[val], alphas)
        alpha = min(val_mse, key=val_mse.get)
    reg = _fit_ridge(x_train, y_train, alpha, protocol=protocol)
    y_true = y_all[ev]
    y_pred = reg.predict(reduce.transform(x_all[ev]))
    train_mean = y_train.mean(0)
    calibrated = y_pred + train_mean if protocol == "hest" else y_pred
    with np.errstate(invalid="ignore", divide="ignore"):
        gene_pcc = rowwise_pcc(y_true.T, y_pred.T)
    if np.isnan(gene_pcc).any():
        notes.append(f"{int(np.isnan(gene_pcc).sum())} gene(s) constant on the evaluation tiles: PCC undefined.")
    names = tiles.obs_names.to_numpy()
    return ProbeResult(
        protocol=protocol,
        embedding=name,
        genes=[str(g) for g in tiles.var_names[genes]],
        alpha=float(alpha),
        val_mse=val_mse,
        n_components=n_comp,
        tiles={"train": list(names[train]), "val": list(names[val]), eval_split: list(names[ev])},
        coef=np.atleast_2d(np.asarray(reg.coef_, dtype=np.float64)),
        intercept=np.broadcast_to(np.asarray(reg.intercept_, dtype=np.float64), (len(genes),)).copy(),
        train_mean=train_mean,
        y_true=y_true,
        y_pred=y_pred,
        tile_pcc=rowwise_pcc(y_true, calibrated),
        tile_mse=np.mean((y_true - calibrated) ** 2, axis=1),
        gene_pcc=gene_pcc,
        gene_mse_raw=np.mean((y_true - y_pred) ** 2, axis=0),
        notes=notes,
        embedding_keys=keys,
        reducer=reduce,
        target_sum=target_info.get("target_sum"),
        tiling={
            k: float(v)
            for k, v in tiles.uns.get(Keys.UNS, {}).get("tile", {}).items()
            if k in ("tile_size_um", "pixel_size_um")
        },
    )


def mean_baseline(
    sdata: SpatialData | AnnData,
    *,
    protocol: Literal["paper", "hest"] = "paper",
    n_genes: int = 50,
    eval_split: Literal["test", "val"] = "test",
    min_tiles_frac: float = 0.10,
    layer: str | None = None,
    tile_key: str = Keys.TILE_TABLE,
) -> dict[str, float]:
    """Scores of predicting every evaluation tile by the training tiles' mean expression (no image at all).

    A reference for the tile-level metrics: PCC across genes rewards reproducing the genes' mean levels,
    which this predictor does perfectly while carrying no tile-specific information (its gene-wise PCC
    is undefined). Targets and genes as in :func:`linear_probe`.

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, or the tile table itself.
    protocol
        ``'paper'`` or ``'hest'`` targets.
    n_genes
        Number of target genes.
    eval_split
        Tiles that are scored.
    min_tiles_frac
        HEST gene filter.
    layer
        Layer with summed counts.
    tile_key
        Tile table.

    Returns
    -------
    ``pcc``, ``pcc_std``, ``mse``, ``mse_std`` over the evaluation tiles.
    """
    tiles = tile_table(sdata, tile_key)
    train, ev = split_mask(tiles, "train"), split_mask(tiles, eval_split)
    y_all, genes, _ = select_targets(
        _counts(tiles, layer), tiles.var_names.to_numpy(), train, protocol=protocol, n_genes=int(n_genes),
        min_tiles_frac=min_tiles_frac,
    )  # fmt: skip
    y = y_all[:, genes]
    pred = np.broadcast_to(y[train].mean(0), y[ev].shape)
    pcc, mse = rowwise_pcc(y[ev], pred), np.mean((y[ev] - pred) ** 2, axis=1)
    return {"pcc": _nanmean(pcc), "pcc_std": _nanstd(pcc), "mse": float(mse.mean()), "mse_std": float(mse.std())}
