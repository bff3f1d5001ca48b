"""``sg.tl.embed``: per-scale SIGMMA embeddings of tiles (both modalities) and cells."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import SCALES, Keys
from .._docs import doc_device, doc_graph_key, doc_params
from .._utils._record import read_record
from .._utils._validate import check_prefix
from .._utils._write import save_outputs, save_record
from ..data._build import _hash_names, bundle_from_records, inputs_fingerprint, st_inputs
from ..data._records import CellGraph, Tiling
from ..data._tiles import image_modality
from ._featurize import featurize
from ._shifts import TIME_BUDGET_S, check_shifts, check_time_budget, shifted_cell_embeddings

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)


@doc_params(graph_key=doc_graph_key, device=doc_device)
def embed(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    table_key: str | None = "table",
    tile_key: str = Keys.TILE_TABLE,
    graph_key: str = Keys.PREFIX,
    image_key: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    shifts: int | Sequence[tuple[float, float]] | Literal["auto"] | None = "auto",
    time_budget_s: float | None = TIME_BUDGET_S,
    key_added: str = Keys.PREFIX,
    inplace: bool = True,
) -> dict[str, dict[str, np.ndarray]] | None:
    """Write SIGMMA's per-scale embeddings of every tile and cell.

    The image side uses the tile table's cached backbone features (computed with the model's backbone if
    missing). The ST side needs :func:`sigmma_sc.pp.cell_graph` with the node features the model was trained
    on; with ``table_key=None`` (an image-only section, e.g. an H&E without transcriptomics) only the image
    embeddings are written.

    Before anything is computed or written, the section is checked against the model's training section:
    the same tile size and pixel size, the same image modality (brightfield H&E or a fluorescence stain),
    the same node features (for PCA features: the same gene panel and the model's PCA, i.e.
    ``sg.pp.cell_graph(sdata, pca_from=model.meta['pca'])`` on a new section) and cached backbone features
    computed as for training; a mismatch raises an error naming the fix.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile` (and :func:`sigmma_sc.pp.cell_graph`).
    model
        A trained :class:`~sigmma_sc.model.SigmmaModel`.
    table_key
        Cell table, or ``None`` for image-only embedding.
    tile_key
        Tile table (``f'{key_added}_tiles'`` of :func:`sigmma_sc.pp.tile`).
    {graph_key}
    image_key
        Image to featurize if features are not cached (default: the tiled image).
    batch_size
        Tiles per forward pass.
    {device}
    shifts
        Blend each cell's embeddings over tile grids shifted by these ``(dx, dy)`` offsets, in micro blocks
        (32 µm for 128 µm tiles), each in ``[0, 4)`` (up to a whole tile). Micro-scale message passing stops at
        micro-block borders and every scale at tile borders, so a cell embedded on one grid carries that grid
        (Leiden on such embeddings draws the block grid). For each shift the tiled cells are re-tiled in
        memory, their per-tile 6-NN graph rebuilt as :func:`sigmma_sc.pp.cell_graph` does, and embedded; a
        cell's embeddings are averaged with weights that fall from 1 at the centre of its block of that scale
        (macro: its tile) to nearly 0 at the block's borders (a tent in x times one in y, squared), so the grids
        that cut its neighbourhood count least (the blend is not re-normalised). ``'auto'`` (default): 16 grids,
        the section's own first, then offsets spread over the tile by a low-discrepancy sequence, as many as
        ``time_budget_s`` allows; on the demo section this brings the grid artefact of
        :func:`sigmma_sc.metrics.grid_artefact` from 1.9 / 9.8 / 48 (micro / meso / macro) to at most 1.11
        (BENCHMARKS, "Cell maps"). An integer ``n``: the first ``n`` of that sequence; ``None``: the section's
        grid only (one pass, much faster, with the grid in the cell maps). Costs one ST pass per shift; tile embeddings (retrieval) keep the
        section's grid. Needs the cell table.
    time_budget_s
        Seconds the shifted passes may take, estimated after the first one: with ``shifts='auto'`` only the
        shifts that fit run (a warning says so); explicit shifts all run, after a warning. ``None``: no limit.
    key_added
        Stem of the embeddings (``Keys.embedding(key_added)``, see :doc:`/keys`; default ``'sigmma'``:
        ``X_sigmma_{scale}_image``, ...). Embed a second model under another stem to keep both; readers take it
        as ``use_rep``.
    inplace
        Write into ``sdata`` and return ``None``; otherwise return the embeddings and leave ``sdata`` unchanged
        (backbone features that are not cached are computed but not written).

    Returns
    -------
    ``None`` if ``inplace``, else ``{'image': {scale: array}, 'st': {...}, 'cell': {...}}`` (``'st'`` and
    ``'cell'`` only with ``table_key``). In place, writes for each of the model's scales:

    `tiles.obsm['X_sigmma_{scale}_image' | f'X_{key_added}_{scale}_image']`
        Image embedding of each tile in the shared space (tiles x out_dim, L2-normalised).
    `tiles.obsm['X_sigmma_{scale}_st' | f'X_{key_added}_{scale}_st']`
        ST (cell-graph) embedding of each tile (with ``table_key``).
    `table.obsm['X_sigmma_{scale}' | f'X_{key_added}_{scale}']`
        Each cell's node embedding in the shared space (NaN for untiled cells); with ``shifts``, its blend over
        the shifted grids.
    `.uns['sigmma' | key_added]['embed']`
        Of both tables: model configuration, backbone, the tables and graph read, and under ``'keys'`` every
        key written.
    """
    check_prefix(key_added)
    tiling = Tiling.resolve(sdata, tile_key)  # a clear error before anything else if sg.pp.tile has not run
    auto = isinstance(shifts, str) and shifts == "auto"
    shift_pairs = _shift_plan(shifts, time_budget_s, table_key)
    # every check before anything is computed or written
    use_cached = _check_image_side(sdata, model, tiling, image_key)
    bundle = rows = graph = None
    if table_key is not None:
        graph = CellGraph.resolve(sdata, tiling, table_key=table_key, graph_key=graph_key)
        bundle, rows = st_bundle(sdata, model, tiling, graph)
        _check_st_space(model, bundle.meta, graph.cells, graph_key)

    z_img = _image_embeddings(
        sdata, model, tiling, image_key=image_key, use_cached=use_cached, batch_size=batch_size, device=device,
        inplace=inplace,
    )  # fmt: skip
    out: dict[str, dict[str, np.ndarray]] = {"image": {s: z.numpy() for s, z in z_img.items()}}
    if bundle is not None:
        z_tile, z_cell = model.encode_st(bundle, batch_size=batch_size)
        out["st"] = {s: z.numpy() for s, z in z_tile.items()}
        out["cell"] = {}
        for s, z in z_cell.items():
            out["cell"][s] = np.full((graph.cells.n_obs, z.shape[1]), np.nan, dtype=np.float32)
            out["cell"][s][rows] = z.numpy()
    if shift_pairs is not None:  # cell embeddings blended over shifted grids (see _shifts.py), before any write
        shifted, count = shifted_cell_embeddings(
            sdata, model, shift_pairs, table_key=table_key, tile_key=tile_key, batch_size=batch_size,
            graph_key=graph_key, time_budget_s=time_budget_s, stop_at_budget=auto,
        )  # fmt: skip
        shift_pairs = shift_pairs[: int(count.max(initial=0))] if auto else shift_pairs
        out["cell"] = {s: shifted[s] for s in out["cell"]}
    if not inplace:
        return out
    _write_embeddings(tiling, graph, out, model=model, key_added=key_added, shift_pairs=shift_pairs)
    return None


def _shift_plan(
    shifts: int | Sequence[tuple[float, float]] | str | None, time_budget_s: float | None, table_key: str | None
) -> list[tuple[float, float]] | None:
    """The shifted grids to blend (``None``: the section's grid only), after checking ``shifts`` and the budget."""
    shift_pairs = check_shifts(shifts)
    check_time_budget(time_budget_s)
    if table_key is None and isinstance(shifts, str) and shifts == "auto":
        return None  # an image-only section has no cells to re-tile
    if shift_pairs is not None and table_key is None:
        raise ValueError(
            f"`shifts={shifts!r}` re-tiles the cells, but `table_key=None` embeds no cells. Pass the cell table as "
            "`table_key` (e.g. 'table'), or `shifts=None` for tile embeddings only."
        )
    return shift_pairs


def st_bundle(sdata: SpatialData, model: SigmmaModel, tiling: Tiling, graph: CellGraph) -> tuple[Any, np.ndarray]:
    """The bundle of the section's cells: the one training built when its inputs are the same, else a new one.

    :meth:`~sigmma_sc.model.SigmmaModel.fit` keeps the bundle it trained on (``model.training_bundle``, without
    tile images); :func:`~sigmma_sc.data._build.build_bundle` records a fingerprint of the arrays it was built
    from (cells, tiles, blocks, graph, node features, candidate rule). The kept bundle is reused when the
    section's fingerprint matches, so ``embed`` right after ``train_sigmma`` does not draw the candidate edges
    again.
    """
    rule = (model.meta or {}).get("candidates", "knn")  # the candidate rule the model was trained with
    kept = getattr(model, "training_bundle", None)
    if kept is not None and getattr(kept, "inputs_fingerprint", None) is not None:
        inputs = st_inputs(tiling, graph)
        if kept.inputs_fingerprint == inputs_fingerprint(inputs, n_candidates=graph.n_neighs, candidates=rule):
            logger.info("Reusing the bundle training built (same cells, tiles, graph and node features).")
            return kept, kept.cell_rows
    return bundle_from_records(sdata, tiling, graph, require_image_features=False, candidates=rule)


def _check_image_side(sdata: SpatialData, model: SigmmaModel, tiling: Tiling, image_key: str | None) -> bool:
    """Tiling, cached backbone features and image modality against the model's training; whether to use the cache."""
    tiles, cfg = tiling.tiles, model.config
    cached = tiling.backbone()
    finetuned = getattr(model, "finetuned", False)
    trained_size = (cfg.backbone_info or {}).get("input_size")
    _check_tiling(model.meta or {}, tiling.params)
    has_cached = all(Keys.BACKBONE.format(scale=s) in tiles.obsm for s in SCALES)
    if cached and cached.get("name") != cfg.backbone and has_cached:
        if cached.get("num_features") != cfg.image_dim:
            raise ValueError(
                f"The tile table's cached features come from backbone {cached.get('name')!r} "
                f"({cached.get('num_features')} features) but the model was trained on {cfg.backbone!r} "
                f"({cfg.image_dim}). Re-run `sg.tl.featurize(sdata, backbone={cfg.backbone!r}, overwrite=True)`."
            )
        logger.warning("Cached features come from %r, the model from %r.", cached.get("name"), cfg.backbone)
    if cached and not finetuned:  # features computed otherwise than for training give silently wrong embeddings
        differs = {
            "crop input size": (cached.get("input_size"), trained_size),
            "pretrained weights": (cached.get("pretrained"), cfg.backbone_pretrained),
        }
        differs = {k: v for k, v in differs.items() if None not in v and v[0] != v[1]}
        if differs:
            what = "; ".join(f"{k}: cached {a!r}, model {b!r}" for k, (a, b) in differs.items())
            raise ValueError(
                f"The tile table's cached backbone features were computed differently from the model's training "
                f"features ({what}). Re-run `sg.tl.featurize(sdata, backbone={cfg.backbone!r}, "
                f"input_size={trained_size}, pretrained={cfg.backbone_pretrained}, overwrite=True)`, or drop "
                "the cached features and let `embed` compute them."
            )
    use_cached = bool(cached) and not finetuned
    if use_cached and cached.get("modality"):
        modality = cached["modality"]
    else:
        modality = image_modality(sdata, tiling.key, image_key or (cached.get("image_key") if use_cached else None))
    _check_modality(model.meta or {}, modality, image_key or cached.get("image_key") or tiling.image_key)
    if use_cached and not has_cached:
        raise KeyError(
            f"Tile table {tiling.key!r} records backbone features but lacks `.obsm` "
            f"{[Keys.BACKBONE.format(scale=s) for s in SCALES]}; "
            f"re-run `sg.tl.featurize(sdata, backbone={cfg.backbone!r}, overwrite=True)`."
        )
    if use_cached and np.shape(tiles.obsm[Keys.BACKBONE.format(scale="macro")])[1] != cfg.image_dim:
        raise ValueError(
            f"The cached backbone features have {np.shape(tiles.obsm[Keys.BACKBONE.format(scale='macro')])[1]} "
            f"dimensions, the model expects {cfg.image_dim}. Re-run "
            f"`sg.tl.featurize(sdata, backbone={cfg.backbone!r}, overwrite=True)`."
        )
    return use_cached


