"""Which image features an expression probe reads, chosen on validation tiles (issue 25 item 3).

SIGMMA's image embedding, the fine-tuned encoder's pooled features or the frozen backbone's.

A probe is a linear map of features a new slide can give too: all three are computed from the tile images alone
(``sg.tl.embed``, the fine-tuned encoder of the model, ``sg.tl.featurize`` with the model's backbone settings).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import SCALES, Keys
from .._utils._write import save_outputs

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)

#: candidate inputs of a probe, in order of preference on a tie
SOURCES = ("sigmma", "encoder", "backbone")


def source_keys(source: str, scales: tuple[str, ...], use_rep: str = Keys.PREFIX) -> list[str]:
    """Tile-table ``.obsm`` keys of a feature source at ``scales`` (in scale order)."""
    ordered = [s for s in SCALES if s in scales]
    if source == "sigmma":
        return [Keys.embedding(use_rep)["image"][s] for s in ordered]
    if source == "encoder":
        return [f"X_{use_rep}_{s}_encoder" for s in ordered]
    if source == "backbone":
        return [Keys.BACKBONE.format(scale=s) for s in ordered]
    raise ValueError(f"`features` must be 'auto' or one of {SOURCES}, got {source!r}.")


def source_of(keys: list[str]) -> str:
    """The source (:data:`SOURCES`) whose keys these are (any prefix for the model's own features)."""
    if all(k.startswith("sigmma_backbone_") for k in keys):
        return "backbone"
    if all(k.startswith("X_") and k.endswith("_encoder") for k in keys):
        return "encoder"
    return "sigmma"


def ensure_features(
    sdata: SpatialData,
    model: SigmmaModel,
    source: str,
    keys: list[str],
    *,
    tile_key: str = Keys.TILE_TABLE,
    batch_size: int = 32,
    device: str | None = None,
) -> None:
    """Compute the features ``keys`` of ``source`` into the tile table when they are missing.

    ``'backbone'``: :func:`sigmma_sc.tl.featurize` with the model's backbone, weights and crop size (the frozen
    backbone the model started from). ``'encoder'``: the fine-tuned model's encoder, mean-pooled crop features per
    scale. ``'sigmma'`` must come from :func:`sigmma_sc.tl.embed` (``KeyError`` naming it).
    """
    tiles = sdata.tables[tile_key]
    missing = [k for k in keys if k not in tiles.obsm]
    if not missing:
        return
    cfg = model.config
    if source == "backbone":
        from ._featurize import featurize

        featurize(
            sdata, backbone=cfg.backbone, tile_key=tile_key, pretrained=cfg.backbone_pretrained,
            weights=cfg.backbone_weights, input_size=(cfg.backbone_info or {}).get("input_size"), device=device,
            overwrite=True,
        )  # fmt: skip
        return
    if source == "encoder":
        feats = encoder_features(sdata, model, tile_key=tile_key, batch_size=batch_size, device=device)
        feats = {k: v for k, v in feats.items() if k in keys}
        save_outputs(tiles, "obsm", feats, table=tile_key, what="the fine-tuned encoder's pooled features")
        return
    raise KeyError(f"Tile table {tile_key!r} lacks `.obsm` {missing}; run `sg.tl.embed(sdata, model)` first.")


def encoder_features(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    tile_key: str = Keys.TILE_TABLE,
    batch_size: int = 32,
    device: str | None = None,
    use_rep: str = Keys.PREFIX,
) -> dict[str, np.ndarray]:
    """The fine-tuned encoder's mean-pooled crop features of every tile, per scale (``'X_{use_rep}_{s}_encoder'``)."""
    import torch

    from ..data._tiles import iter_tile_images
    from ..model._finetune import encode_tiles

    if not model.finetuned:
        raise ValueError("The model does not fine-tune its backbone: its encoder's features are the backbone's.")
    enc = model.image_encoder
    if device is not None:
        model.to(device)
    dev = next(enc.parameters()).device
    was = enc.training
    enc.eval()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in model.scales}
    images = iter_tile_images(sdata, tile_key=tile_key)
    try:
        with torch.inference_mode():
            while batch := [img for _, img in zip(range(batch_size), images, strict=False)]:
                feats = encode_tiles(enc, torch.from_numpy(np.stack(batch)).to(dev), model.scales)
                for s, f in feats.items():
                    parts[s].append(f.cpu().numpy())
    finally:
        enc.train(was)
    keys = dict(zip(model.scales, source_keys("encoder", model.scales, use_rep), strict=True))
    return {keys[s]: np.concatenate(v).astype(np.float32) for s, v in parts.items()}


def choose_features(
    sdata: SpatialData,
    model: SigmmaModel,
    *,
    scales: tuple[str, ...],
    candidates: tuple[str, ...],
    use_rep: str,
    tile_key: str,
    probe_kwargs: dict[str, Any],
) -> tuple[str, dict[str, dict[str, float]]]:
    """The candidate whose probe predicts the *validation* tiles best (gene-wise PCC), and every candidate's scores.

    Each candidate's probe is fitted on the training tiles (penalty chosen on validation tiles) and scored on the
    validation tiles only; test tiles are not looked at.
    """
    from ..metrics import linear_probe

    scores: dict[str, dict[str, float]] = {}
    for source in candidates:
        keys = source_keys(source, scales, use_rep)
        ensure_features(sdata, model, source, keys, tile_key=tile_key)
        s = linear_probe(sdata, keys, eval_split="val", tile_key=tile_key, **probe_kwargs).summary()
        scores[source] = {"gene_pcc": float(s["gene_pcc"]), "pcc": float(s["pcc"]), "n_val": int(s["n_eval"])}
    best = max(candidates, key=lambda c: (np.nan_to_num(scores[c]["gene_pcc"], nan=-np.inf), -candidates.index(c)))
    return best, scores
