"""``sg.tl.featurize``: frozen-backbone multi-crop features of every tile, cached in the tile table."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SCALES, Keys
from .._utils._write import save_outputs, save_record
from ..data._records import Tiling
from ..data._tiles import image_modality, iter_tile_images

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def featurize(
    sdata: SpatialData,
    *,
    backbone: str = "efficientnet_lite0",
    tile_key: str = Keys.TILE_TABLE,
    image_key: str | None = None,
    pretrained: bool = True,
    weights: str | Path | None = None,
    input_size: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> dict[str, np.ndarray] | None:
    """Encode every tile with a frozen image backbone: 4x4 micro, 2x2 meso and 1 macro crop, mean-pooled per scale.

    Each crop is resized to the backbone's input size and normalised as the backbone expects; a one-channel
    morphology image (e.g. DAPI) is replicated to three channels. Features are computed once and cached in
    the tile table with the backbone's name; a re-run with the same backbone and image reuses them.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile`.
    backbone
        ``'efficientnet_lite0'`` (offline default, ImageNet weights), ``'uni'`` (UNI ViT-L/16, needs Hugging
        Face access), or any timm model name.
    tile_key
        Tile table.
    image_key
        Image to encode (default: the tiled image).
    pretrained
        Load pretrained weights (``False``: random initialisation, for tests and speed benchmarks).
    weights
        Local weights file for the backbone architecture.
    input_size
        Side in pixels every crop is resized to (default: the backbone's, 224 for EfficientNet-Lite0 and UNI).
        Smaller sides trade feature quality for speed on a CPU (the demo uses 112).
    batch_size
        Tiles per forward pass (21 crops each).
    device
        Torch device (default: :attr:`sigmma_sc.settings.device`, else CUDA when available, else CPU).
    overwrite
        Recompute even if features of the same backbone are cached.
    inplace
        Write into the tile table and return ``None``; otherwise return the features.

    Returns
    -------
    ``None`` if ``inplace``, else scale -> ``(n_tiles, n_features)`` array. In place, writes:

    - tile table ``.obsm['sigmma_backbone_{scale}']`` for micro, meso and macro;
    - tile table ``.uns['sigmma']['backbone']``: name, feature width, image key, pixel size and image modality
      (``'brightfield'`` or ``'fluorescence'``).
    """
    from ..nn import MultiCropEncoder, build_backbone
    from ..nn import featurize as _featurize
    from ..train._device import resolve_device

    tiling = Tiling.resolve(sdata, tile_key)
    params, tiles = tiling.params, tiling.tiles
    image_key = image_key or tiling.image_key
    if image_key not in sdata.images:
        raise KeyError(f"No image {image_key!r} in the SpatialData object; available: {sorted(sdata.images)}.")
    record = {
        "name": str(weights) if weights else backbone,
        "pretrained": bool(pretrained),
        "image_key": image_key,
        "crop_input_size": input_size,
    }
    cached = tiles.uns.get(Keys.UNS, {}).get("backbone", {})
    keys = {s: Keys.BACKBONE.format(scale=s) for s in SCALES}
    if (
        inplace
        and not overwrite
        and all(k in tiles.obsm for k in keys.values())
        and all(cached.get(k) == v for k, v in record.items())
    ):
        logger.info("Reusing cached %r features of %d tiles.", record["name"], tiles.n_obs)
        return None

    model, info = build_backbone(backbone, pretrained=pretrained, weights=weights)
    if input_size is not None:
        if int(input_size) < 16:
            raise ValueError(f"`input_size` must be at least 16 pixels, got {input_size}.")
        info = dataclasses.replace(info, input_size=int(input_size))
    encoder = MultiCropEncoder(model, info)
    device = resolve_device(device)  # the device actually used, named in the log (not "auto")
    logger.info("Encoding %d tiles x 21 crops with %s on %s.", tiles.n_obs, info.name, _device_name(device))
    feats = _featurize(
        iter_tile_images(sdata, tile_key=tile_key, image_key=image_key),
        encoder,
        batch_size=batch_size,
        device=device,
        total=tiles.n_obs,
    )
    if not inplace:
        return feats
    feats = {keys[s]: feats[s].astype(np.float32) for s in SCALES}
    save_outputs(tiles, "obsm", feats, table=tile_key, what=f"{info.name} backbone features")
    backbone = {
        **info.to_dict(), **record, "pixel_size_um": params["pixel_size_um"],
        "modality": image_modality(sdata, tile_key, image_key),
    }  # fmt: skip
    save_record(tiles, Keys.UNS, "backbone", backbone, table=tile_key)
    return None


def _device_name(device) -> str:
    """``'cuda:0 (NVIDIA H100 ...)'`` or ``'cpu (2 threads)'``: what the featurization log names."""
    import torch

    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
