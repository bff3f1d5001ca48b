"""The real 10x Xenium bone-marrow section (Celldega's packaging): 10x HDF5 matrix, centroids, DAPI DeepZoom pyramid.

The DeepZoom pyramid's levels become the levels of a multiscale image element (read lazily, tile by
tile), the centroids a circles element, and the coordinate system 'global' is in full-resolution DAPI
pixels (0.2125 µm).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Keys

if TYPE_CHECKING:
    from spatialdata import SpatialData

PIXEL_SIZE_UM = 0.2125


def _dzi_level(files: Path, level: int, width: int, height: int, tile: int):
    import dask
    import dask.array as da
    from PIL import Image

    @dask.delayed
    def read(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("L"))

    n_cols, n_rows = -(-width // tile), -(-height // tile)
    rows = []
    for r in range(n_rows):
        h = min(tile, height - r * tile)
        row = []
        for c in range(n_cols):
            w = min(tile, width - c * tile)
            row.append(da.from_delayed(read(files / str(level) / f"{c}_{r}.jpeg"), shape=(h, w), dtype=np.uint8))
        rows.append(row)
    return da.block(rows)[None]


def _dapi_pyramid(folder: Path, n_levels: int = 6):
    """The DeepZoom DAPI pyramid as a SpatialData multiscale image (``(1, y, x)`` uint8, 'global' = level-0 px)."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    dzi = (folder / "landscape" / "pyramid_images" / "dapi.dzi").read_text()
    width, height = int(re.search(r'Width="(\d+)"', dzi).group(1)), int(re.search(r'Height="(\d+)"', dzi).group(1))
    tile = int(re.search(r'TileSize="(\d+)"', dzi).group(1))
    if int(re.search(r'Overlap="(\d+)"', dzi).group(1)) != 0:
        raise ValueError("Only DeepZoom pyramids without tile overlap are supported.")
    files = folder / "landscape" / "pyramid_images" / "dapi_files"
    top = max(int(p.name) for p in files.iterdir() if p.name.isdigit())
    if not 1 <= n_levels <= top + 1:
        raise ValueError(f"`n_levels` must be between 1 and {top + 1} (the pyramid's levels), got {n_levels}.")
    tree = {}
    for i in range(n_levels):
        f = 2**i
        w, h = -(-width // f), -(-height // f)
        data = _dzi_level(files, top - i, w, h, tile)
        arr = xr.DataArray(data, dims=("c", "y", "x"), coords={"c": [0]})
        tf = Identity() if i == 0 else Scale([float(f), float(f)], axes=("x", "y"))  # DeepZoom: exact halvings
        tree[f"scale{i}"] = xr.Dataset({"image": Image2DModel.parse(arr, transformations={"global": tf})})
    dt = xr.DataTree.from_dict(tree)
    Image2DModel().validate(dt)
    return dt


def xenium_bonemarrow(folder: str | Path, *, n_levels: int = 6) -> SpatialData:
    """Read the 10x Xenium human bone-marrow section as packaged by Celldega (a real section, DAPI only).

    The data are 10x Genomics' public dataset "Human bone and bone marrow data with custom add-on panel"
    (Xenium V1, CC BY 4.0), as shipped by the Celldega viewer's test repository
    (``broadinstitute/celldega_Xenium_data_human-bone-and-bone-marrow``): the 10x HDF5 matrix
    (84,518 cells x 477 genes), Celldega's cell centroids and clusters, and the DAPI morphology image as a
    DeepZoom JPEG pyramid at 0.2125 µm/px. There is no H&E: SIGMMA aligns the DAPI image with the
    transcriptomes (1-channel images are replicated to 3 channels for the backbone).

    Parameters
    ----------
    folder
        The folder holding ``cell_feature_matrix.h5`` and ``landscape/`` (``cell_metadata.parquet``,
        ``cell_clusters/cluster.parquet``, ``pyramid_images/dapi.dzi`` and ``dapi_files/``).
    n_levels
        Pyramid levels read (full resolution and ``n_levels - 1`` halvings).

    Returns
    -------
    SpatialData with the lazy multiscale image ``'dapi'`` (``(1, y, x)`` uint8, read tile by tile),
    circles ``'cell_circles'`` at the cell centroids (5 µm radius, for display), and the cell table
    ``'table'`` (raw counts, gene-expression features only; ``.obs['celldega_cluster']``). The coordinate
    system ``'global'`` is in full-resolution DAPI pixels; its scale (0.2125 µm per unit) is recorded in
    ``sdata.attrs['sigmma']['um_per_unit']``, so :func:`sigmma_sc.pp.tile` needs no ``um_per_unit``.
    """
    folder = Path(folder)
    needed = [
        folder / "cell_feature_matrix.h5",
        folder / "landscape" / "cell_metadata.parquet",
        folder / "landscape" / "cell_clusters" / "cluster.parquet",
        folder / "landscape" / "pyramid_images" / "dapi.dzi",
    ]
    missing = [str(p.relative_to(folder)) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not the Celldega bone-marrow folder: missing {missing}. Get it from GitHub "
            "(broadinstitute/celldega_Xenium_data_human-bone-and-bone-marrow) and pass its path."
        )

    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import scanpy as sc
    import spatialdata as sd
    from shapely import points
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    adata = sc.read_10x_h5(folder / "cell_feature_matrix.h5", gex_only=True)
    adata.var_names_make_unique()
    meta = pd.read_parquet(folder / "landscape" / "cell_metadata.parquet")
    xy = np.stack(meta["geometry"].to_numpy()).astype(np.float64)
    centroids = pd.DataFrame(xy, index=meta.index.astype(str), columns=["x", "y"])
    adata = adata[adata.obs_names.isin(centroids.index)].copy()
    xy = centroids.loc[adata.obs_names].to_numpy()
    clusters = pd.read_parquet(folder / "landscape" / "cell_clusters" / "cluster.parquet")
    cluster = clusters.reindex(adata.obs_names).iloc[:, 0]
    adata.obs["celldega_cluster"] = pd.Categorical(cluster.astype(str).where(cluster.notna()))  # NaN: no cluster
    adata.obs["cell_id"] = adata.obs_names.to_numpy()
    adata.obs["region"] = pd.Categorical(["cell_circles"] * adata.n_obs)
    radius = 5.0 / PIXEL_SIZE_UM  # ~5 µm, display only
    circles = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": radius}, geometry=points(xy), index=pd.Index(adata.obs_names, name="cell_id")),
        transformations={"global": Identity()},
    )
    table = TableModel.parse(
        ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var),
        region="cell_circles",
        region_key="region",
        instance_key="cell_id",
    )
    sdata = sd.SpatialData(
        images={"dapi": _dapi_pyramid(folder, n_levels)}, shapes={"cell_circles": circles}, tables={"table": table}
    )
    sdata.attrs[Keys.UNS] = {"um_per_unit": {"global": PIXEL_SIZE_UM}}
    return sdata
