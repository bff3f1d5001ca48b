"""sg.io.merscope / cosmx / visium_hd on synthetic folders that spatialdata-io's own readers read unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc._utils._validate import cell_coordinates

N_CELLS, N_GENES = 300, 30
TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 8, "out_dim": 8, "batch_size": 64}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    kw = {"n_cells": N_CELLS, "n_genes": N_GENES, "seed": 2}
    return {
        "merscope": sg.datasets.synthetic_merscope(root / "run" / "region_0", **kw),
        "cosmx": sg.datasets.synthetic_cosmx(root / "cosmx", fov_size_px=768, **kw),
        "visium_hd": sg.datasets.synthetic_visium_hd(root / "visium_hd", **kw),
    }


def _centroids_um(sdata, table_key="table"):
    table = sdata.tables[table_key]
    scale = sdata.attrs["sigmma"]["um_per_unit"]["global"]
    return cell_coordinates(sdata, table, table_key, "global") * scale


def _intensity_under_cells(sdata, image_key):
    """Mean image value at the cells' centroids vs over the whole image (level 0, through the transformation)."""
    from spatialdata.transformations import get_transformation

    image = sdata.images[image_key]
    scale0 = image["scale0"]["image"] if hasattr(image, "children") else image
    matrix = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = cell_coordinates(sdata, sdata.tables["table"], "table", "global")
    px = (np.linalg.inv(matrix) @ np.c_[xy, np.ones(len(xy))].T).T[:, :2].astype(int)
    data = np.asarray(scale0.data.compute()).astype(float).mean(0)
    return data[px[:, 1], px[:, 0]].mean(), data.mean()


def _tile_and_graph(sdata, image_key, **kw):
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=64.0, pixel_size_um=2.0, **kw)
    sg.pp.cell_graph(sdata, n_comps=8)
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert tiles.n_obs >= 4
    assert tiles.obs["n_cells"].sum() >= 0.9 * sdata.tables["table"].n_obs
    return tiles


# --- MERSCOPE ------------------------------------------------------------------------------------------------


def test_merscope_folder_reads_with_spatialdata_io(folders):
    import spatialdata_io

    raw = spatialdata_io.merscope(folders["merscope"], transcripts=False)
    (image,) = raw.images.values()
    assert sorted(image["scale0"]["image"].coords["c"].values) == ["DAPI", "PolyT"]
    assert raw.tables["table"].n_obs == N_CELLS


def test_merscope_layout_units_and_registration(folders):
    from spatialdata.models import get_table_keys

    sdata = sg.io.merscope(folders["merscope"])
    assert set(sdata.images) == {"morphology"}
    assert list(sdata.images["morphology"]["scale0"]["image"].coords["c"].values) == ["DAPI"]
    assert sdata.attrs["sigmma"]["um_per_unit"]["global"] == pytest.approx(0.2125)
    region, _, _ = get_table_keys(sdata.tables["table"])
    assert region in sdata.shapes
    meta = pd.read_csv(folders["merscope"] / "cell_metadata.csv", index_col=0, dtype={"EntityID": str})
    meta = meta.loc[sdata.tables["table"].obs["cell_id"]]
    stage = _centroids_um(sdata) + np.array(sg.datasets._layouts.MERSCOPE_OFFSET_UM)
    np.testing.assert_allclose(stage, meta[["center_x", "center_y"]].to_numpy(), atol=0.5)
    under, overall = _intensity_under_cells(sdata, "morphology")
    assert under > 2 * overall  # DAPI is bright on the nuclei: the image is registered to the cells
    tiles = _tile_and_graph(sdata, None)
    assert tiles.uns["sigmma"]["tile"]["um_per_unit"] == pytest.approx(0.2125)


def test_merscope_channel_and_errors(folders, tmp_path):
    sdata = sg.io.merscope(folders["merscope"], channel="PolyT")
    assert list(sdata.images["morphology"]["scale0"]["image"].coords["c"].values) == ["PolyT"]
    with pytest.raises(FileNotFoundError, match=r"stains: \['DAPI', 'PolyT'\], z layers: \['3'\]"):
        sg.io.merscope(folders["merscope"], channel="Cellbound1")
    with pytest.raises(
        FileNotFoundError, match=r"is not a MERSCOPE output folder: missing .*cell_by_gene.csv \(counts\)"
    ):
        sg.io.merscope(tmp_path)


# --- CosMx ---------------------------------------------------------------------------------------------------