def _image_embeddings(
    sdata: SpatialData,
    model: SigmmaModel,
    tiling: Tiling,
    *,
    image_key: str | None,
    use_cached: bool,
    batch_size: int,
    device: str | None,
    inplace: bool,
) -> dict[str, Any]:
    """Scale -> image embedding of every tile: from cached (or now computed) features, or a fine-tuned backbone.

    Moves the model to ``device`` (after any featurization, which runs on ``device`` too).
    """
    cfg = model.config
    computed = None
    finetuned = getattr(model, "finetuned", False)
    if not tiling.backbone() and not finetuned:  # featurize as for training: same weights and crop size
        computed = featurize(
            sdata, backbone=cfg.backbone, tile_key=tiling.key, image_key=image_key, device=device,
            pretrained=cfg.backbone_pretrained, weights=cfg.backbone_weights,
            input_size=(cfg.backbone_info or {}).get("input_size"), inplace=inplace,
        )  # fmt: skip
    if device is not None:
        model.to(device)
    if finetuned:  # its backbone changed: encode tile images, streamed in chunks
        import torch

        from ..data._tiles import iter_tile_images

        chunks: dict[str, list] = {}
        images = iter_tile_images(sdata, tile_key=tiling.key, image_key=image_key)
        while batch := [img for _, img in zip(range(batch_size), images, strict=False)]:
            for s, z in model.encode_image(tiles=np.stack(batch), batch_size=batch_size).items():
                chunks.setdefault(s, []).append(z.cpu())
        return {s: torch.cat(v) for s, v in chunks.items()}
    feats = computed or {s: tiling.tiles.obsm[Keys.BACKBONE.format(scale=s)] for s in SCALES}
    feats = {s: np.asarray(feats[s], dtype=np.float32) for s in SCALES}
    return model.encode_image(feats, batch_size=batch_size)


