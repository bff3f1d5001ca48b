"""New image-only slides: fit what inference needs on the training section, then predict on whole-slide images.

``sg.tl.fit_probe`` and ``sg.tl.attach_reference`` store, in the model, a linear expression probe and the
training section's ST tile embeddings and stain appearance; ``sg.tl.predict_slide`` tiles a new slide at
the model's tiling, embeds its image side, predicts expression, retrieves the closest training tiles and
writes a zarr for napari-spatialdata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SPLITS, Keys
from .._utils._record import write_record
from .._utils._validate import get_image, get_table
from .._utils._write import save_output, save_outputs, save_record

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..metrics import ProbeResult
    from ..model import SigmmaModel

logger = logging.getLogger(__name__)

RETRIEVED = "sigmma_retrieved"  # tile table .obsm (indices, scores) / .obs (top hit) / .uns (reference tiles)
OVERVIEW_UM = 4.0  # pixel size of the image written with the predictions


def _check_embedded_by(tiles, model: SigmmaModel, tile_key: str) -> None:
    record = tiles.uns.get(Keys.UNS, {}).get("embed", {})
    if record.get("config") != model.config.to_dict():
        raise ValueError(
            f"Tile table {tile_key!r} was not embedded by this model; run `sg.tl.embed(sdata, model)` first."
        )


def fit_probe(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    scales: tuple[str, ...] | None = None,
    protocol: str = "paper",
    n_genes: int = 50,
    n_components: int = 256,
    name: str = "expression",
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str = Keys.PREFIX,
    features: str = "auto",
) -> ProbeResult:
    """Fit a linear probe of tile expression on the best image features and store it in the model.

    With ``features='auto'`` the probe's input is chosen on the *validation* tiles among SIGMMA's image
    embeddings, the fine-tuned encoder's pooled features (a model with ``finetune_blocks > 0``) and the frozen
    backbone's features: the one whose probe has the highest validation gene-wise PCC, so that image-only
    prediction is never worse on validation tiles than a probe on the backbone a user already has. All three are
    computed from the image alone, so :func:`predict_slide` computes the chosen ones on a new slide.

    The probe (:func:`sigmma_sc.metrics.linear_probe`: PCA + ridge fitted on the *training* tiles, penalty
    chosen on the validation tiles, scored on the test tiles) is collapsed into one affine map and kept in
    ``model.probes[name]``, so that :meth:`~sigmma_sc.model.SigmmaModel.save` keeps it and
    :func:`predict_slide` applies it to new slides.

    Parameters
    ----------
    sdata
        The training section, embedded by ``model`` (:func:`sigmma_sc.tl.embed`).
    model
        The trained model.
    scales
        Image embeddings used as features, concatenated (default: all of the model's scales).
    protocol
        ``'paper'`` or ``'hest'`` (see :func:`sigmma_sc.metrics.linear_probe`).
    n_genes
        Target genes (highly variable genes of the training tiles).
    n_components
        PCA components.
    name
        Key of the probe in ``model.probes``.
    tile_key
        Tile table.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run in which ``model`` embedded the section.
    features
        The probe's input: ``'auto'`` (chosen on validation tiles, see above), ``'sigmma'`` (the model's image
        embeddings), ``'encoder'`` (the fine-tuned encoder's pooled features) or ``'backbone'`` (the frozen
        backbone's features, ``sg.tl.featurize``).

    Returns
    -------
    The fitted probe with its held-out scores (``.summary()``). Writes ``model.probes[name]`` and
    ``tiles.uns['sigmma']['probes'][name]``: ``features`` (the source used), ``keys`` (its ``.obsm`` keys, written
    for ``'encoder'``/``'backbone'`` if missing), ``chosen_on`` and, with ``'auto'``, ``validation``: each
    candidate's validation gene-wise and tile PCC.
    """
    from ..metrics import linear_probe
    from ._probe_features import SOURCES, choose_features, ensure_features, source_keys

    tiles = get_table(sdata, tile_key)
    _check_embedded_by(tiles, model, tile_key)
    scales = tuple(model.scales if scales is None else scales)
    bad = [s for s in scales if s not in model.scales]
    if bad or not scales:
        raise ValueError(f"`scales` must be a non-empty subset of the model's scales {list(model.scales)}; got {bad}.")
    if features != "auto" and features not in SOURCES:
        raise ValueError(f"`features` must be 'auto' or one of {SOURCES}, got {features!r}.")
    if features == "encoder" and not model.finetuned:
        raise ValueError("`features='encoder'` needs a fine-tuned model (`finetune_blocks > 0`); use 'backbone'.")
    kwargs = {"protocol": protocol, "n_genes": n_genes, "n_components": n_components}
    validation = None
    chosen = features
    if features == "auto":
        n_val = int((tiles.obs[Keys.SPLIT].to_numpy() == "val").sum())
        candidates = tuple(c for c in SOURCES if c != "encoder" or model.finetuned)
        if n_val < 3:
            logger.warning("Only %d validation tiles: the probe reads SIGMMA's image embeddings (no choice).", n_val)
            chosen = "sigmma"
        else:
            chosen, validation = choose_features(
                sdata, model, scales=scales, candidates=candidates, use_rep=use_rep, tile_key=tile_key,
                probe_kwargs=kwargs,
            )  # fmt: skip
            logger.info(
                "Probe %r reads the %s features: validation gene PCC %s (%d validation tiles).", name, chosen,
                ", ".join(f"{c} {v['gene_pcc']:.3f}" for c, v in validation.items()), n_val,
            )  # fmt: skip
    keys = source_keys(chosen, scales, use_rep)
    ensure_features(sdata, model, chosen, keys, tile_key=tile_key)
    tiles = get_table(sdata, tile_key)
    probe = linear_probe(sdata, keys, tile_key=tile_key, **kwargs)
    x = np.hstack([np.asarray(tiles.obsm[k], dtype=np.float64) for k in keys])
    model.add_probe(probe, name, check=x[: min(len(x), 64)])
    probes = dict(dict(tiles.uns.get(Keys.UNS, {})).get("probes", {}))
    probes[name] = {"features": chosen, "keys": keys, "chosen_on": "validation" if validation else "given",
                    "protocol": protocol, **({"validation": validation} if validation else {})}  # fmt: skip
    save_record(tiles, Keys.UNS, "probes", probes, table=tile_key)
    s = probe.summary()
    logger.info(
        "Probe %r: %d genes on %s; held-out (%d tiles) tile PCC %.3f, gene PCC %.3f.",
        name, s["n_genes"], "+".join(keys), s["n_eval"], s["pcc"], s["gene_pcc"],
    )  # fmt: skip
    return probe


def attach_reference(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    scale: str = "macro",
    split: str | None = "train",
    tile_key: str = Keys.TILE_TABLE,
    stain: bool = True,
) -> None:
    """Store the training section's ST tile embeddings (for retrieval) and its stain appearance in the model.

    Parameters
    ----------
    sdata
        The training section, embedded by ``model`` with its cell table (ST embeddings).
    model
        The trained model.
    scale
        Scale of the ST embeddings kept.
    split
        Tiles kept (``'train'``: the training tiles; ``None``: all).
    tile_key
        Tile table.
    stain
        Also estimate the Macenko stains of the tiled image's tissue (RGB images only), stored as
        ``model.meta['stain_reference']``: :func:`predict_slide` normalises new slides to them.

    Returns
    -------
    ``None``. Writes ``model.reference`` (:class:`~sigmma_sc.model.RetrievalReference`) and, with ``stain``,
    ``model.meta['stain_reference']``.
    """
    from ..data._tiles import tile_params, tile_reader
    from ..model import RetrievalReference
    from ..pp._stain import slide_stains

    if scale not in model.scales:
        raise ValueError(f"`scale` must be one of the model's scales {list(model.scales)}, got {scale!r}.")
    if split is not None and split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS} or None, got {split!r}.")
    tiles = get_table(sdata, tile_key)
    _check_embedded_by(tiles, model, tile_key)
    key = Keys.embedding()["st"][scale]
    if key not in tiles.obsm:
        raise KeyError(f"Tile table {tile_key!r} lacks `.obsm[{key!r}]`; run `sg.tl.embed(sdata, model)` with the cells.")
    rows = np.arange(tiles.n_obs) if split is None else np.flatnonzero(tiles.obs[Keys.SPLIT].to_numpy() == split)
    if rows.size == 0:
        raise ValueError(f"No {split!r} tiles in tile table {tile_key!r}.")
    params = tile_params(sdata, tile_key)
    stains = None
    if stain:
        reader = tile_reader(sdata, tile_key)
        if reader.n_channels == 3 and reader.dtype == np.uint8:
            src = slide_stains(sdata, params["image_key"], coordinate_system=params["coordinate_system"],
                               um_per_unit=params["um_per_unit"])  # fmt: skip
            stains = {k: np.asarray(v).tolist() for k, v in src.items()}
        else:
            logger.warning("Image %r is not RGB brightfield: no stain reference stored.", params["image_key"])
    obs = tiles.obs
    model.reference = RetrievalReference(
        scale=scale,
        embeddings=np.asarray(tiles.obsm[key], dtype=np.float32)[rows],
        names=[str(n) for n in tiles.obs_names[rows]],
        xy=np.c_[obs[Keys.TILE_X0].to_numpy()[rows], obs[Keys.TILE_Y0].to_numpy()[rows]],
        section=str(params["image_key"]),
    )
    if stains is not None:
        model.meta["stain_reference"] = stains
    logger.info("Stored %d %s ST tile embeddings (%s)%s in the model.", rows.size, split or "all", scale,
                " and the image's stain reference" if stains is not None else "")  # fmt: skip


def _load_model(model: Any) -> SigmmaModel:
    from ..model import SigmmaModel

    if isinstance(model, SigmmaModel):
        return model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"No such model file: {path}")
    return SigmmaModel.load(path)


def _model_tiling(model: SigmmaModel) -> tuple[float, float]:
    t = model.tiling
    if t["tile_size_um"] is None or t["pixel_size_um"] is None:
        raise ValueError(
            "The model does not record the tiling it was trained with (tile and pixel size); it predates "
            "sigmma_sc's inference support. Set them: `model.meta.update(tile_size_um=128.0, pixel_size_um=0.5)`, "
            "as used in `sg.pp.tile` for training, and save it again."
        )
    if t["image_channels"] not in (None, 3):
        raise ValueError(
            f"The model was trained on a {t['image_channels']}-channel image ({t['image_key']!r}, e.g. DAPI), but "
            "whole slides here are brightfield RGB (H&E); predict with a model trained on the H&E image."
        )
    if t["image_channels"] is None:
        logger.warning("The model does not record its image modality; assuming it was trained on RGB (H&E) images.")
    return float(t["tile_size_um"]), float(t["pixel_size_um"])


def predict_slide(
    slide: str | Path | SpatialData,
    model: SigmmaModel | str | Path,
    *,
    image_key: str | None = None,
    pixel_size_um: float | None = None,
    probe: str | None = "expression",
    retrieve: int = 0,
    stain_normalize: bool = False,
    min_tissue_fraction: float = 0.05,
    tile_key: str = Keys.TILE_TABLE,
    batch_size: int = 256,
    device: str | None = None,
    out: str | Path | None = None,
) -> SpatialData:
    """Predict tile expression (and the closest training tiles) of an image-only slide with a trained model.

    Reads the slide (:func:`sigmma_sc.io.wsi`) unless a SpatialData object is given, optionally
    Macenko-normalises it to the training section's stains (:func:`sigmma_sc.pp.stain_normalize`), tiles its
    tissue at the model's tile and pixel size (:func:`sigmma_sc.pp.tile` with ``table_key=None``), embeds the
    image side (:func:`sigmma_sc.tl.embed`: the model's backbone, weights and crop size), applies the model's
    expression probe (:func:`fit_probe`) and retrieves the closest training tiles (:func:`attach_reference`).
    Every input is checked before any work. Memory stays bounded: the slide is read lazily, window by window.

    Parameters
    ----------
    slide
        Whole-slide image file (SVS, NDPI, OME-TIFF, ...), or a SpatialData object with the image (its
        coordinate system's µm scale recorded, as :func:`sigmma_sc.io.wsi` does). A tile table already in it
        must use the model's tiling.
    model
        A trained :class:`~sigmma_sc.model.SigmmaModel` or the path of a saved one.
    image_key
        Image of a SpatialData ``slide`` (optional if it has one).
    pixel_size_um
        Level-0 pixel size of a slide file that records none (see :func:`sigmma_sc.io.wsi`).
    probe
        Name of the model's probe to apply (``None``: no expression, retrieval only).
    retrieve
        Closest training tiles retrieved per tile (0: none); needs :func:`attach_reference`.
    stain_normalize
        Macenko-normalise the slide to the model's ``meta['stain_reference']`` (Macenko's standard H&E
        reference if the model has none) before tiling.
    min_tissue_fraction
        Minimum tissue fraction of a kept tile.
    tile_key
        Tile table written.
    batch_size
        Tiles per forward pass of the heads.
    device
        Torch device (default: CUDA when available).
    out
        Also write a zarr: the tile shapes, the tile table and an overview image (~4 µm/px); refused if it exists.

    Returns
    -------
    The slide's SpatialData object, with

    - ``tables[tile_key]``: one row per tissue tile; ``.X`` and ``.obsm['sigmma_expression_pred']`` the
      predicted expression (genes in ``.var``: napari-spatialdata colours tiles by gene), on the probe's scale
      (``.uns['sigmma_expression_pred']`` says which); ``.obsm['X_sigmma_{scale}_image']``; with ``retrieve``,
      ``.obsm['sigmma_retrieved']`` (indices into ``.uns['sigmma_retrieved']['names']``, best first),
      ``.obsm['sigmma_retrieved_score']`` (cosine similarities), ``.obs['sigmma_top_hit']`` and
      ``.obs['sigmma_top_hit_score']``; ``.uns['sigmma']['predict']`` the parameters;
    - ``shapes[f'{image_key}_sigmma_tiles']``, and with ``stain_normalize`` ``images[f'{image_key}_stain_normalized']``.
    """
    import spatialdata as sd

    from ..model._inference import inference_tiling

    model = _load_model(model)
    tile_size_um, model_px = _model_tiling(model)
    if not isinstance(retrieve, int | np.integer) or retrieve < 0:
        raise ValueError(f"`retrieve` must be a non-negative integer, got {retrieve!r}.")
    if probe is None and retrieve == 0:
        raise ValueError("Nothing to predict: pass `probe=` (expression) and/or `retrieve=N` (closest training tiles).")
    if probe is not None and probe not in model.probes:
        raise ValueError(
            f"The model carries no expression probe {probe!r} (it has {sorted(model.probes) or 'none'}). Fit one on "
            "its training section and save the model again: `sg.tl.embed(sdata, model); sg.tl.fit_probe(sdata, "
            "model); model.save(path)`; or pass `probe=None` (`--no-probe`) for retrieval only."
        )
    lp = model.probes.get(probe) if probe is not None else None
    if lp is not None:
        for k, v in {"tile_size_um": tile_size_um, "pixel_size_um": model_px}.items():
            if k in lp.tiling and not np.isclose(lp.tiling[k], v, rtol=0.01):
                raise ValueError(
                    f"Probe {probe!r} was fitted on tiles with {k} = {lp.tiling[k]:g}, the model trained on {v:g}; "
                    "fit the probe on the model's training tiling."
                )
    if retrieve and model.reference is None:
        raise ValueError(
            "The model carries no retrieval reference; store the training tiles' ST embeddings: "
            "`sg.tl.attach_reference(sdata, model); model.save(path)`, or pass `retrieve=0`."
        )
    if out is not None and Path(out).exists():
        raise FileExistsError(f"{out} exists; choose another `out` or remove it.")
    if isinstance(slide, sd.SpatialData):
        sdata = slide
    else:
        from ..io import wsi

        sdata = wsi(slide, pixel_size_um=pixel_size_um)
    key, _ = get_image(sdata, image_key)
    _check_slide(sdata, key, tile_key, tile_size_um, model_px)

    tile_image = key
    if stain_normalize:
        from ..pp import stain_normalize as _normalize

        reference = model.meta.get("stain_reference")
        if reference is None:
            logger.warning("The model has no stain reference (sg.tl.attach_reference); using Macenko's standard H&E.")
        tile_image = f"{key}_stain_normalized"
        _normalize(sdata, image_key=key, reference=reference, key_added=tile_image)
    if tile_key not in sdata.tables:
        from ..pp import tile

        tile(sdata, image_key=tile_image, table_key=None, tile_size_um=tile_size_um, pixel_size_um=model_px,
             min_tissue_fraction=min_tissue_fraction, key_added=Keys.tiling_prefix(tile_key))  # fmt: skip
    from ._embed import embed

    embed(sdata, model, table_key=None, tile_key=tile_key, batch_size=batch_size, device=device)
    tiles = sdata.tables[tile_key]
    record: dict[str, Any] = {
        "model_tiling": {k: v for k, v in inference_tiling(model.meta, model.config.backbone_info).items() if v is not None},
        "probe": probe,
        "retrieve": int(retrieve),
        "stain_normalize": bool(stain_normalize),
        "image_key": tile_image,
    }
    if lp is not None:  # the probe's inputs: SIGMMA's embeddings (above), or the encoder's / backbone's features
        from ._probe_features import ensure_features, source_of

        ensure_features(sdata, model, source_of(lp.embedding_keys), list(lp.embedding_keys), tile_key=tile_key,
                        batch_size=batch_size, device=device)  # fmt: skip
        tiles = _with_expression(sdata.tables[tile_key], lp, probe, tile_key)
    if retrieve:
        _write_retrieval(tiles, model, int(retrieve), tile_key)
    write_record(tiles, Keys.UNS, "predict", record)
    save_output(sdata, "tables", tile_key, tiles, what="tile table with the slide's predictions")
    if out is not None:
        _write_zarr(sdata, tile_image, tile_key, Path(out))
    return sdata


def _check_slide(sdata: SpatialData, key: str, tile_key: str, tile_size_um: float, model_px: float) -> None:
    from .._utils._validate import um_per_unit
    from ..data._image import ImageReader, image_is_brightfield

    cs = "global"
    if tile_key in sdata.tables:
        params = sdata.tables[tile_key].uns.get(Keys.UNS, {}).get("tile", {})
        here = {k: params.get(k) for k in ("tile_size_um", "pixel_size_um")}
        want = {"tile_size_um": tile_size_um, "pixel_size_um": model_px}
        if any(here[k] is None or not np.isclose(float(here[k]), want[k], rtol=0.01) for k in want):
            raise ValueError(
                f"Tile table {tile_key!r} was tiled with tile_size_um={here['tile_size_um']}, pixel_size_um="
                f"{here['pixel_size_um']}, but the model was trained on {tile_size_um:g} µm tiles at {model_px:g} "
                f"µm/px. Tile the slide like the training section: drop the table (`del sdata.tables[{tile_key!r}]`) "
                f"or pass another `tile_key`, and let predict_slide tile it."
            )
        cs = params.get("coordinate_system", cs)
    reader = ImageReader(
        sdata.images[key], cs, um_per_unit(sdata, cs, None), brightfield=image_is_brightfield(sdata, key)
    )
    if reader.n_channels != 3 or reader.dtype != np.uint8:
        raise ValueError(
            f"Image {key!r} has {reader.n_channels} channel(s) of {reader.dtype}; the model predicts from RGB uint8 "
            "brightfield (H&E) images."
        )
    if reader.pixel_size_um > 1.5 * model_px:
        raise ValueError(
            f"The slide's full resolution is {reader.pixel_size_um:.3g} µm/px, coarser than the {model_px:g} µm/px "
            "the model was trained at; its tiles would be upsampled. Use a higher-magnification scan, or check "
            "the slide's pixel size (`pixel_size_um=`)."
        )


def _with_expression(tiles, lp, name: str, tile_key: str):
    """The tile table with the probe's predictions in ``.obsm`` (and in ``.X`` when the table holds no counts)."""
    from anndata import AnnData
    from spatialdata.models import TableModel

    from ._predict import _UNITS

    x = np.hstack([np.asarray(tiles.obsm[k], dtype=np.float64) for k in lp.embedding_keys])
    ok = np.isfinite(x).all(1)
    pred = np.full((tiles.n_obs, len(lp.genes)), np.nan, dtype=np.float32)
    if ok.any():
        pred[ok] = lp.predict(x[ok])
    genes = pd.Index(lp.genes, dtype=str)
    df = pd.DataFrame(pred, index=tiles.obs_names.copy(), columns=genes)
    in_x = tiles.n_vars == 0  # an image-only tile table: .X holds the predictions, so napari colours tiles by gene
    if in_x:
        tiles = TableModel.parse(
            AnnData(X=pred, obs=tiles.obs.copy(), var=pd.DataFrame(index=genes), obsm=dict(tiles.obsm),
                    uns=dict(tiles.uns))  # fmt: skip
        )
    what = f"{len(genes)} genes predicted for {int(ok.sum())} tiles" + (", also in .X" if in_x else "")
    save_output(tiles, "obsm", Keys.PREDICTED_EXPRESSION, df, table=tile_key, what=what)
    save_output(tiles, "uns", Keys.PREDICTED_EXPRESSION, {
        "protocol": lp.protocol,
        "embedding": list(lp.embedding_keys),
        "genes": list(lp.genes),
        "units": _UNITS[lp.protocol],
        "probe": name,
        "in_X": in_x,
        **({"target_sum": float(lp.target_sum)} if lp.target_sum is not None else {}),
        **{f"fitted_{k}": v for k, v in lp.tiling.items()},
        **{f"heldout_{k}": v for k, v in lp.scores.items() if k in ("pcc", "gene_pcc", "mse", "n_eval")},
    }, table=tile_key, what="probe record")  # fmt: skip
    return tiles


def _write_retrieval(tiles, model: SigmmaModel, k: int, tile_key: str) -> None:
    ref = model.reference
    z = np.asarray(tiles.obsm[Keys.embedding()["image"][ref.scale]], dtype=np.float32)
    idx, score = ref.query(z, k)
    what = f"the {idx.shape[1]} closest training tiles ({ref.scale} ST embeddings) of {len(z)} tiles"
    save_outputs(tiles, "obsm", {RETRIEVED: idx, f"{RETRIEVED}_score": score}, table=tile_key, what=what)
    top = pd.Categorical(np.asarray(ref.names, dtype=object)[idx[:, 0]])
    save_outputs(tiles, "obs", {"sigmma_top_hit": top, "sigmma_top_hit_score": score[:, 0]}, table=tile_key, what="best hit")
    save_output(tiles, "uns", RETRIEVED, {
        "names": list(ref.names),
        "x0": ref.xy[:, 0].tolist(),
        "y0": ref.xy[:, 1].tolist(),
        "section": ref.section,
        "scale": ref.scale,
        "k": int(idx.shape[1]),
    }, table=tile_key, what="retrieval record")  # fmt: skip


def _write_zarr(sdata: SpatialData, image_key: str, tile_key: str, out: Path) -> None:
    """Write tiles, tile table and a ~4 µm/px overview image (not the full-resolution slide) to ``out``."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    from ..data._tiles import tile_params, tile_reader

    params = tile_params(sdata, tile_key)
    reader = tile_reader(sdata, tile_key, image_key)
    level = reader.level_for(OVERVIEW_UM)
    lv = reader.levels[level]
    f = max(1, int(OVERVIEW_UM // lv.pixel_size_um))
    data = lv.data
    if f > 1:
        import dask.array as da

        data = da.coarsen(np.mean, data, {1: f, 2: f}, trim_excess=True).astype(np.uint8)
    matrix = lv.to_cs @ np.diag([float(f), float(f), 1.0])
    overview = Image2DModel.parse(
        data.rechunk((3, 1024, 1024)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={params["coordinate_system"]: Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    shapes_key = params["shapes_key"]
    small = sd.SpatialData(
        images={f"{image_key}_overview": overview},
        shapes={shapes_key: sdata.shapes[shapes_key]},
        tables={tile_key: sdata.tables[tile_key]},
    )
    small.attrs.update(sdata.attrs)
    small.write(out)
    logger.info("Wrote %s (tiles, tile table, %.1f µm/px overview image).", out, lv.pixel_size_um * f)
