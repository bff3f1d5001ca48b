"""``sg.metrics.evaluate``: retrieval and both linear probes for a set of tile embeddings, in one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd

from .._constants import SCALES, Keys
from .._utils._record import embedding_keys, embedding_prefixes, missing_embedding, read_record
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
    use_rep: str | Sequence[str] = Keys.PREFIX,
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
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run(s) whose embeddings make the default rows
        (ignored with ``embeddings``). Several, e.g. ``['seed0', 'seed1']``, compare models kept side by side in
        one SpatialData: rows ``'seed0 micro'``, ..., ``'seed1 all'``.

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
        embeddings = default_embeddings(tiles, use_rep)
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
        found = _retrieval_scales(tiles, keys, use_rep) if retrieval else None
        for direction in ("image->st", "st->image"):
            for p in fractions:
                row[f"{direction} R@{100 * p:g}%"] = float("nan")
        if found is not None:
            img, st = paired_embeddings(tiles, found[1], found[0])
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