def _write_embeddings(
    tiling: Tiling,
    graph: CellGraph | None,
    out: dict[str, dict[str, np.ndarray]],
    *,
    model: SigmmaModel,
    key_added: str,
    shift_pairs: list[tuple[float, float]] | None,
) -> None:
    """Write the embeddings and the ``embed`` record into the tile (and cell) table."""
    names = Keys.embedding(key_added, tuple(out["image"]))
    keys = {kind: {s: names[kind][s] for s in arrays} for kind, arrays in out.items()}
    record = {
        "config": model.config.to_dict(),
        "backbone": model.config.backbone,
        "key_added": key_added,
        "tile_key": tiling.key,
        "table_key": None if graph is None else graph.table_key,
        "graph_key": None if graph is None else graph.graph_key,
        "keys": keys,
    }
    if shift_pairs is not None:
        record["shifts"] = [list(p) for p in shift_pairs]
    tiles = tiling.tiles
    for kind in ("image", "st"):
        if kind in out:
            z = {keys[kind][s]: z for s, z in out[kind].items()}
            save_outputs(tiles, "obsm", z, table=tiling.key, what=f"{kind} tile embeddings")
    if "cell" in out:
        z = {keys["cell"][s]: z for s, z in out["cell"].items()}
        save_outputs(graph.cells, "obsm", z, table=graph.table_key, what="cell embeddings")
        save_record(graph.cells, key_added, "embed", record, table=graph.table_key)
    save_record(tiles, key_added, "embed", record, table=tiling.key)


