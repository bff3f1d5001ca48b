"""``sg.metrics.evaluate`` and ``sg.metrics.compare``: retrieval and linear probes of tile embeddings, with CIs.

The CIs come from a paired bootstrap over the evaluation tiles (:mod:`sigmma_sc.metrics._bootstrap`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import SCALES, Keys
from .._docs import (
    doc_boot_seed,
    doc_ci,
    doc_folds,
    doc_fractions,
    doc_n_boot,
    doc_n_components,
    doc_n_genes,
    doc_params,
    doc_split,
)
from .._utils._record import embedding_keys, embedding_prefixes, missing_embedding, read_record
from ._bootstrap import DEFAULT_N_BOOT, paired_bootstrap, tile_metrics
from ._folds import kfold_probe, spatial_folds
from ._probe import linear_probe
from ._retrieval import (
    DEFAULT_FRACTIONS,
    available_scales,
    paired_embeddings,
    recall_at,
    split_mask,
    tile_table,
    too_few_tiles_hint,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)
#: the probe scores that get a bootstrap CI (the others are spreads or fitted penalties)
_CI_PROBE = ("pcc", "mse", "gene_pcc", "mse_raw")


def default_embeddings(tiles: AnnData, use_rep: str | Sequence[str] = Keys.PREFIX) -> dict[str, list[str]]:
    """Image embeddings per scale (+ ``'all'``) of each ``use_rep``, if present, else the frozen backbone.

    One prefix: rows ``'micro'``, ..., ``'all'``; several: rows ``'{use_rep} {scale}'``.
    """
    prefixes = [use_rep] if isinstance(use_rep, str) else list(use_rep)
    out: dict[str, list[str]] = {}
    for prefix in prefixes:
        keys = embedding_keys(tiles, prefix, "image")
        if not keys and len(prefixes) > 1:
            raise missing_embedding("tile table", prefix, tiles, "image embeddings")
        name = (lambda s: s) if len(prefixes) == 1 else (lambda s, p=prefix: f"{p} {s}")
        for s, key in keys.items():
            out[name(s)] = [key]
        if len(keys) > 1:
            out[name("all")] = list(keys.values())
    if out:
        return out
    if use_rep != Keys.PREFIX and read_record(tiles, str(use_rep), "embed") is None:
        raise missing_embedding("tile table", str(use_rep), tiles, "image embeddings")
    backbone = [Keys.BACKBONE.format(scale=s) for s in SCALES if Keys.BACKBONE.format(scale=s) in tiles.obsm]
    if not backbone:
        raise KeyError("The tile table holds no embeddings; run `sg.tl.featurize` or `sg.tl.embed` first.")
    out = (
        {"backbone_macro": [Keys.BACKBONE.format(scale="macro")]}
        if Keys.BACKBONE.format(scale="macro") in backbone
        else {}
    )
    if len(backbone) > 1:
        out["backbone_concat"] = backbone
    return out


def _retrieval_scales(
    tiles: AnnData, keys: Sequence[str], use_rep: str | Sequence[str] = Keys.PREFIX
) -> tuple[str, list[str]] | None:
    """The embed prefix and scales of ``keys`` when they are all image embeddings of one run with ST partners."""
    given = [use_rep] if isinstance(use_rep, str) else list(use_rep)
    for prefix in dict.fromkeys([*given, *embedding_prefixes(tiles), Keys.PREFIX]):
        image_keys = {embedding_keys(tiles, prefix, "image")[s]: s for s in available_scales(tiles, prefix)}
        if keys and all(k in image_keys for k in keys):
            return prefix, [image_keys[k] for k in keys]
    return None


def _tile_table(sdata, tile_key: str) -> AnnData:
    if isinstance(sdata, Mapping) or (isinstance(sdata, Sequence) and not isinstance(sdata, str)):
        from ..data._cohort import cohort_tile_table

        sdata = cohort_tile_table(sdata, tile_key)
    return tile_table(sdata, tile_key)


def _scored(tiles: AnnData, split: str) -> np.ndarray:
    mask = split_mask(tiles, split)
    if int(mask.sum()) < 2:
        raise ValueError(
            f"Scoring needs at least 2 {split!r} tiles with cells (retrieval ranks pairs), got {int(mask.sum())}. "
            + too_few_tiles_hint(tiles)
        )
    return mask


def _resolve(tiles: AnnData, spec: str | Sequence[str], what: str) -> list[str]:
    """``.obsm`` key(s), or the ``key_added`` of a :func:`sigmma_sc.tl.embed` run (its image embeddings, all scales)."""
    if isinstance(spec, str):
        if spec in tiles.obsm:
            return [spec]
        keys = list(embedding_keys(tiles, spec, "image").values())
        if keys:
            return keys
        raise KeyError(
            f"`{what}={spec!r}` is neither a `.obsm` key of the tile table nor the `key_added` of an `sg.tl.embed` run; "
            f"`.obsm` holds {sorted(tiles.obsm)}, embed runs {embedding_prefixes(tiles)}."
        )
    keys = list(spec)
    missing = [k for k in keys if k not in tiles.obsm]
    if not keys or missing:
        raise KeyError(f"`{what}`: the tile table has no `.obsm` {missing or keys}; available: {sorted(tiles.obsm)}.")
    return keys


def _is_trained_here(tiles: AnnData, keys: Sequence[str]) -> bool:
    """Whether any key is an embedding written by ``sg.tl.embed`` (a model possibly trained on this section)."""
    written = {
        k
        for p in embedding_prefixes(tiles)
        for kind in ("image", "st")
        for k in embedding_keys(tiles, p, kind).values()
    }
    return any(k in written or (k.startswith("X_") and k.endswith(("_image", "_st"))) for k in keys)


def _row(
    tiles: AnnData,
    keys: list[str],
    mask: np.ndarray,
    fold: np.ndarray | None,
    *,
    protocols: Sequence[str],
    retrieval: bool,
    split: str,
    fractions: Sequence[float],
    n_genes: int,
    n_components: int,
    use_rep: str | Sequence[str],
) -> tuple[dict[str, float], dict[str, object], dict[str, object]]:
    """Scores of one embedding and its bootstrap metrics on the split's tiles and (with folds) on the k-fold tiles."""
    values: dict[str, float] = {}
    for direction in ("image->st", "st->image"):
        for p in fractions:
            values[f"{direction} R@{100 * p:g}%"] = float("nan")
    found = _retrieval_scales(tiles, keys, use_rep) if retrieval else None
    img = st = None
    if found is not None:
        img, st = paired_embeddings(tiles, found[1], found[0])
        img, st = img[mask], st[mask]
        for direction, (q, t) in (("image->st", (img, st)), ("st->image", (st, img))):
            for label, value in recall_at(q, t, fractions=fractions).items():
                values[f"{direction} {label}"] = value
    probes, by_fold = [], {}
    if fold is not None and protocols and _is_trained_here(tiles, keys):
        logger.warning(
            "k-fold probes of %s: a SIGMMA model trained on this section saw its training tiles, so their k-fold scores "
            "are not held-out scores of the model (see `sg.metrics.evaluate`, `folds`).", "+".join(keys),
        )  # fmt: skip
    for protocol in protocols:
        if fold is None:
            res = linear_probe(
                tiles, keys, protocol=protocol, n_genes=n_genes, n_components=n_components, eval_split=split
            )
            s = res.summary()
            probes.append(res)
        else:
            s, m = kfold_probe(tiles, keys, fold, protocol=protocol, n_genes=n_genes, n_components=n_components)
            by_fold |= m
        for k in ("pcc", "pcc_std", "mse", "mse_std", "gene_pcc", "gene_pcc_std", "mse_raw", "alpha"):
            values[f"{protocol}_{k}"] = s[k]
    return values, tile_metrics(image=img, st=st, fractions=fractions, probes=probes), by_fold


