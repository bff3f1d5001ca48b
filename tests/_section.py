"""A small synthetic SpatialData section with a registered image, for pp/tl tests."""

from __future__ import annotations

import numpy as np


def make_section(
    *,
    n_cells: int = 400,
    image_px: int = 256,
    unit_per_px: float = 1.0,
    rotation_deg: float = 0.0,
    offset: tuple[float, float] = (0.0, 0.0),
    um_per_unit: float = 0.5,
    scale_factors: list[int] | None = None,
    cells_in_um: bool = False,
    n_genes: int = 30,
    seed: int = 0,
    rgb: bool = True,
):
    """A SpatialData section: an image registered to 'global' by an affine, and a cell table on circles.

    The tissue is a disc in the image centre (dark on white for RGB, bright on dark for 1 channel);
    cells are sampled inside it, counts are negative-binomial with two spatially separated programs.
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import spatialdata as sd
    from shapely import points
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity, Scale

    rng = np.random.default_rng(seed)
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) * unit_per_px
    matrix = np.eye(3)
    matrix[:2, :2] = rot
    matrix[:2, 2] = offset
    yy, xx = np.mgrid[0:image_px, 0:image_px] + 0.5
    c = image_px / 2
    disc = (xx - c) ** 2 + (yy - c) ** 2 < (0.4 * image_px) ** 2
    if rgb:
        img = np.full((3, image_px, image_px), 245, dtype=np.uint8)
        img[:, disc] = np.array([180, 90, 160], dtype=np.uint8)[:, None]
    else:
        img = np.full((1, image_px, image_px), 5, dtype=np.uint16)
        img[:, disc] = 800
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        scale_factors=scale_factors,
        transformations={"global": Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    # cells inside the disc (pixel coords) -> global
    r = 0.38 * image_px * np.sqrt(rng.uniform(0, 1, n_cells))
    phi = rng.uniform(0, 2 * np.pi, n_cells)
    px = np.c_[c + r * np.cos(phi), c + r * np.sin(phi)]
    xy = px @ matrix[:2, :2].T + matrix[:2, 2]
    cell_ids = np.array([f"cell_{i}" for i in range(n_cells)])
    if cells_in_um:  # store circles in µm with a Scale to 'global', as spatialdata-io's Xenium reader does
        geo = points(xy * um_per_unit)
        transform = Scale([1 / um_per_unit, 1 / um_per_unit], axes=("x", "y"))
        radius = 5.0
    else:
        geo = points(xy)
        transform = Identity()
        radius = 5.0 / um_per_unit
    gdf = gpd.GeoDataFrame({"radius": radius}, geometry=geo, index=pd.Index(cell_ids, name="cell_id"))
    circles = ShapesModel.parse(gdf, transformations={"global": transform})
    program = (xy[:, 0] > np.median(xy[:, 0])).astype(int)
    mu = np.where(program[:, None] == np.arange(n_genes)[None] % 2, 3.0, 0.5)
    counts = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
    obs = pd.DataFrame({"cell_id": cell_ids, "region": pd.Categorical(["cell_circles"] * n_cells)}, index=cell_ids)
    table = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))
    table = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")
    sdata = sd.SpatialData(images={"he": image}, shapes={"cell_circles": circles}, tables={"table": table})
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": um_per_unit}}
    return sdata