def test_cosmx_mosaic_and_cells(folders):
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    raw = spatialdata_io.cosmx(folders["cosmx"], transcripts=False)
    sdata = sg.io.cosmx(folders["cosmx"])
    assert set(sdata.images) == {"morphology"}
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "cell_circles"
    assert sdata.attrs["sigmma"]["um_per_unit"]["global"] == pytest.approx(0.12028)
    # each FOV lands in the mosaic at its place, unchanged (gray = max over the composite's channels)
    mosaic = sdata.images["morphology"]["scale0"]["image"]
    origin = get_transformation(sdata.images["morphology"], "global").to_affine_matrix(("x", "y"), ("x", "y"))[:2, 2]
    for name in [k for k in raw.images if k.endswith("_image")][:2]:
        fov = raw.images[name]
        t = get_transformation(fov, "global").to_affine_matrix(("x", "y"), ("x", "y"))[:2, 2]
        x0, y0 = np.rint(t - origin).astype(int)
        h, w = fov.shape[1:]
        window = mosaic.data[0, y0 : y0 + h, x0 : x0 + w].compute()
        np.testing.assert_array_equal(window, fov.data.max(axis=0).compute())
    # the cells sit where the raw table says (global px -> µm), on bright nuclei
    table = sdata.tables["table"]
    np.testing.assert_allclose(_centroids_um(sdata), np.asarray(raw.tables["table"].obsm["global"]) * 0.12028)
    np.testing.assert_allclose(table.obsm["spatial"], _centroids_um(sdata))
    under, overall = _intensity_under_cells(sdata, "morphology")
    assert under > 2 * overall
    _tile_and_graph(sdata, "morphology")


@pytest.mark.slow
def test_cosmx_train_and_embed(folders):
    """One tiny epoch and the embeddings on the stitched CosMx mosaic (mostly torch import and featurization)."""
    sdata = sg.io.cosmx(folders["cosmx"])
    table = sdata.tables["table"]
    _tile_and_graph(sdata, "morphology")
    model = sg.tl.train_sigmma(sdata, epochs=1, **TINY)
    sg.tl.embed(sdata, model)
    emb = table.obsm[Keys.embedding()["cell"]["meso"]]
    assert np.isfinite(emb[table.obs[Keys.CELL_TILE].to_numpy() >= 0]).all()


def test_cosmx_options_and_errors(folders, tmp_path):
    sdata = sg.io.cosmx(folders["cosmx"], composite="rgb", pixel_size_um=0.18)
    assert sdata.images["morphology"]["scale0"]["image"].shape[0] == 3
    assert sdata.attrs["sigmma"]["um_per_unit"]["global"] == 0.18
    with pytest.raises(ValueError, match="`composite` must be 'gray' or 'rgb'"):
        sg.io.cosmx(folders["cosmx"], composite="red")
    with pytest.raises(FileNotFoundError, match=r"is not a CosMx output folder: missing \*exprMat_file.csv"):
        sg.io.cosmx(tmp_path)


# --- Visium HD -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [8, "cells"])
def test_visium_hd_bins_and_cells(folders, bins):
    import spatialdata_io

    raw = spatialdata_io.visium_hd(folders["visium_hd"], load_segmentations_only=bins == "cells")
    raw_key = "cell_segmentations" if bins == "cells" else "square_008um"
    sdata = sg.io.visium_hd(folders["visium_hd"], bins=bins)
    assert set(sdata.tables) == {"table"}
    assert sdata.tables["table"].n_obs == raw.tables[raw_key].n_obs
    assert sdata.attrs["sigmma"]["um_per_unit"] == {"global": 0.5, "synthetic": 0.5}
    he = sdata.images["he"]
    assert list(he.coords["c"].values) == ["r", "g", "b"]
    assert max(he.data.chunksize[1:]) <= 1024  # read tile by tile, not as one whole-image chunk
    under, overall = _intensity_under_cells(sdata, "he")
    if bins == "cells":
        assert under < overall - 20  # haematoxylin-dark nuclei under the segmented cells
    tiles = _tile_and_graph(sdata, "he")
    assert tiles.uns["sigmma"]["tile"]["coordinate_system"] == "global"
    # the same section tiled in spatialdata-io's own coordinate system gives the same tiles
    sg.pp.tile(sdata, image_key="he", tile_size_um=64.0, pixel_size_um=2.0, coordinate_system="synthetic")
    assert sdata.tables[Keys.TILE_TABLE].n_obs == tiles.n_obs


def test_visium_hd_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No 16 µm bins .* \(found \['square_008um'\]\)"):
        sg.io.visium_hd(folders["visium_hd"], bins=16)
    with pytest.raises(ValueError, match="`bins` must be"):
        sg.io.visium_hd(folders["visium_hd"], bins="bins")
    with pytest.raises(FileNotFoundError, match="not a Visium HD output folder"):
        sg.io.visium_hd(tmp_path)
