"""``sg.metrics.graph_reliance``: what a trained model's ST side relies on, by perturbing its input at inference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Keys
from .._docs import doc_device, doc_graph_key, doc_params
from .._utils._record import embedding_keys
from ._bootstrap import MeanMetric, paired_bootstrap, tile_metrics
from ._retrieval import DEFAULT_FRACTIONS, _l2, split_mask, tile_table, too_few_tiles_hint

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_l2(a) * _l2(b), axis=1)


@doc_params(graph_key=doc_graph_key, device=doc_device)
def graph_reliance(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    perturbations: Sequence[str] = ("permute_features", "no_edges", "rewire"),
    split: str = "test",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
    use_rep: str = Keys.PREFIX,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    graph_key: str = Keys.PREFIX,
    batch_size: int = 256,
    device: str | None = None,
) -> pd.DataFrame:
    """How much a trained model's ST embeddings and retrieval change when its cell graphs are perturbed.

    The ST side of the tiles of ``split`` is embedded again from perturbed cell graphs (the model and the image
    side are unchanged), and each perturbed embedding is compared with the unperturbed one on the same tiles.
    The image embeddings are those :func:`sigmma_sc.tl.embed` wrote with this model (``key_added=use_rep``);
    the model's own unperturbed ST embedding of the tiles must reproduce the written one, which checks that
    model, embeddings and cell graph belong together. The perturbations:

    ``'permute_features'``
        Node features (cell expression) permuted among the cells of each tile: the tile's composition is kept
        exactly, the arrangement (which cell neighbours which) is scrambled.
    ``'no_edges'``
        Every edge dropped (kNN edges and edge-addition candidates): each cell sees only itself.
    ``'rewire'``
        Edges rewired at random by degree-preserving swaps inside the blocks where the model allows them,
        so every cell keeps its degree in each graph (see ``sigmma_sc.model._perturb``; ``changed`` says which
        fraction of the edges moved: in small dense blocks few swaps are possible).

    A model that reads only the tile's composition (e.g. ``use_graph=False``, a mean of the node features) shows
    no change under any of them; a model that uses the graph changes under ``no_edges`` and ``rewire``, one
    that uses the arrangement of expression also under ``permute_features``. Differences in retrieval are
    paired (the same resampled tiles, the gallery resampled with the queries; :func:`sigmma_sc.metrics.compare`).

    Parameters
    ----------
    sdata
        SpatialData object embedded by the model's training pipeline (:func:`sigmma_sc.pp.tile`,
        :func:`sigmma_sc.pp.cell_graph` with the model's node features).
    model
        The trained :class:`~sigmma_sc.model.SigmmaModel`.
    perturbations
        Which perturbations to run.
    split
        Tiles that are perturbed and scored (``'test'``: held-out tiles).
    fractions
        Fractions ``p`` of Recall@p%.
    n_boot
        Bootstrap resamples of the paired CIs.
    ci
        Coverage of the CIs.
    seed
        Seed of the perturbations (permutation, swaps) and of the resamples.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run of this model.
    table_key
        Cell table.
    tile_key
        Tile table.
    {graph_key}
    batch_size
        Tiles per forward pass.
    {device}

    Returns
    -------
    One row per perturbation, scale (each of the model's scales and ``'all'``) and metric: ``perturbation``,
    ``scale``, ``metric`` (``'cosine to unperturbed'``: mean over tiles of each tile's ST embedding's cosine to
    its unperturbed embedding; ``'image->st R@p%'``, ``'st->image R@p%'``), ``perturbed``, ``unperturbed``,
    ``diff`` (perturbed - unperturbed), ``ci_low``, ``ci_high`` (paired bootstrap CI of the difference), ``p``
    (two-sided bootstrap share), ``n_tiles``, ``n_boot`` and ``changed`` (fraction of cells whose features moved,
    or of edges removed or rewired). Nothing is written to ``sdata``.
    """
    from ..data._build import build_bundle
    from ..model._perturb import PERTURBATIONS, perturb_bundle, subset_bundle

    perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    bad = [p for p in perturbations if p not in PERTURBATIONS]
    if bad or not perturbations:
        raise ValueError(f"`perturbations` must be a non-empty subset of {PERTURBATIONS}, got {perturbations}.")
    if table_key is None:
        raise ValueError("Graph reliance perturbs the cell graphs: pass the cell table as `table_key`.")
    tiles = tile_table(sdata, tile_key)
    mask = split_mask(tiles, split)
    if int(mask.sum()) < 2:
        raise ValueError(f"Retrieval needs at least 2 {split!r} tiles with cells. {too_few_tiles_hint(tiles)}")
    keys = {kind: embedding_keys(tiles, use_rep, kind) for kind in ("image", "st")}
    missing = [s for s in model.scales if s not in keys["image"] or s not in keys["st"]]
    if missing:
        raise KeyError(
            f"The tile table holds no image and ST embeddings of scales {missing} under {use_rep!r}; run "
            f"`sg.tl.embed(sdata, model, key_added={use_rep!r})` with this model first."
        )
    if device is not None:
        model.to(device)
    bundle, _ = build_bundle(
        sdata, table_key=table_key, tile_key=tile_key, graph_key=graph_key, require_image_features=False
    )
    if bundle.n_features != model.config.n_features:
        raise ValueError(
            f"The cell graph's node features have {bundle.n_features} dimensions, the model was trained on "
            f"{model.config.n_features}; pass the `graph_key` the model was embedded with."
        )
    sub = subset_bundle(bundle, np.flatnonzero(mask))
    base, _ = model.encode_st(sub, batch_size=batch_size)
    for s, z in base.items():  # the model's own embedding must be the one written: same model, same graph
        written = np.asarray(tiles.obsm[keys["st"][s]], dtype=np.float64)[mask]
        if not np.allclose(z.numpy(), written, atol=1e-4, rtol=1e-3):
            raise ValueError(
                f"The ST embeddings `{keys['st'][s]}` were not written by this model from this cell graph "
                f"({graph_key!r}); run `sg.tl.embed(sdata, model, key_added={use_rep!r}, graph_key={graph_key!r})` "
                "with this model first, or pass the `use_rep` it was written under."
            )
    scales = list(base)
    groups = [(s, [s]) for s in scales] + ([("all", scales)] if len(scales) > 1 else [])

    def stack(z: dict, group: list[str]) -> np.ndarray:
        arrays = [np.asarray(z[s], dtype=np.float64) for s in group]
        return arrays[0] if len(arrays) == 1 else np.hstack([_l2(a) for a in arrays])

    image = {s: np.asarray(tiles.obsm[keys["image"][s]])[mask] for s in scales}
    base = {s: z.numpy() for s, z in base.items()}
    frames = []
    for kind in perturbations:
        perturbed, changed = perturb_bundle(sub, kind, seed=0 if seed is None else int(seed))
        z, _ = model.encode_st(perturbed, batch_size=batch_size)
        z = {s: v.numpy() for s, v in z.items()}
        logger.info(
            "%s: %.1f%% of the %s changed.", kind, 100 * changed, "cells" if kind.startswith("perm") else "edges"
        )
        for name, group in groups:
            img, st0, st1 = stack(image, group), stack(base, group), stack(z, group)
            a = {"cosine to unperturbed": MeanMetric(_cosine(st1, st0))}
            b = {"cosine to unperturbed": MeanMetric(_cosine(st0, st0))}
            a |= tile_metrics(image=img, st=st1, fractions=fractions)
            b |= tile_metrics(image=img, st=st0, fractions=fractions)
            df = paired_bootstrap(a, b, n_boot=n_boot, ci=ci, seed=seed)
            df = df.rename(columns={"a": "perturbed", "b": "unperturbed"})
            df.insert(0, "scale", name)
            df.insert(0, "perturbation", kind)
            df["changed"] = changed
            frames.append(df)
    return pd.concat(frames, ignore_index=True)
