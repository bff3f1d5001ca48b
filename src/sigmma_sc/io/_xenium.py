"""Read a 10x Xenium run, optionally with a registered H&E image, into SpatialData."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from xarray import DataArray, DataTree

logger = logging.getLogger(__name__)

_REQUIRED = ("experiment.xenium", "cells.zarr.zip", "cells.parquet", "cell_feature_matrix.h5")
_HE_SUFFIX = "he_image.ome.tif"
_ALIGNMENT_SUFFIX = "imagealignment.csv"
_HE_CHUNK = 1024


def xenium(
    path: str | Path,
    *,
    he_image: str | Path | None = "auto",
    he_alignment: str | Path | np.ndarray | None = None,
    he_key: str = "he",
    cells_as_circles: bool = True,
    transcripts: bool = False,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Xenium output folder and register an H&E image onto it.

    The run is read with :func:`spatialdata_io.xenium`. The H&E image is added as image element
    ``he_key``: a lazy multiscale image whose levels are the pyramid levels of the OME-TIFF, read tile by
    tile (single-level images are read through :func:`spatialdata_io.xenium_aligned_image`), registered
    with the same :class:`~spatialdata.transformations.Affine` that
    :func:`spatialdata_io.xenium_aligned_image` builds from the alignment file.

    Coordinates: the ``'global'`` coordinate system is the Xenium morphology pixel grid, so one unit is
    ``pixel_size`` µm (0.2125 µm) as read from ``experiment.xenium``; this is recorded in
    ``sdata.attrs['sigmma']['um_per_unit']['global']``. Cell centroids (µm in ``cells.parquet``) are
    placed there by a scale of ``1 / pixel_size``.

    Parameters
    ----------
    path
        Xenium output folder (holding ``experiment.xenium``, ``cells.zarr.zip``, ``cells.parquet`` and
        ``cell_feature_matrix.h5``).
    he_image
        H&E image (OME-TIFF). ``'auto'``: the folder's single ``*he_image.ome.tif`` with its
        ``*he_imagealignment.csv``, if there is one (no H&E otherwise). ``None``: no H&E.
    he_alignment
        3x3 affine matrix that maps H&E pixel coordinates (x, y) to Xenium morphology pixel coordinates,
        as exported by Xenium Explorer (``*_imagealignment.csv``, no header), or the matrix itself.
        Required with an explicit ``he_image``; pass ``numpy.eye(3)`` for an image already in the Xenium
        pixel grid.
    he_key
        Name of the H&E image element.
    cells_as_circles
        Whether to add the cells as circles (shapes ``'cell_circles'``), which the table then annotates.
        Otherwise the table annotates the cell labels (spatialdata-io's default).
    transcripts
        Whether to read the transcripts (points; large).
    **kwargs
        Passed to :func:`spatialdata_io.xenium`. ``aligned_images`` defaults to ``False`` here (the H&E is
        handled by ``he_image``); for folders written by :func:`sigmma_sc.datasets.synthetic_xenium` with
        blank placeholders, the placeholders are not read.

    Returns
    -------
    SpatialData with, in addition to what :func:`spatialdata_io.xenium` reads:

    - ``images[he_key]``: the registered H&E (``c = ['r', 'g', 'b']``), when an H&E is given or found.
    - ``tables['table'].obs['cell_id']``: Xenium cell ids; the table annotates ``'cell_circles'``.
    - ``attrs['sigmma']['um_per_unit']``: µm per coordinate unit, per coordinate system.
    - ``tables['table'].uns['sigmma_synthetic']['contact_program']``: for folders written by
      :func:`sigmma_sc.datasets.synthetic_xenium`, the planted contact programme (genes, cell types, distance).
    """
    import spatialdata_io

    path = Path(path)
    specs = _check_folder(path)
    he_path, matrix = _resolve_he(path, he_image, he_alignment)

    synthetic = specs.get("sigmma_synthetic") or {}
    if transcripts and synthetic.get("transcripts") == "placeholder":
        raise ValueError(
            f"{path} was written by sigmma_sc.datasets.synthetic_xenium(..., transcripts=False) and holds no "
            "transcripts; write it again with transcripts=True, or read it with transcripts=False."
        )
    if synthetic.get("labels") == "blank":
        kwargs.setdefault("cells_labels", False)
        kwargs.setdefault("nucleus_labels", False)
    if synthetic.get("morphology") == "blank":
        kwargs.setdefault("morphology_focus", False)
        kwargs.setdefault("morphology_mip", False)
    kwargs.setdefault("aligned_images", False)

    sdata = spatialdata_io.xenium(path, cells_as_circles=cells_as_circles, transcripts=transcripts, **kwargs)
    if he_path is not None:
        if he_key in sdata.images:
            raise ValueError(f"spatialdata_io.xenium already read an image named {he_key!r}; choose another he_key.")
        image = read_he_image(he_path, matrix)
        if "table" in sdata.tables:
            pixel_size = float(specs["pixel_size"])
            cells_px = sdata.tables["table"].obsm["spatial"] / pixel_size
            _check_overlap(image, matrix, cells_px, pixel_size, _ome_pixel_size_um(Path(he_path)))
        sdata.images[he_key] = image
        logger.info("Added the H&E image %s as images[%r]", he_path.name, he_key)
    if "table" in sdata.tables:
        _check_table(sdata, cells_as_circles=cells_as_circles)
        if (synthetic.get("contact_program") or {}).get(
            "enabled"
        ):  # ground truth of sg.datasets.synthetic_xenium's contact programme
            sdata.tables["table"].uns["sigmma_synthetic"] = {"contact_program": synthetic["contact_program"]}
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": float(specs["pixel_size"])}}
    logger.info("Read Xenium run %s: %s", path, ", ".join(f"{k}={len(v)}" for k, v in _element_counts(sdata)))
    return sdata