def _check_tiling(trained: dict, params: dict) -> None:
    """The section must be tiled as the model's training section: the same tile side and pixel size."""
    want = {k: trained.get(k) for k in ("tile_size_um", "pixel_size_um")}
    have = {k: params.get(k) for k in want}
    if any(want[k] is None or have[k] is None for k in want):
        return
    if all(np.isclose(float(want[k]), float(have[k]), rtol=1e-3) for k in want):
        return
    raise ValueError(
        f"The model was trained on {want['tile_size_um']:g} µm tiles read at {want['pixel_size_um']:.4g} µm/px; "
        f"this section is tiled at {have['tile_size_um']:g} µm and {have['pixel_size_um']:.4g} µm/px, so its "
        f"scales and image statistics differ. Tile it the model's way: `sg.pp.tile(sdata, "
        f"tile_size_um={want['tile_size_um']:g}, pixel_size_um={want['pixel_size_um']:.4g})`, then "
        "`sg.pp.cell_graph`."
    )


def _check_modality(trained: dict, modality: str, image_key: str) -> None:
    want = trained.get("image_modality")
    if want is None or want == modality:
        return
    kinds = {"brightfield": "an RGB brightfield image (H&E)", "fluorescence": "a one-channel morphology stain (DAPI)"}
    raise ValueError(
        f"The model was trained on {kinds.get(want, want)}, but image {image_key!r} of this section is "
        f"{kinds.get(modality, modality)}; its backbone features live in another distribution. Embed with an image "
        "of the training modality (`image_key=`, and `sg.tl.featurize(sdata, image_key=..., overwrite=True)` if "
        "features are cached), or train a model on this modality."
    )


