"""Read a 10x Visium HD output (bins or segmented cells) into SpatialData with its H&E and a physical scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._common import check_folder, element_counts, record_scale

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_TIFF = (".tif", ".tiff", ".btf")


def visium_hd(
    path: str | Path,
    *,
    bins: int | Literal["cells"] = 8,
    dataset_id: str | None = None,
    fullres_image_file: str | Path | None = None,
    image_key: str = "he",
    **kwargs: Any,
) -> SpatialData:
    """Read a Visium HD output folder with :func:`spatialdata_io.visium_hd`, ready for ``sg.pp.tile``.

    One set of observations becomes the cell table ``'table'``: the square bins of ``bins`` µm, or the
    segmented cells (Space Ranger 4 ``segmented_outputs``). The full-resolution microscope image (H&E) is the
    image; a TIFF is read lazily tile by tile (tifffile), not whole as spatialdata-io's reader does.

    Coordinates: spatialdata-io's coordinate system ``dataset_id`` is the full-resolution image pixel grid; it
    is also added as ``'global'`` to the image and the observations. One unit is ``microns_per_pixel`` µm (from
    ``scalefactors_json.json``), recorded in ``sdata.attrs['sigmma']['um_per_unit']``.

    Parameters
    ----------
    path
        Space Ranger output folder (``*feature_slice.h5``, ``binned_outputs/``, ``segmented_outputs/``,
        ``microscope_image/`` or ``fullres_image_file``).
    bins
        Bin size in µm of the observations (2, 8 or 16, as Space Ranger writes them), or ``'cells'`` for the
        segmented cells. 8 µm bins are roughly cell-sized.
    dataset_id
        Prefix of the files; inferred from the feature slice file.
    fullres_image_file
        Full-resolution microscope image; default: the file in ``microscope_image/``.
    image_key
        Name of the image element.
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd`.

    Returns
    -------
    SpatialData with

    - ``images[image_key]``: the full-resolution image (multiscale; ``'global'`` and ``dataset_id``), plus the
      hires and lowres images of spatialdata-io.
    - ``tables['table']``: the bins' or cells' counts annotating their squares or polygons;
      ``.obs['cell_id']``: barcodes (bins) or cell ids.
    - ``attrs['sigmma']['um_per_unit']``: ``{'global': microns_per_pixel, dataset_id: microns_per_pixel}``.
    """
    import spatialdata_io
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation, set_transformation

    cells = isinstance(bins, str)
    if cells and bins != "cells":
        raise ValueError(f"`bins` must be a bin size in µm (e.g. 8) or 'cells', got {bins!r}.")
    if not cells and (not isinstance(bins, int) or bins <= 0):
        raise ValueError(f"`bins` must be a positive integer bin size in µm (e.g. 8) or 'cells', got {bins!r}.")
    required = {"*feature_slice.h5": "feature slice"}
    if cells:
        required |= {
            "segmented_outputs/filtered_feature_cell_matrix.h5": "cell counts",
            "segmented_outputs/cell_segmentations.geojson": "cell polygons",
        }
    path = check_folder(path, required, "Visium HD")
    bin_name = "cell_segmentations" if cells else f"square_{bins:03d}um"
    if not cells:
        available = sorted(p.name for p in path.glob("binned_outputs/square_*um") if p.is_dir())
        if bin_name not in available:
            raise FileNotFoundError(
                f"No {bins} µm bins in {path / 'binned_outputs'} (found {available}); pass `bins=` with one of "
                "those sizes, or bins='cells' for the segmented cells."
            )
    image_file = _fullres_image(path, fullres_image_file)
    scalefactors = _scalefactors(path, "segmented_outputs" if cells else f"binned_outputs/{bin_name}")
    mpp = float(scalefactors["microns_per_pixel"])

    kwargs.setdefault("load_segmentations_only", cells)
    if not cells:
        kwargs.setdefault("bin_size", bins)
    sdata = spatialdata_io.visium_hd(path, dataset_id=dataset_id, fullres_image_file=image_file, **kwargs)
    table = sdata.tables[bin_name]
    region, _, _ = get_table_keys(table)
    shapes_key = region if isinstance(region, str) else region[0]
    cs = next(iter(get_transformation(sdata.shapes[shapes_key], get_all=True)))  # dataset_id's pixel frame
    full = [k for k in sdata.images if k.endswith("_full_image")]
    if not full:
        raise ValueError(f"No full-resolution image was read from {path}; pass `fullres_image_file=`.")
    if image_key in sdata.images:
        raise ValueError(f"spatialdata_io.visium_hd already read an image named {image_key!r}; choose another.")
    image = sdata.images[full[0]]
    transformations = dict(get_transformation(image, get_all=True))
    if Path(image_file).suffix.lower() in _TIFF:
        from ._anndata import image_levels, parse_image

        levels, c_coords = image_levels(Path(image_file))
        image = parse_image(levels, c_coords, transformations)
    del sdata.images[full[0]]
    sdata.images[image_key] = image
    for element in (sdata.images[image_key], sdata.shapes[shapes_key]):
        set_transformation(element, get_transformation(element, cs), to_coordinate_system="global")

    for name in list(sdata.tables):
        if name != bin_name:
            del sdata.tables[name]
    del sdata.tables[bin_name]
    if not any(str(c).lower() == "cell_id" for c in table.obs):
        table.obs["cell_id"] = table.obs_names.astype(str)
    sdata.tables["table"] = table
    record_scale(sdata, {"global": mpp, cs: mpp})
    what = "segmented cells" if cells else f"{bins} µm bins"
    logger.info("Read Visium HD %s (%s, %.4g µm/px): %s", path, what, mpp, element_counts(sdata))
    return sdata


def _fullres_image(path: Path, given: str | Path | None) -> Path:
    if given is not None:
        given = Path(given)
        if not given.exists():
            raise FileNotFoundError(f"Full-resolution image {str(given)!r} does not exist; check fullres_image_file.")
        return given
    found = sorted(p for p in (path / "microscope_image").glob("*") if p.is_file())
    found = found or sorted(path.glob("*tissue_image.*"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{'No' if not found else 'Several'} full-resolution microscope image(s) in {path / 'microscope_image'}"
            f"{': ' + ', '.join(p.name for p in found) if found else ''}; pass fullres_image_file='...tif' (the H&E "
            "given to Space Ranger)."
        )
    return found[0]


def _scalefactors(path: Path, folder: str) -> dict:
    file = path / folder / "spatial" / "scalefactors_json.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing; restore it from the Space Ranger output.")
    factors = json.loads(file.read_text())
    if not float(factors.get("microns_per_pixel", 0)) > 0:
        raise ValueError(f"{file} has no positive 'microns_per_pixel'; restore it from the Space Ranger output.")
    return factors