def _element_counts(sdata: SpatialData):
    return [
        (name, getattr(sdata, name))
        for name in ("images", "labels", "shapes", "points", "tables")
        if len(getattr(sdata, name))
    ]


def _check_folder(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(
            f"Xenium folder {str(path)!r} does not exist; pass the output folder of a Xenium run "
            "(the one holding experiment.xenium)."
        )
    missing = [f for f in _REQUIRED if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{str(path)!r} is not a Xenium output folder: {', '.join(missing)} missing. Pass the run's output "
            f"folder (it holds {', '.join(_REQUIRED)}), e.g. the 'outs' folder of Xenium Onboard Analysis."
        )
    try:
        specs = json.loads((path / "experiment.xenium").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'experiment.xenium'} is not valid JSON; restore it from the Xenium run.") from e
    if "pixel_size" not in specs:
        raise ValueError(f"{path / 'experiment.xenium'} has no 'pixel_size'; restore it from the Xenium run.")
    return specs


def _resolve_he(path: Path, he_image, he_alignment) -> tuple[Path | None, np.ndarray | None]:
    """Find and validate the H&E image and its alignment matrix before the (slow) read."""
    if he_image is None:
        if he_alignment is not None:
            raise ValueError("he_alignment was given without he_image; pass he_image='...he_image.ome.tif' too.")
        return None, None
    if isinstance(he_image, str) and he_image == "auto":
        found = sorted(path.glob(f"*{_HE_SUFFIX}"))
        if not found:
            logger.info("No *%s in %s; reading without an H&E image.", _HE_SUFFIX, path)
            return None, None
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"Several H&E images in {path} ({names}); pass he_image= and he_alignment= explicitly.")
        he_path = found[0]
        if he_alignment is None:
            he_alignment = he_path.with_name(he_path.name.replace(".ome.tif", "") + "alignment.csv")
            if not he_alignment.exists():
                raise FileNotFoundError(
                    f"Found the H&E image {he_path.name} but not its alignment file {he_alignment.name}; export it "
                    "from Xenium Explorer and pass he_alignment='...csv', or pass he_image=None to skip the H&E."
                )
    else:
        he_path = _locate(he_image, path)
        if not he_path.exists():
            raise FileNotFoundError(f"H&E image {str(he_path)!r} does not exist; check he_image.")
        if he_alignment is None:
            raise ValueError(
                "he_image was given without he_alignment; pass he_alignment='..._imagealignment.csv' (the 3x3 "
                "matrix from Xenium Explorer that maps H&E pixels to Xenium pixels), or numpy.eye(3) if the "
                "image is already in the Xenium pixel grid."
            )
    if isinstance(he_alignment, str | Path):
        he_alignment = _locate(he_alignment, path)
    return he_path, read_alignment(he_alignment)


