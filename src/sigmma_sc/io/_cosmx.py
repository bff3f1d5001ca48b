"""Read a NanoString CosMx SMI export into SpatialData: FOV images stitched into one lazy morphology mosaic."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sigmma_sc._utils._validate import check_positive

from ._common import CELLS_KEY, annotate_circles, check_folder, element_counts, record_scale

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

COSMX_PIXEL_SIZE_UM = 0.12028
_MOSAIC_CHUNK = 2048


def cosmx(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    pixel_size_um: float = COSMX_PIXEL_SIZE_UM,
    composite: Literal["gray", "rgb"] = "gray",
    image_key: str = "morphology",
    transcripts: bool = False,
    **kwargs: Any,
) -> SpatialData:
    """Read a CosMx SMI flat-file export with :func:`spatialdata_io.cosmx`, ready for ``sg.pp.tile``.

    spatialdata-io reads one image and one label image per field of view (FOV), each placed in the
    ``'global'`` pixel frame by an affine estimated from the cells' local and global centroids, and a table
    annotating the per-FOV labels. Here the FOV images (``CellComposite``) are stitched into one lazy mosaic
    (read FOV by FOV when a window is needed, never whole) and the cells are added as circles at their global
    centroids (radius from ``Area``), which the table then annotates; the per-FOV labels are kept.

    Coordinates: ``'global'`` is the CosMx global pixel grid; one unit is ``pixel_size_um`` µm, recorded in
    ``sdata.attrs['sigmma']['um_per_unit']['global']``.

    Parameters
    ----------
    path
        Export folder (``*_exprMat_file.csv``, ``*_metadata_file.csv``, ``*_fov_positions_file.csv``,
        ``CellComposite/``, ``CellLabels/``).
    dataset_id
        Prefix of the files; inferred when there is one counts file.
    pixel_size_um
        Size of a CosMx pixel in µm: 0.12028 for the current instrument (1k/6k panels); 0.18 for early
        datasets (e.g. the public NSCLC lung set). Check your run's metadata.
    composite
        ``'gray'``: the composite's channels are merged (maximum) into one morphology channel, treated as a
        fluorescence image (dark background). ``'rgb'``: keep the 3 channels; sigmma_sc then treats the image
        like an H&E (bright background), which suits only brightfield images.
    image_key
        Name of the mosaic image element (it replaces the per-FOV images).
    transcripts
        Whether to read the transcripts (points; large).
    **kwargs
        Passed to :func:`spatialdata_io.cosmx`.

    Returns
    -------
    SpatialData with

    - ``images[image_key]``: the stitched FOV mosaic (multiscale) in ``'global'``.
    - ``shapes['cell_circles']``: the cells, annotated by ``tables['table']`` (obs names ``'{cell_ID}_{fov}'``;
      CosMx's per-FOV ``.obs['cell_ID']`` forbids a ``'cell_id'`` column; ``.obsm['spatial']``: global centroids
      in µm; ``.obsm['global']``: in pixels).
    - ``labels['{fov}_labels']``: the per-FOV cell labels (spatialdata-io's).
    - ``attrs['sigmma']['um_per_unit']``: ``{'global': pixel_size_um}``.
    """
    import spatialdata_io
    from spatialdata.transformations import Identity

    pixel_size_um = check_positive(pixel_size_um, "pixel_size_um")
    if composite not in ("gray", "rgb"):
        raise ValueError(f"`composite` must be 'gray' or 'rgb', got {composite!r}.")
    prefix = "*" if dataset_id is None else f"{dataset_id}_"
    path = check_folder(
        path,
        {
            f"{prefix}exprMat_file.csv": "counts",
            f"{prefix}metadata_file.csv": "cell metadata",
            f"{prefix}fov_positions_file.csv": "FOV positions",
            "CellComposite/*": "FOV images",
            "CellLabels/*": "FOV labels",
        },
        "CosMx",
    )
    sdata = spatialdata_io.cosmx(path, dataset_id=dataset_id, transcripts=transcripts, **kwargs)
    fov_images = [k for k in sdata.images if k.endswith("_image")]
    if not fov_images:
        raise ValueError(f"spatialdata_io.cosmx read no FOV image from {path / 'CellComposite'}; check the folder.")
    if image_key in sdata.images or image_key in sdata.labels:
        raise ValueError(f"spatialdata_io.cosmx already read an element named {image_key!r}; choose another image_key.")
    mosaic = _mosaic([sdata.images[k] for k in fov_images], gray=composite == "gray")
    for k in fov_images:
        del sdata.images[k]
    sdata.images[image_key] = mosaic

    table = sdata.tables["table"]
    xy = np.asarray(table.obsm["global"], dtype=np.float64)
    if "Area" in table.obs:
        radius = np.sqrt(np.clip(table.obs["Area"].to_numpy(dtype=np.float64), 1.0, None) / np.pi)
    else:
        radius = np.full(len(xy), 5.0 / pixel_size_um)
    table.obsm["spatial"] = xy * pixel_size_um
    del sdata.tables["table"]
    sdata.tables["table"] = annotate_circles(sdata, table, xy, radius, {"global": Identity()}, key=CELLS_KEY)
    record_scale(sdata, {"global": pixel_size_um})
    logger.info("Read CosMx export %s (%d FOVs stitched): %s", path, len(fov_images), element_counts(sdata))
    return sdata


def _mosaic(elements: list, *, gray: bool):
    """One lazy image of the FOV images at their (integer) global offsets; later FOVs overwrite overlaps."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Translation, get_transformation

    fovs = []
    for element in elements:
        m = get_transformation(element, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        if not np.allclose(m[:2, :2], np.eye(2), atol=1e-3):
            raise ValueError(
                "A CosMx FOV is placed in 'global' by a scaled or rotated affine "
                f"({np.round(m[:2, :2], 4).tolist()}), not a translation; the FOVs cannot be stitched. Check the "
                "local and global centroids of the metadata file, or read the FOVs with spatialdata_io.cosmx."
            )
        data = element.data
        if gray:
            data = data.max(axis=0, keepdims=True)
        fovs.append((int(np.rint(m[0, 2])), int(np.rint(m[1, 2])), data))
    x0, y0 = min(f[0] for f in fovs), min(f[1] for f in fovs)
    width = max(f[0] + f[2].shape[2] for f in fovs) - x0
    height = max(f[1] + f[2].shape[1] for f in fovs) - y0
    n_c, dtype = fovs[0][2].shape[0], fovs[0][2].dtype
    paste = _Paste([(fx - x0, fy - y0, arr) for fx, fy, arr in fovs], dtype)
    template = da.zeros((n_c, height, width), dtype=dtype, chunks=(n_c, _MOSAIC_CHUNK, _MOSAIC_CHUNK))
    mosaic = template.map_blocks(paste, dtype=dtype)
    n_scales = int(np.clip(np.floor(np.log2(max(min(height, width) / 256, 1.0))), 0, 5))
    return Image2DModel.parse(
        mosaic,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"] if n_c == 3 else ["composite"],
        scale_factors=[2] * n_scales or None,
        transformations={"global": Translation([x0, y0], axes=("x", "y"))},
    )


class _Paste:
    """Fills a mosaic block from the FOVs it overlaps; keeps the last few decoded FOVs (JPEG decoding is slow).

    Picklable (the cache and its lock are dropped), so that forked or spawned readers can use it.
    """

    def __init__(self, placed: list, dtype: np.dtype, cache_size: int = 4) -> None:
        self.placed, self.dtype, self.cache_size = placed, np.dtype(dtype), cache_size
        self.__setstate__(self.__dict__)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        import threading
        from collections import OrderedDict

        self.__dict__.update(state)
        self._cache, self._lock = OrderedDict(), threading.Lock()

    def _fov(self, i: int) -> np.ndarray:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            data = np.asarray(self.placed[i][2].compute(scheduler="synchronous"))
            self._cache[i] = data
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return data

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        (_, _), (r0, r1), (q0, q1) = block_info[0]["array-location"]
        out = np.zeros(block.shape, self.dtype)
        for i, (fx, fy, arr) in enumerate(self.placed):
            h, w = arr.shape[1:]
            ya, yb, xa, xb = max(r0, fy), min(r1, fy + h), max(q0, fx), min(q1, fx + w)
            if yb > ya and xb > xa:
                out[:, ya - r0 : yb - r0, xa - q0 : xb - q0] = self._fov(i)[:, ya - fy : yb - fy, xa - fx : xb - fx]
        return out
