"""Synthetic output folders of Vizgen MERSCOPE, NanoString CosMx and 10x Visium HD, read by spatialdata-io.

Each is written from one synthetic Xenium section (:func:`sigmma_sc.datasets.synthetic_xenium`): the same
cells, counts, DAPI and H&E images, re-expressed in the files, units and coordinate frames of the other
technology, so that the readers of :mod:`spatialdata_io` read them unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, sparse

from ._xenium_files import PIXEL_SIZE, MatrixWriter

logger = logging.getLogger(__name__)

COSMX_PIXEL_SIZE = 0.12028  # µm per CosMx SMI camera pixel (1k/6k panels)
MERSCOPE_OFFSET_UM = (1500.0, 800.0)  # stage position of the section's corner, µm
TRUTH_FILE = "sigmma_truth.parquet"


@dataclass
class _Source:
    counts: sparse.csr_matrix  # cells x genes, int
    genes: list[str]
    um: np.ndarray  # (n, 2) centroids, µm (Xenium frame)
    area_um2: np.ndarray
    polygons: list  # shapely polygons, µm
    dapi: np.ndarray  # (h, w) uint16, PIXEL_SIZE µm/px, Xenium frame
    he: np.ndarray  # (3, h, w) uint8
    he_to_xenium_px: np.ndarray  # 3x3: H&E pixel (x, y) -> Xenium morphology pixel
    he_pixel_size: float
    truth: pd.DataFrame  # per cell, in the order of `counts`


def _source(n_cells: int, n_genes: int, seed: int) -> _Source:
    """Write a synthetic Xenium folder to a temporary directory and load what the other layouts need."""
    from sigmma_sc.io import xenium

    from ._synthetic import synthetic_xenium

    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_xenium(
            Path(tmp) / "run", n_cells=n_cells, n_genes=n_genes, seed=seed, transcripts=False, labels=False
        )
        sdata = xenium(path)
        table = sdata.tables["table"]
        he = sdata.images["he"]["scale0"]["image"]
        extra = json.loads((path / "experiment.xenium").read_text())["sigmma_synthetic"]
        boundaries = sdata.shapes["cell_boundaries"].loc[table.obs["cell_id"].astype(str)]
        truth = pd.read_parquet(path / "sigmma_truth.parquet").set_index("cell_id").loc[table.obs["cell_id"]]
        return _Source(
            counts=sparse.csr_matrix(table.X).astype(np.int64),
            genes=[str(g) for g in table.var_names],
            um=np.asarray(table.obsm["spatial"], dtype=np.float64),
            area_um2=table.obs["cell_area"].to_numpy(dtype=np.float64),
            polygons=list(boundaries.geometry),
            dapi=np.asarray(sdata.images["morphology_focus"]["scale0"]["image"].data.compute())[0],
            he=np.asarray(he.data.compute()),
            he_to_xenium_px=np.asarray(extra["he_alignment_matrix"], dtype=np.float64),
            he_pixel_size=float(extra["he_pixel_size_um"]),
            truth=truth.reset_index(drop=True),
        )


def _prepare(path: str | Path, *, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or another path.")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_truth(path: Path, src: _Source, ids: np.ndarray) -> None:
    truth = src.truth.copy()
    truth.insert(0, "cell_id", ids)
    truth.to_parquet(path / TRUTH_FILE, index=False)


# --- MERSCOPE ------------------------------------------------------------------------------------------------


def synthetic_merscope(
    path: str | Path, *, n_cells: int = 2000, n_genes: int = 200, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a synthetic Vizgen MERSCOPE region folder that :func:`spatialdata_io.merscope` reads unchanged.

    Files: ``cell_by_gene.csv`` (counts, plus two ``Blank-*`` codewords), ``cell_metadata.csv`` (centroids and
    bounds in µm, stage coordinates offset by ``(1500, 800)`` µm), ``cell_boundaries.parquet`` (one MultiPolygon
    per cell, ``ZIndex`` 0, µm), ``images/micron_to_mosaic_pixel_transform.csv`` and the mosaic images
    ``images/mosaic_DAPI_z3.tif`` and ``images/mosaic_PolyT_z3.tif`` (uint16, 0.2125 µm per pixel), and
    ``sigmma_truth.parquet`` (ground truth per cell, as in :func:`sigmma_sc.datasets.synthetic_xenium`).
    No ``detected_transcripts.csv``: read with ``transcripts=False``.

    Parameters
    ----------
    path
        Output region folder; created. Must be absent or empty unless ``overwrite``.
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    seed
        Random seed of the underlying synthetic section.
    overwrite
        Whether to delete a non-empty ``path`` first.

    Returns
    -------
    The output folder.
    """
    import geopandas as gpd
    import shapely
    import tifffile
    from shapely.geometry import MultiPolygon

    path = _prepare(path, overwrite=overwrite)
    src = _source(n_cells, n_genes, seed)
    offset = np.asarray(MERSCOPE_OFFSET_UM)
    ids = np.array([str(10_000_000_000 + i) for i in range(len(src.um))])
    um = src.um + offset

    counts = pd.DataFrame(src.counts.toarray(), index=pd.Index(ids, name="cell"), columns=src.genes)
    rng = np.random.default_rng(seed)
    for k in range(2):
        counts[f"Blank-{k}"] = rng.poisson(0.05, len(ids))
    counts.to_csv(path / "cell_by_gene.csv")

    polygons = [shapely.affinity.translate(p, *offset) for p in src.polygons]
    bounds = np.array([p.bounds for p in polygons])
    meta = pd.DataFrame(
        {
            "fov": np.floor(um[:, 0] / 200).astype(int),
            "volume": src.area_um2 * 7.0,
            "center_x": um[:, 0],
            "center_y": um[:, 1],
            "min_x": bounds[:, 0],
            "max_x": bounds[:, 2],
            "min_y": bounds[:, 1],
            "max_y": bounds[:, 3],
        },
        index=pd.Index(ids, name="EntityID"),
    )
    meta.to_csv(path / "cell_metadata.csv")

    gdf = gpd.GeoDataFrame(
        {
            "ID": np.arange(len(ids)),
            "EntityID": ids.astype(np.int64),
            "ZIndex": 0,
            "Type": "cell",
            "ZLevel": 1.5,
            "Geometry": [MultiPolygon([p]) for p in polygons],
        },
        geometry="Geometry",
    )
    gdf.to_parquet(path / "cell_boundaries.parquet")

    images = path / "images"
    images.mkdir()
    s = 1.0 / PIXEL_SIZE
    micron_to_mosaic = np.array([[s, 0.0, -offset[0] * s], [0.0, s, -offset[1] * s], [0.0, 0.0, 1.0]])
    np.savetxt(images / "micron_to_mosaic_pixel_transform.csv", micron_to_mosaic, delimiter=" ")
    tifffile.imwrite(images / "mosaic_DAPI_z3.tif", src.dapi, tile=(512, 512))
    polyt = ndimage.gaussian_filter(src.dapi.astype(np.float32), 6.0)
    tifffile.imwrite(images / "mosaic_PolyT_z3.tif", polyt.astype(np.uint16), tile=(512, 512))
    _write_truth(path, src, ids)
    logger.info("Wrote synthetic MERSCOPE folder %s (%d cells)", path, len(ids))
    return path