def _locate(file: str | Path, folder: Path) -> Path:
    """``file`` as given, or inside the run folder when it is a bare relative name found there."""
    file = Path(file)
    if not file.exists() and not file.is_absolute() and (folder / file).exists():
        return folder / file
    return file


def read_alignment(alignment: str | Path | np.ndarray) -> np.ndarray:
    """Read and validate a 3x3 affine alignment matrix (H&E pixels to Xenium morphology pixels).

    Parameters
    ----------
    alignment
        CSV file without header (Xenium Explorer's ``*_imagealignment.csv``) or an array.

    Returns
    -------
    The matrix, shape ``(3, 3)``, float64.
    """
    fix = "export the alignment from Xenium Explorer (3 rows of 3 comma-separated numbers, last row 0,0,1)"
    if isinstance(alignment, str | Path):
        alignment = Path(alignment)
        if not alignment.exists():
            raise FileNotFoundError(f"Alignment file {str(alignment)!r} does not exist; {fix}.")
        try:
            table = pd.read_csv(alignment, header=None)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"Alignment file {alignment.name} is not a 3x3 numeric CSV matrix; {fix}.") from e
        source = f"Alignment file {alignment.name}"
    else:
        table = pd.DataFrame(np.asarray(alignment))
        source = "he_alignment"
    if table.shape != (3, 3):
        raise ValueError(f"{source} has shape {table.shape}, expected a 3x3 matrix; {fix}.")
    try:
        matrix = table.apply(pd.to_numeric).to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source} contains non-numeric values; {fix}.") from e
    if not np.isfinite(matrix).all():
        raise ValueError(f"{source} contains non-finite values; {fix}.")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(f"{source} is not affine (last row {matrix[2].tolist()}, expected [0, 0, 1]); {fix}.")
    linear = matrix[:2, :2]
    if abs(np.linalg.det(linear)) <= 1e-12 * max(np.abs(linear).max(), 1e-300) ** 2:
        raise ValueError(f"{source} is singular (not invertible); {fix}.")
    return matrix


def read_he_image(image_path: str | Path, matrix: np.ndarray) -> DataArray | DataTree:
    """Read an H&E OME-TIFF lazily as a (multiscale) image registered to the Xenium pixel grid.

    Parameters
    ----------
    image_path
        OME-TIFF; a tiled pyramid (SubIFDs or OME levels) is read level by level, tile by tile.
    matrix
        3x3 affine from H&E pixel coordinates (x, y) to Xenium morphology pixel coordinates.

    Returns
    -------
    Image element with the transformation ``{'global': Affine(matrix)}``.
    """
    import spatialdata_io
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine, set_transformation

    transformation = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    levels, dims = _tiff_levels(Path(image_path))
    if levels is None:  # not tiled: spatialdata-io reads it whole
        image = spatialdata_io.xenium_aligned_image(image_path, None, c_coords=["r", "g", "b"])
        set_transformation(image, transformation, to_coordinate_system="global")
        return image
    c_coords = ["r", "g", "b"] if dict(zip(dims, levels[0].shape, strict=True)).get("c") == 3 else None
    if len(levels) == 1:
        return Image2DModel.parse(levels[0], dims=dims, c_coords=c_coords, transformations={"global": transformation})
    tree = _datatree(levels, dims, c_coords)
    set_transformation(tree, {"global": transformation}, set_all=True)
    Image2DModel().validate(tree)
    return tree