@doc_params(split=doc_split, fractions=doc_fractions, n_genes=doc_n_genes, n_components=doc_n_components,
            n_boot=doc_n_boot, ci=doc_ci, seed=doc_boot_seed, folds=doc_folds)  # fmt: skip
def evaluate(
    sdata: SpatialData | AnnData | Sequence[SpatialData] | Mapping[str, SpatialData],
    *,
    embeddings: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
    protocols: Sequence[Literal["paper", "hest"]] = ("paper", "hest"),
    retrieval: bool = True,
    split: Literal["test", "val"] = "test",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_genes: int = 50,
    n_components: int = 256,
    n_boot: int = DEFAULT_N_BOOT,
    ci: float = 0.95,
    seed: int | None = 0,
    folds: int | None = None,
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str | Sequence[str] = Keys.PREFIX,
) -> pd.DataFrame:
    """Cross-modal retrieval and linear probes of several tile embeddings, one row each, with bootstrap CIs.

    Each score gets a percentile CI from ``n_boot`` resamples of the evaluation tiles (with replacement, a fixed
    ``seed``), recomputing the metric on each resample: retrieval ranks each resampled query among the resampled
    gallery, gene-wise PCC correlates each gene across the resampled tiles (see
    :func:`sigmma_sc.metrics.paired_bootstrap`). Every row uses the same resamples. The probes are not refitted,
    so the CI is over the evaluation tiles for the fitted probe. To compare two rows, use
    :func:`sigmma_sc.metrics.compare` (the CI of their paired difference is much narrower than the two CIs
    suggest).

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, or the tile table itself, or a cohort (a list or mapping
        name -> SpatialData, e.g. after ``sg.tl.train_sigmma(sections, split='section', test_sections=[...])``):
        its tile tables are joined on their shared genes (:func:`sigmma_sc.data.cohort_tile_table`), so whole
        held-out sections are scored and the probes are fitted on the training tiles of all sections.
    embeddings
        Row name -> ``.obsm`` key(s) of the tile table (several keys: concatenated), or a list of keys (named
        by themselves). Default: the SIGMMA image embedding of each scale and ``'all'`` scales concatenated;
        without SIGMMA embeddings, the frozen backbone's macro features and the concatenation of its scales.
    protocols
        Linear-probe protocols (:func:`sigmma_sc.metrics.linear_probe`).
    retrieval
        Also compute image <-> ST retrieval for rows whose keys are SIGMMA image embeddings
        (``X_sigmma_{scale}_image`` with their ``X_sigmma_{scale}_st`` partners; several scales are
        L2-normalised per scale and concatenated on both sides, as in
        :func:`sigmma_sc.metrics.cross_modal_retrieval`). Other rows get NaN.
    {split}
    {fractions}
    {n_genes}
    {n_components}
    {n_boot}
    {ci}
    {seed}
    {folds}
    tile_key
        Tile table.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run(s) whose embeddings make the default rows
        (ignored with ``embeddings``). Several, e.g. ``['seed0', 'seed1']``, compare models kept side by side in
        one SpatialData: rows ``'seed0 micro'``, ..., ``'seed1 all'``.

    Returns
    -------
    Index: row names. Columns ``image->st R@5%`` ... ``st->image R@15%`` (retrieval), and per protocol
    ``{protocol}_pcc``, ``{protocol}_pcc_std``, ``{protocol}_mse``, ``{protocol}_mse_std``, ``{protocol}_gene_pcc``,
    ``{protocol}_gene_pcc_std``, ``{protocol}_mse_raw``, ``{protocol}_alpha`` (see
    :meth:`sigmma_sc.metrics.ProbeResult.summary`; with ``folds``, ``alpha`` is NaN and ``gene_pcc_std`` the
    folds' mean), plus ``n_eval`` (and with ``folds`` ``n_probe_eval``); with ``n_boot``, ``{column}_ci_low`` and
    ``{column}_ci_high`` for each retrieval column and each protocol's ``pcc``, ``mse``, ``gene_pcc`` and
    ``mse_raw``.
    """
    tiles = _tile_table(sdata, tile_key)
    if embeddings is None:
        embeddings = default_embeddings(tiles, use_rep)
    elif not isinstance(embeddings, Mapping):
        embeddings = {k: [k] for k in ([embeddings] if isinstance(embeddings, str) else embeddings)}
    embeddings = {name: [keys] if isinstance(keys, str) else list(keys) for name, keys in embeddings.items()}
    if int(n_boot) < 0:
        raise ValueError(f"`n_boot` must be >= 0, got {n_boot}.")
    mask = _scored(tiles, split)
    fold = spatial_folds(tiles, folds) if folds is not None else None
    rows = {}
    for name, keys in embeddings.items():
        values, on_split, on_folds = _row(
            tiles, keys, mask, fold, protocols=protocols, retrieval=retrieval, split=split, fractions=fractions,
            n_genes=n_genes, n_components=n_components, use_rep=use_rep,
        )  # fmt: skip
        row: dict[str, float] = {"n_eval": int(mask.sum())}
        if fold is not None:
            row["n_probe_eval"] = int((fold >= 0).sum())
        row |= values
        for group in (on_split, on_folds) if n_boot else ():
            if group:
                for r in paired_bootstrap(group, n_boot=n_boot, ci=ci, seed=seed).itertuples():
                    row[f"{r.metric}_ci_low"], row[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


@doc_params(split=doc_split, fractions=doc_fractions, n_genes=doc_n_genes, n_components=doc_n_components,
            n_boot=doc_n_boot, ci=doc_ci, seed=doc_boot_seed, folds=doc_folds)  # fmt: skip
def compare(
    sdata: SpatialData | AnnData | Sequence[SpatialData] | Mapping[str, SpatialData],
    *,
    a: str | Sequence[str],
    b: str | Sequence[str],
    protocols: Sequence[Literal["paper", "hest"]] = ("paper", "hest"),
    retrieval: bool = True,
    split: Literal["test", "val"] = "test",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_genes: int = 50,
    n_components: int = 256,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
    folds: int | None = None,
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str | Sequence[str] = Keys.PREFIX,
) -> pd.DataFrame:
    """Paired comparison of two tile embeddings on the same tiles: each metric's difference with a bootstrap CI.

    Both embeddings are scored as by :func:`sigmma_sc.metrics.evaluate`, then the evaluation tiles are resampled
    with replacement ``n_boot`` times (fixed ``seed``) and every metric of both embeddings is recomputed on the
    same resample: the interval is that of the paired difference ``a - b``, in which the variation between tiles
    that affects both embeddings cancels. For retrieval the gallery is resampled with the queries (paired): a
    resampled tile is both a query and a gallery entry, and ``K = floor(p * n)``. Each probe is fitted once (on
    the training tiles) and its predictions are resampled. Retrieval is compared only when both embeddings have
    ST partners (SIGMMA image embeddings); probes always.

    This is the statistic to report for "does model A beat model B": with ~25-90 test tiles a single recall has
    a standard error of 0.05-0.09, larger than most differences between models, while the paired difference is
    resolved far more finely. The tiles of one section are not independent, so prefer several sections or seeds
    for a claim about a method; this test says whether two embeddings differ on these tiles.

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, the tile table itself, or a cohort (as in
        :func:`sigmma_sc.metrics.evaluate`).
    a, b
        Each an ``.obsm`` key, several keys (concatenated), or the ``key_added`` of an :func:`sigmma_sc.tl.embed`
        run (its image embeddings of every scale, L2-normalised per scale for retrieval), e.g.
        ``a='full', b='nograph'``, or ``a='X_sigmma_macro_image', b='sigmma_backbone_macro'``.
    protocols
        Linear-probe protocols.
    retrieval
        Compare retrieval where both have ST partners.
    {split}
    {fractions}
    {n_genes}
    {n_components}
    {n_boot}
    {ci}
    {seed}
    {folds}
    tile_key
        Tile table.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run(s) searched for the ST partners of image embeddings.

    Returns
    -------
    One row per metric: ``metric``, ``tiles`` (``split``, or ``'{folds}-fold'`` for k-fold probes), ``a``, ``b``,
    ``diff`` (``a - b``), ``ci_low``, ``ci_high`` (CI of the difference), ``p`` (two-sided bootstrap share: twice the
    smaller share of resampled differences on either side of 0; small when the sign holds under resampling),
    ``n_tiles``, ``n_boot``. ``.attrs`` holds the keys of ``a`` and ``b``.
    """
    tiles = _tile_table(sdata, tile_key)
    ka, kb = _resolve(tiles, a, "a"), _resolve(tiles, b, "b")
    mask = _scored(tiles, split)
    fold = spatial_folds(tiles, folds) if folds is not None else None
    kw = {
        "protocols": protocols, "retrieval": retrieval, "split": split, "fractions": fractions, "n_genes": n_genes,
        "n_components": n_components, "use_rep": use_rep,
    }  # fmt: skip
    _, sa, fa = _row(tiles, ka, mask, fold, **kw)
    _, sb, fb = _row(tiles, kb, mask, fold, **kw)
    parts = []
    for ga, gb, label in ((sa, sb, split), (fa, fb, f"{folds}-fold")):
        if set(ga) & set(gb):
            df = paired_bootstrap(ga, gb, n_boot=n_boot, ci=ci, seed=seed)
            df.insert(1, "tiles", label)
            parts.append(df)
    if not parts:
        raise ValueError("`a` and `b` share no metric: pass `protocols`, or two SIGMMA embeddings for retrieval.")
    out = pd.concat(parts, ignore_index=True)
    out.attrs["a"], out.attrs["b"] = ka, kb
    return out
