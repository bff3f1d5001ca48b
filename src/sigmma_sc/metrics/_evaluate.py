"""``sg.metrics.evaluate``: retrieval and both linear probes for a set of tile embeddings, in one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd

from .._constants import SCALES, Keys
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


def default_embeddings(tiles: AnnData) -> dict[str, list[str]]:
    """SIGMMA image embeddings per scale (+ ``'all'``) if present, else the frozen backbone (macro + concat.)."""
    scales = [s for s in SCALES if Keys.EMB_IMAGE.format(scale=s) in tiles.obsm]
    if scales:
        out = {s: [Keys.EMB_IMAGE.format(scale=s)] for s in scales}
        if len(scales) > 1:
            out["all"] = [Keys.EMB_IMAGE.format(scale=s) for s in scales]
        return out
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


def _retrieval_scales(tiles: AnnData, keys: Sequence[str]) -> list[str] | None:
    """The scales of ``keys`` when they are all SIGMMA image embeddings with ST partners, else ``None``."""
    image_keys = {Keys.EMB_IMAGE.format(scale=s): s for s in available_scales(tiles)}
    if not keys or any(k not in image_keys for k in keys):
        return None
    return [image_keys[k] for k in keys]


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
    tile_key: str = Keys.TILE_TABLE,
) -> pd.DataFrame:
    """Cross-modal retrieval and linear probes of several tile embeddings, one row each.

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
    split
        Tiles that are scored: ``'test'`` (report) or ``'val'`` (model selection).
    fractions
        Fractions ``p`` of Recall@p%.
    n_genes
        Target genes of the probes.
    n_components
        PCA components of the probes.
    tile_key
        Tile table.

    Returns
    -------
    Index: row names. Columns ``image->st R@5%`` ... ``st->image R@15%`` (retrieval), and per protocol
    ``{protocol}_pcc``, ``{protocol}_pcc_std``, ``{protocol}_mse``, ``{protocol}_mse_std``, ``{protocol}_gene_pcc``,
    ``{protocol}_gene_pcc_std``, ``{protocol}_mse_raw``, ``{protocol}_alpha`` (see
    :meth:`sigmma_sc.metrics.ProbeResult.summary`), plus ``n_eval``.
    """
    if isinstance(sdata, Mapping) or (isinstance(sdata, Sequence) and not isinstance(sdata, str)):
        from ..data._cohort import cohort_tile_table

        sdata = cohort_tile_table(sdata, tile_key)
    tiles = tile_table(sdata, tile_key)
    if embeddings is None:
        embeddings = default_embeddings(tiles)
    elif not isinstance(embeddings, Mapping):
        embeddings = {k: [k] for k in ([embeddings] if isinstance(embeddings, str) else embeddings)}
    embeddings = {name: [keys] if isinstance(keys, str) else list(keys) for name, keys in embeddings.items()}
    mask = split_mask(tiles, split)
    if int(mask.sum()) < 2:
        raise ValueError(
            f"Scoring needs at least 2 {split!r} tiles with cells (retrieval ranks pairs), got {int(mask.sum())}. "
            + too_few_tiles_hint(tiles)
        )
    rows = {}
    for name, keys in embeddings.items():
        row: dict[str, float] = {"n_eval": int(mask.sum())}
        scales = _retrieval_scales(tiles, keys) if retrieval else None
        for direction in ("image->st", "st->image"):
            for p in fractions:
                row[f"{direction} R@{100 * p:g}%"] = float("nan")
        if scales is not None:
            img, st = paired_embeddings(tiles, scales)
            for direction, (q, t) in (("image->st", (img, st)), ("st->image", (st, img))):
                for label, value in recall_at(q[mask], t[mask], fractions=fractions).items():
                    row[f"{direction} {label}"] = value
        for protocol in protocols:
            res = linear_probe(
                tiles, keys, protocol=protocol, n_genes=n_genes, n_components=n_components, eval_split=split
            )
            s = res.summary()
            for k in ("pcc", "pcc_std", "mse", "mse_std", "gene_pcc", "gene_pcc_std", "mse_raw", "alpha"):
                row[f"{protocol}_{k}"] = s[k]
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