def _check_st_space(model: SigmmaModel, meta: dict, cells, graph_key: str = Keys.PREFIX) -> None:
    trained = model.meta or {}
    if meta["n_features"] != model.config.n_features:
        raise ValueError(
            f"The node features `.obsm[{meta['features_key']!r}]` have {meta['n_features']} dimensions, the model "
            f"was trained on {model.config.n_features}. Compute the same node features as for training "
            f"(`sg.pp.cell_graph(sdata, features={trained.get('features_key')!r})`)."
        )
    if trained.get("features_key") not in (None, meta["features_key"]):
        raise ValueError(
            f"The model was trained on node features `.obsm[{trained['features_key']!r}]`, this section's graph "
            f"uses `.obsm[{meta['features_key']!r}]`. Compute the same node features as for training "
            + (
                "(`sg.pp.cell_graph(sdata, pca_from=model.meta['pca'])`)."
                if trained.get("pca") is not None
                else f"(`sg.pp.cell_graph(sdata, features={trained['features_key']!r})`)."
            )
        )
    pca_features = trained.get("features_key") == Keys.FEATURES or trained.get("pca") is not None
    pca = (read_record(cells, graph_key, "cell_graph") or {}).get("pca") or {}
    section_genes = {_hash_names(cells.var_names)}  # a cohort model: the genes of the PCA the section was projected on
    if pca.get("var_names") is not None:
        section_genes.add(_hash_names(pca["var_names"]))  # any string dtype: hashed as str
    if pca_features and trained.get("var_names_hash") not in (None, *section_genes):
        raise ValueError(
            "The section's genes differ from those the model was trained on, so its PCA node features live in "
            "another space. Embed sections with the same gene panel (subset both to the shared genes, same order), "
            "or train on shared node features (e.g. a foundation-model embedding passed as "
            "`sg.pp.cell_graph(sdata, features=...)`)."
        )
    if pca_features and not _same_pca(trained.get("pca"), meta.get("pca")):
        raise ValueError(
            "This section's node features come from a PCA fitted on it, not from the model's training PCA, so they "
            "live in another space (its cells' embeddings would not be comparable). Project the section with the "
            "model's PCA: `sg.pp.cell_graph(sdata, pca_from=model.meta['pca'])`, then embed."
        )


def _same_pca(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded PCAs are the same projection (``None``: unknown, accepted)."""
    if a is None or b is None:
        return True
    try:
        return all(
            np.shape(a[k]) == np.shape(b[k])
            and np.allclose(np.asarray(a[k], float), np.asarray(b[k], float), atol=1e-6)
            for k in ("components", "mean")
        ) and np.isclose(float(a["target_sum"]), float(b["target_sum"]))
    except (KeyError, TypeError, ValueError):
        return True