class _TiffLevel:
    """Array-like view of one pyramid level of a tiled TIFF; each read opens the file (fork- and pickle-safe)."""

    def __init__(self, path: Path, level: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.level, self.shape, self.dtype = str(path), level, shape, np.dtype(dtype)
        self.ndim = len(shape)

    def __getitem__(self, key):
        import tifffile
        import zarr

        with tifffile.TiffFile(self.path) as tif:
            store = tif.series[0].aszarr(level=self.level)
            try:
                return zarr.open_array(store, mode="r")[key]
            finally:
                store.close()


def _tiff_levels(path: Path, *, tiled_only: bool = True):
    """Lazy dask arrays of the pyramid levels of a tiled TIFF (``None`` if not tiled and ``tiled_only``), and dims."""
    import dask.array as da
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if tiled_only and not series.keyframe.is_tiled:
            return None, None
        axes = series.axes
        shapes = [(lv.shape, lv.dtype) for lv in series.levels]
    dims, squeeze = [], []
    for i, ax in enumerate(axes):
        if ax in "YX":
            dims.append(ax.lower())
        elif (ax in "SC" or (ax in "QI" and not set(axes) & set("SC"))) and "c" not in dims:
            dims.append("c")  # a plain multi-page TIFF (pages 'Q'/'I', no OME axes): its pages are the channels
        else:
            squeeze.append(i)
    chunks = tuple(_HE_CHUNK if ax in "YX" else -1 for ax in axes)
    levels = []
    for k, (shape, dtype) in enumerate(shapes):
        level = da.from_array(
            _TiffLevel(path, k, shape, dtype), chunks=chunks, lock=False, meta=np.empty((0,) * len(shape), dtype)
        )
        if squeeze:
            level = level.squeeze(axis=tuple(squeeze))
        if "c" not in dims:
            level = level[None]
        levels.append(level)
    return levels, tuple(dims) if "c" in dims else ("c", *dims)


def _datatree(levels, dims, c_coords):
    from xarray import DataArray, Dataset, DataTree

    order = [dims.index(d) for d in ("c", "y", "x")]
    base = levels[0].transpose(order)
    nodes = {}
    for k, level in enumerate(levels):
        arr = level.transpose(order)
        coords = {} if c_coords is None else {"c": c_coords}
        for ax, axis in (("y", 1), ("x", 2)):
            full, n = base.shape[axis], arr.shape[axis]
            coords[ax] = np.linspace(0, full, n + 1)[:-1] + full / n / 2
        nodes[f"scale{k}"] = Dataset({"image": DataArray(arr, dims=("c", "y", "x"), coords=coords)})
    return DataTree.from_dict(nodes)


def _ome_pixel_size_um(path: Path) -> float | None:
    """The pixel size (µm) an OME-TIFF records (``PhysicalSizeX``), or ``None``."""
    import re

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata or ""
    except (OSError, ValueError):  # pragma: no cover - read_he_image reports unreadable files
        return None
    size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if size is None:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
    value = float(size.group(1)) * factor if factor else None
    return value if value and np.isfinite(value) and value > 0 else None


def _check_overlap(
    image, matrix: np.ndarray, cells_xy: np.ndarray, pixel_size: float, he_pixel_size_um: float | None = None
) -> None:
    """Catch the common mistakes with an alignment: inverted (Xenium -> H&E) or in µm instead of Xenium pixels.

    ``cells_xy`` are in Xenium pixels (``pixel_size`` µm). The matrix given, its inverse, and both read as mapping to
    (or from) µm are compared: each must place the H&E image over the cells and, when the OME-TIFF records its pixel
    size, scale H&E pixels by ``he_pixel_size_um / pixel_size``. When the matrix given fails and another reading fits,
    the error names that fix.
    """
    from spatialdata.models import get_axes_names

    scale0 = image["scale0"]["image"] if hasattr(image, "children") else image
    axes = get_axes_names(scale0)
    height, width = scale0.shape[axes.index("y")], scale0.shape[axes.index("x")]
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], float).T
    lo, hi = cells_xy.min(0), cells_xy.max(0)
    expected = None if he_pixel_size_um is None else he_pixel_size_um / pixel_size  # H&E px in Xenium px

    def covered(m: np.ndarray) -> float:
        mapped = (m @ corners)[:2]
        inter = np.clip(np.minimum(hi, mapped.max(1)) - np.maximum(lo, mapped.min(1)), 0, None)
        return float(np.prod(inter) / max(np.prod(hi - lo), 1e-12))

    def scale_fits(m: np.ndarray) -> bool:
        scale = np.sqrt(abs(np.linalg.det(m[:2, :2])))
        return expected is None or abs(np.log(scale / expected)) < np.log(1.1)

    to_px = np.diag([1 / pixel_size, 1 / pixel_size, 1.0])
    inverse = np.linalg.inv(matrix)
    readings = [
        (inverse, "numpy.linalg.inv(matrix)", "maps Xenium pixels to H&E pixels"),
        (to_px @ matrix, f"numpy.diag([1 / {pixel_size:g}, 1 / {pixel_size:g}, 1]) @ matrix", "maps H&E pixels to µm"),
        (to_px @ inverse, f"numpy.diag([1 / {pixel_size:g}, 1 / {pixel_size:g}, 1]) @ numpy.linalg.inv(matrix)",
         "maps µm to H&E pixels"),
    ]  # fmt: skip
    cover = covered(matrix)
    if cover >= 0.5 and scale_fits(matrix):
        return
    fits = [(fix, why) for m, fix, why in readings if covered(m) > 0.9 and scale_fits(m)]
    scale_note = ""
    if not scale_fits(matrix):
        scale_note = (
            f"; it scales an H&E pixel to {np.sqrt(abs(np.linalg.det(matrix[:2, :2]))):.3g} Xenium pixels, the "
            f"image's OME pixel size ({he_pixel_size_um:.4g} µm) implies {expected:.3g}"
        )
    if fits:
        options = " or ".join(f"he_alignment={fix} (if it {why})" for fix, why in fits)
        raise ValueError(
            f"he_alignment places the H&E image over {cover:.0%} of the cells' extent{scale_note}, but another "
            f"reading of the matrix fits: pass {options}. sg.io.xenium needs the H&E pixel -> Xenium pixel matrix "
            f"({pixel_size:g} µm per Xenium pixel) that Xenium Explorer exports as *_imagealignment.csv."
        )
    logger.warning(
        "he_alignment places the H&E image over %.0f%% of the cells' extent%s; check that the matrix maps H&E "
        "pixels to Xenium pixels (%g µm each), as Xenium Explorer's *_imagealignment.csv does.",
        100 * cover, scale_note, pixel_size,
    )  # fmt: skip


def _check_table(sdata: SpatialData, *, cells_as_circles: bool) -> None:
    from spatialdata.models import TableModel

    table = sdata.tables["table"]
    attrs = table.uns.get(TableModel.ATTRS_KEY, {})
    if "cell_id" not in table.obs:
        table.obs["cell_id"] = table.obs_names.astype(str)
    if cells_as_circles and attrs.get(TableModel.REGION_KEY) != "cell_circles":
        raise RuntimeError(  # pragma: no cover - guards against spatialdata-io changing its defaults
            f"Expected the table to annotate 'cell_circles', found {attrs.get(TableModel.REGION_KEY)!r}; "
            "please report this with your spatialdata-io version."
        )
