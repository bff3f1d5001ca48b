"""``sg.tl.embed``: per-scale SIGMMA embeddings of tiles (both modalities) and cells."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SCALES, Keys
from .._utils._validate import get_table
from ..data._bundle import _hash_names, build_bundle
from ..data._tiles import tile_params
from ._featurize import featurize

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)


def embed(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    table_key: str | None = "table",
    tile_key: str = Keys.TILE_TABLE,
    image_key: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> None:
    """Write SIGMMA's per-scale embeddings of every tile and cell.

    The image side uses the tile table's cached backbone features (computed with the model's backbone if
    missing). The ST side needs :func:`sigmma_sc.pp.cell_graph` with the node features the model was trained
    on; with ``table_key=None`` (an image-only section, e.g. an H&E without transcriptomics) only the image
    embeddings are written.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile` (and :func:`sigmma_sc.pp.cell_graph`).
    model
        A trained :class:`~sigmma_sc.model.SigmmaModel`.
    table_key
        Cell table, or ``None`` for image-only embedding.
    tile_key
        Tile table.
    image_key
        Image to featurize if features are not cached (default: the tiled image).
    batch_size
        Tiles per forward pass.
    device
        Torch device (default: the model's).

    Returns
    -------
    ``None``. Writes, for each of the model's scales:

    - tile table ``.obsm['X_sigmma_{scale}_image']`` and (with ST) ``.obsm['X_sigmma_{scale}_st']``;
    - cell table ``.obsm['X_sigmma_{scale}']``: each cell's node embedding in the shared space (NaN for
      untiled cells);
    - ``.uns['sigmma']['embed']`` of both tables: model configuration and backbone.
    """
    tile_params(sdata, tile_key)  # a clear error before anything else if sg.pp.tile has not run
    tiles = get_table(sdata, tile_key)
    cfg = model.config
    cached = tiles.uns.get(Keys.UNS, {}).get("backbone", {})
    if (
        cached
        and cached.get("name") != cfg.backbone
        and any(Keys.BACKBONE.format(scale=s) in tiles.obsm for s in SCALES)
    ):
        if cached.get("num_features") != cfg.image_dim:
            raise ValueError(
                f"The tile table's cached features come from backbone {cached.get('name')!r} "
                f"({cached.get('num_features')} features) but the model was trained on {cfg.backbone!r} "
                f"({cfg.image_dim}). Re-run `sg.tl.featurize(sdata, backbone={cfg.backbone!r}, overwrite=True)`."
            )
        logger.warning("Cached features come from %r, the model from %r.", cached.get("name"), cfg.backbone)
    finetuned = getattr(model, "finetuned", False)
    trained_size = (cfg.backbone_info or {}).get("input_size")
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
    if not cached and not finetuned:  # featurize as for training: same weights and crop size
        featurize(
            sdata, backbone=cfg.backbone, tile_key=tile_key, image_key=image_key, device=device,
            pretrained=cfg.backbone_pretrained, weights=cfg.backbone_weights,
            input_size=trained_size,
        )  # fmt: skip
    if device is not None:
        model.to(device)

    if finetuned:  # its backbone changed: encode tile images, streamed in chunks
        from ..data._tiles import iter_tile_images

        chunks: dict[str, list] = {}
        images = iter_tile_images(sdata, tile_key=tile_key, image_key=image_key)
        while batch := [img for _, img in zip(range(batch_size), images, strict=False)]:
            for s, z in model.encode_image(tiles=np.stack(batch), batch_size=batch_size).items():
                chunks.setdefault(s, []).append(z.cpu())
        import torch

        z_img = {s: torch.cat(v) for s, v in chunks.items()}
    else:
        feats = {s: np.asarray(tiles.obsm[Keys.BACKBONE.format(scale=s)], dtype=np.float32) for s in SCALES}
        if feats["macro"].shape[1] != cfg.image_dim:
            raise ValueError(
                f"The cached backbone features have {feats['macro'].shape[1]} dimensions, the model expects "
                f"{cfg.image_dim}. Re-run `sg.tl.featurize(sdata, backbone={cfg.backbone!r}, overwrite=True)`."
            )
        z_img = model.encode_image(feats, batch_size=batch_size)
    written = []
    for s, z in z_img.items():
        tiles.obsm[Keys.EMB_IMAGE.format(scale=s)] = z.numpy()
        written.append(Keys.EMB_IMAGE.format(scale=s))
    record = {"config": cfg.to_dict(), "backbone": cfg.backbone}

    if table_key is not None:
        cells = get_table(sdata, table_key)
        bundle, rows = build_bundle(sdata, table_key=table_key, tile_key=tile_key, require_image_features=False)
        _check_st_space(model, bundle.meta, cells)
        z_tile, z_cell = model.encode_st(bundle, batch_size=batch_size)
        for s in z_tile:
            tiles.obsm[Keys.EMB_ST.format(scale=s)] = z_tile[s].numpy()
            full = np.full((cells.n_obs, z_cell[s].shape[1]), np.nan, dtype=np.float32)
            full[rows] = z_cell[s].numpy()
            cells.obsm[Keys.EMB_CELL.format(scale=s)] = full
            written.append(Keys.EMB_ST.format(scale=s))
        uns = dict(cells.uns.get(Keys.UNS, {}))
        uns["embed"] = record
        cells.uns[Keys.UNS] = uns
        logger.info("Wrote cell table %r .obsm%s.", table_key, [Keys.EMB_CELL.format(scale=s) for s in z_cell])
    uns = dict(tiles.uns.get(Keys.UNS, {}))
    uns["embed"] = record
    tiles.uns[Keys.UNS] = uns
    logger.info("Wrote tile table %r .obsm%s.", tile_key, written)


def _check_st_space(model: SigmmaModel, meta: dict, cells) -> None:
    trained = model.meta or {}
    if meta["n_features"] != model.config.n_features:
        raise ValueError(
            f"The node features `.obsm[{meta['features_key']!r}]` have {meta['n_features']} dimensions, the model "
            f"was trained on {model.config.n_features}. Compute the same node features as for training "
            f"(`sg.pp.cell_graph(sdata, features={trained.get('features_key')!r})`)."
        )
    pca = (cells.uns.get(Keys.UNS, {}).get("cell_graph") or {}).get("pca") or {}
    section_genes = {_hash_names(cells.var_names)}  # a cohort model: the genes of the PCA the section was projected on
    if pca.get("var_names") is not None:
        section_genes.add(_hash_names(np.asarray(pca["var_names"]).astype(str)))
    if trained.get("features_key") == Keys.FEATURES and trained.get("var_names_hash") not in (None, *section_genes):
        raise ValueError(
            "The section's genes differ from those the model was trained on, so its PCA node features live in "
            "another space. Embed sections with the same gene panel, or train on shared node features "
            "(e.g. a foundation-model embedding passed as `sg.pp.cell_graph(sdata, features=...)`)."
        )
