"""Read a Vizgen MERSCOPE region into SpatialData with one morphology channel and a physical scale."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._common import check_folder, element_counts, record_scale

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_TRANSFORM = "images/micron_to_mosaic_pixel_transform.csv"


def merscope(
    path: str | Path,
    *,
    channel: str = "DAPI",
    z_layer: int = 3,
    image_key: str = "morphology",
    transcripts: bool = False,
    **kwargs: Any,
) -> SpatialData:
    """Read a Vizgen MERSCOPE region folder with :func:`spatialdata_io.merscope`, ready for ``sg.pp.tile``.

    Coordinates: ``'global'`` is the mosaic pixel grid, as spatialdata-io builds it (cell polygons are mapped
    there from µm by ``images/micron_to_mosaic_pixel_transform.csv``); its µm per unit (about 0.108 for
    MERSCOPE) is read from that matrix and recorded in ``sdata.attrs['sigmma']['um_per_unit']['global']``.

    Parameters
    ----------
    path
        Region folder (holding ``cell_by_gene.csv``, ``cell_metadata.csv``, ``cell_boundaries.parquet`` and
        ``images/``).
    channel
        Mosaic stain kept as the morphology image (``images/mosaic_{channel}_z{z_layer}.tif``), e.g. ``'DAPI'``
        or ``'PolyT'``.
    z_layer
        Z layer of the mosaic image.
    image_key
        Name of the morphology image element (it replaces spatialdata-io's multi-channel image).
    transcripts
        Whether to read ``detected_transcripts.csv`` (points; large).
    **kwargs
        Passed to :func:`spatialdata_io.merscope` (e.g. ``vpt_outputs=``, ``backend=``).

    Returns
    -------
    SpatialData with

    - ``images[image_key]``: the mosaic of ``channel`` (``c = [channel]``) in ``'global'``.
    - ``shapes['{dataset_id}_polygons']``: cell polygons, annotated by ``tables['table']``, whose
      ``.obs['cell_id']`` holds the ``EntityID``.
    - ``attrs['sigmma']['um_per_unit']``: ``{'global': mosaic pixel size in µm}``.
    """
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    from sigmma_sc.data._image import _levels

    from ._anndata import parse_image
    from ._xenium import read_alignment

    required = {_TRANSFORM: "micron to mosaic pixel transform"}
    if "vpt_outputs" not in kwargs:
        required |= {"cell_by_gene.csv": "counts", "cell_metadata.csv": "cells", "cell_boundaries.parquet": "polygons"}
    path = check_folder(path, required, "MERSCOPE")
    stains = sorted(
        {m.group(1) for f in (path / "images").iterdir() if (m := re.fullmatch(r"mosaic_(.+)_z(\d+)\.tif", f.name))}
    )
    if not (path / "images" / f"mosaic_{channel}_z{z_layer}.tif").exists():
        layers = sorted({f.name.rsplit("_z", 1)[-1][:-4] for f in (path / "images").glob("mosaic_*_z*.tif")})
        raise FileNotFoundError(
            f"No mosaic image images/mosaic_{channel}_z{z_layer}.tif in {path}; stains: {stains}, z layers: {layers}. "
            "Pass `channel=` and `z_layer=` with one of them."
        )
    try:
        matrix = read_alignment(np.genfromtxt(path / _TRANSFORM))
    except ValueError as e:
        raise ValueError(
            f"{_TRANSFORM} in {path} is not a valid 3x3 affine matrix ({e}); restore it from the run."
        ) from e
    um_per_px = 1.0 / float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))

    sdata = spatialdata_io.merscope(path, z_layers=z_layer, transcripts=transcripts, **kwargs)
    name = next(k for k in sdata.images if k.endswith(f"_z{z_layer}"))
    element = sdata.images[name]
    levels = [arr.sel(c=[channel]).data for arr in _levels(element)]
    image = parse_image(levels, [channel], dict(get_transformation(element, get_all=True)))
    del sdata.images[name]
    if image_key in sdata.images:
        raise ValueError(
            f"spatialdata_io.merscope already read an image named {image_key!r}; choose another image_key."
        )
    sdata.images[image_key] = image
    if "table" in sdata.tables:
        table = sdata.tables["table"]
        if "cell_id" not in table.obs:
            table.obs["cell_id"] = table.obs_names.astype(str)
    record_scale(sdata, {"global": um_per_px})
    logger.info("Read MERSCOPE region %s (%s at %.4g µm/px): %s", path, channel, um_per_px, element_counts(sdata))
    return sdata