# --- CosMx ---------------------------------------------------------------------------------------------------


def synthetic_cosmx(
    path: str | Path,
    *,
    n_cells: int = 2000,
    n_genes: int = 200,
    seed: int = 0,
    fov_size_px: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic NanoString CosMx SMI flat-file export that :func:`spatialdata_io.cosmx` reads unchanged.

    The section is imaged at 0.12028 µm per pixel as a grid of fields of view (FOVs) of ``fov_size_px`` pixels.
    Files (``dataset_id`` ``'synthetic'``): ``synthetic_exprMat_file.csv`` (``fov``, ``cell_ID`` and counts),
    ``synthetic_metadata_file.csv`` (``Area`` in px², local and global centroids in px),
    ``synthetic_fov_positions_file.csv``, ``CellComposite/CellComposite_F###.jpg`` (RGB false-colour
    composite, DAPI in blue) and ``CellLabels/CellLabels_F###.tif`` (uint32 cell labels), both stored
    bottom-up as CosMx does, and ``sigmma_truth.parquet``. No transcripts file: read with ``transcripts=False``.

    Parameters
    ----------
    path
        Output folder; created. Must be absent or empty unless ``overwrite``.
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    seed
        Random seed of the underlying synthetic section.
    fov_size_px
        Side of a field of view in pixels (real CosMx: 4256).
    overwrite
        Whether to delete a non-empty ``path`` first.

    Returns
    -------
    The output folder.
    """
    import tifffile
    from PIL import Image

    path = _prepare(path, overwrite=overwrite)
    src = _source(n_cells, n_genes, seed)
    zoom = PIXEL_SIZE / COSMX_PIXEL_SIZE
    dapi = ndimage.zoom(src.dapi.astype(np.float32), zoom, order=1)
    dapi8 = np.clip(dapi / max(np.percentile(dapi, 99.8), 1.0) * 255, 0, 255).astype(np.uint8)
    global_px = src.um / COSMX_PIXEL_SIZE
    fov_row = (global_px[:, 1] // fov_size_px).astype(int)
    fov_col = (global_px[:, 0] // fov_size_px).astype(int)
    n_cols = int(np.ceil(dapi8.shape[1] / fov_size_px))
    fov = fov_row * n_cols + fov_col + 1
    keep_fovs = np.unique(fov)
    cell_id = np.zeros(len(fov), np.int64)
    for f in keep_fovs:
        cell_id[fov == f] = np.arange(1, int((fov == f).sum()) + 1)
    local = global_px - np.c_[fov_col, fov_row] * fov_size_px

    (path / "CellComposite").mkdir()
    (path / "CellLabels").mkdir()
    radius_px = np.sqrt(src.area_um2 / np.pi) / COSMX_PIXEL_SIZE
    positions = []
    for f in keep_fovs:
        r, c = divmod(int(f) - 1, n_cols)
        y0, x0 = r * fov_size_px, c * fov_size_px
        tile = np.zeros((fov_size_px, fov_size_px), np.uint8)
        part = dapi8[y0 : y0 + fov_size_px, x0 : x0 + fov_size_px]
        tile[: part.shape[0], : part.shape[1]] = part
        rgb = np.stack([tile // 4, tile // 3, tile], axis=-1)
        labels = np.zeros((fov_size_px, fov_size_px), np.uint32)
        yy, xx = np.mgrid[0:fov_size_px, 0:fov_size_px]
        for i in np.flatnonzero(fov == f):
            cx, cy, rad = local[i, 0], local[i, 1], radius_px[i] * 0.6
            ys, xs = slice(max(int(cy - rad), 0), int(cy + rad) + 1), slice(max(int(cx - rad), 0), int(cx + rad) + 1)
            disc = (yy[ys, xs] + 0.5 - cy) ** 2 + (xx[ys, xs] + 0.5 - cx) ** 2 <= rad**2
            labels[ys, xs][disc] = cell_id[i]
        # CosMx stores the images bottom-up; spatialdata-io flips them back
        Image.fromarray(np.flipud(rgb)).save(path / "CellComposite" / f"CellComposite_F{int(f):03d}.jpg", quality=92)
        tifffile.imwrite(path / "CellLabels" / f"CellLabels_F{int(f):03d}.tif", np.flipud(labels))
        positions.append({"fov": int(f), "x_global_px": float(x0), "y_global_px": float(y0)})

    counts = pd.DataFrame(src.counts.toarray(), columns=src.genes)
    counts.insert(0, "cell_ID", cell_id)
    counts.insert(0, "fov", fov)
    counts.to_csv(path / "synthetic_exprMat_file.csv", index=False)
    meta = pd.DataFrame(
        {
            "fov": fov,
            "cell_ID": cell_id,
            "Area": np.round(src.area_um2 / COSMX_PIXEL_SIZE**2).astype(int),
            "CenterX_local_px": local[:, 0],
            "CenterY_local_px": local[:, 1],
            "CenterX_global_px": global_px[:, 0],
            "CenterY_global_px": global_px[:, 1],
        }
    )
    meta.to_csv(path / "synthetic_metadata_file.csv", index=False)
    pd.DataFrame(positions).to_csv(path / "synthetic_fov_positions_file.csv", index=False)
    _write_truth(path, src, np.char.add(np.char.add(cell_id.astype(str), "_"), fov.astype(str)))
    logger.info("Wrote synthetic CosMx folder %s (%d cells, %d FOVs)", path, len(fov), len(keep_fovs))
    return path


# --- Visium HD -----------------------------------------------------------------------------------------------


def synthetic_visium_hd(
    path: str | Path,
    *,
    n_cells: int = 2000,
    n_genes: int = 200,
    seed: int = 0,
    bin_size_um: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic 10x Visium HD (Space Ranger 4) output folder that :func:`spatialdata_io.visium_hd` reads.

    The H&E image is the microscope image (full resolution, ``microns_per_pixel`` = its pixel size); bins and
    cells are given in its pixel frame. Files (``dataset_id`` ``'synthetic'``): ``synthetic_feature_slice.h5``
    (file format 1.0 metadata), ``binned_outputs/square_{bin:03d}um/`` (``filtered_feature_bc_matrix.h5``,
    ``spatial/tissue_positions.parquet``, ``spatial/scalefactors_json.json``, hires and lowres PNGs) with the
    counts of the cells whose centroid falls in each bin, ``segmented_outputs/`` (``filtered_feature_cell_matrix.h5``,
    ``cell_segmentations.geojson``, ``spatial/scalefactors_json.json``), ``microscope_image/synthetic_he.tif``
    (tiled RGB TIFF) and ``sigmma_truth.parquet`` (per segmented cell).

    Parameters
    ----------
    path
        Output folder; created. Must be absent or empty unless ``overwrite``.
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    seed
        Random seed of the underlying synthetic section.
    bin_size_um
        Bin side in µm (Visium HD writes 2, 8 and 16).
    overwrite
        Whether to delete a non-empty ``path`` first.

    Returns
    -------
    The output folder.
    """
    import h5py
    import shapely
    import tifffile
    from PIL import Image

    path = _prepare(path, overwrite=overwrite)
    src = _source(n_cells, n_genes, seed)
    mpp = src.he_pixel_size
    to_he = np.linalg.inv(src.he_to_xenium_px)  # Xenium px -> H&E px

    def he_px(um: np.ndarray) -> np.ndarray:
        return (np.c_[um / PIXEL_SIZE, np.ones(len(um))] @ to_he.T)[:, :2]

    centre = he_px(src.um)
    height, width = src.he.shape[1:]
    hires_scalef, lowres_scalef = 0.5, 0.125
    scalefactors = {
        "spot_diameter_fullres": bin_size_um / mpp,
        "bin_size_um": float(bin_size_um),
        "microns_per_pixel": mpp,
        "regist_target_img_scalef": hires_scalef,
        "tissue_lowres_scalef": lowres_scalef,
        "fiducial_diameter_fullres": 4 * bin_size_um / mpp,
        "tissue_hires_scalef": hires_scalef,
    }

    def spatial_dir(folder: Path) -> Path:
        d = folder / "spatial"
        d.mkdir(parents=True)
        (d / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=2))
        rgb = src.he.transpose(1, 2, 0)
        for name, f in (("tissue_hires_image.png", hires_scalef), ("tissue_lowres_image.png", lowres_scalef)):
            size = (max(1, round(width * f)), max(1, round(height * f)))
            Image.fromarray(rgb).resize(size, Image.BILINEAR).save(d / name)
        return d

    # bins: a square grid over the image; counts = summed counts of the cells centred in each bin
    side = bin_size_um / mpp
    n_rows, n_cols = int(np.ceil(height / side)), int(np.ceil(width / side))
    row = np.clip((centre[:, 1] // side).astype(int), 0, n_rows - 1)
    col = np.clip((centre[:, 0] // side).astype(int), 0, n_cols - 1)
    flat = row * n_cols + col
    occupied, inverse = np.unique(flat, return_inverse=True)
    member = sparse.csr_matrix((np.ones(len(flat)), (inverse, np.arange(len(flat)))), shape=(len(occupied), len(flat)))
    bin_counts = (member @ src.counts).astype(np.int64).tocsr()
    b_row, b_col = occupied // n_cols, occupied % n_cols
    barcodes = np.array([f"s_{bin_size_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(b_row, b_col, strict=True)])
    bin_dir = path / "binned_outputs" / f"square_{bin_size_um:03d}um"
    bin_dir.mkdir(parents=True)
    _write_10x_h5(bin_dir / "filtered_feature_bc_matrix.h5", bin_counts, barcodes, src.genes)
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": np.ones(len(barcodes), np.int32),
            "array_row": b_row.astype(np.int32),
            "array_col": b_col.astype(np.int32),
            "pxl_row_in_fullres": (b_row + 0.5) * side,
            "pxl_col_in_fullres": (b_col + 0.5) * side,
        }
    )
    positions.to_parquet(spatial_dir(bin_dir) / "tissue_positions.parquet", index=False)

    # segmented cells: polygons in H&E pixels
    seg = path / "segmented_outputs"
    seg.mkdir()
    spatial_dir(seg)
    cell_ids = np.arange(1, len(centre) + 1)
    cell_barcodes = np.array([f"cellid_{i:09d}-1" for i in cell_ids])
    _write_10x_h5(seg / "filtered_feature_cell_matrix.h5", src.counts, cell_barcodes, src.genes)
    affine = to_he @ np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1.0])  # µm -> H&E px
    features = []
    for i, poly in zip(cell_ids, src.polygons, strict=True):
        ring = shapely.affinity.affine_transform(poly, [*affine[0, :2], *affine[1, :2], affine[0, 2], affine[1, 2]])
        coords = np.asarray(ring.exterior.coords).round(2).tolist()
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [coords]},
                "properties": {"cell_id": int(i)},
            }
        )
    (seg / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    image_dir = path / "microscope_image"
    image_dir.mkdir()
    tifffile.imwrite(image_dir / "synthetic_he.tif", src.he.transpose(1, 2, 0), tile=(512, 512), photometric="rgb")
    layout = {"file_format": "1.0", "transform": np.eye(3).ravel().tolist()}
    with h5py.File(path / "synthetic_feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout), "transform_matrices": {}})
    _write_truth(path, src, cell_barcodes)
    logger.info("Wrote synthetic Visium HD folder %s (%d %d-µm bins, %d cells)", path, len(barcodes), bin_size_um,
                len(cell_ids))  # fmt: skip
    return path


def _write_10x_h5(path: Path, counts: sparse.csr_matrix, barcodes: np.ndarray, genes: list[str]) -> None:
    writer = MatrixWriter(path, barcodes, genes, ["Gene Expression"] * len(genes))
    writer.append(sparse.csr_matrix(counts).astype(np.int32))
    writer.close()
