"""sg.io.from_anndata: your own AnnData + image into a SpatialData section in µm that every sg step accepts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import Keys

PIXEL_SIZE = 0.2125
HE_PIXEL = 0.5
HE = "sigmma_synthetic_he_image.ome.tif"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return sg.datasets.synthetic_xenium(
        tmp_path_factory.mktemp("byo") / "run", n_cells=300, n_genes=30, seed=5, transcripts=False, labels=False
    )


@pytest.fixture(scope="module")
def source(run_dir):
    """Counts and centroids as a user would have them: µm, H&E pixels, and the H&E image as an array."""
    import anndata as ad

    xen = sg.io.xenium(run_dir)
    table = xen.tables["table"]
    um = np.asarray(table.obsm["spatial"], dtype=float)
    matrix = np.loadtxt(run_dir / "sigmma_synthetic_he_imagealignment.csv", delimiter=",")
    he_px = (np.linalg.inv(matrix) @ np.c_[um / PIXEL_SIZE, np.ones(len(um))].T).T[:, :2]
    adata = ad.AnnData(table.X.copy(), obs=pd.DataFrame(index=table.obs_names.astype(str)), var=table.var[[]].copy())
    adata.obsm["spatial"] = he_px
    he = np.asarray(xen.images["he"]["scale0"]["image"].data.compute())  # (3, y, x)
    dapi = xen.images["morphology_focus"]["scale0"]["image"]
    return {"adata": adata, "um": um, "he_px": he_px, "he": he, "dapi": dapi}


def _he_under_cells(sdata, image_key="he"):
    """Mean RGB at the cells' positions, read through the image's transformation (µm -> pixels)."""
    from spatialdata.transformations import get_transformation

    image = sdata.images[image_key]
    scale0 = image["scale0"]["image"] if hasattr(image, "children") else image
    matrix = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = sdata.tables["table"].obsm["spatial"]
    px = (np.linalg.inv(matrix) @ np.c_[xy, np.ones(len(xy))].T).T[:, :2].astype(int)
    data = scale0.data.compute() if hasattr(scale0.data, "compute") else scale0.data
    return np.asarray(data)[:, px[:, 1], px[:, 0]].astype(float).mean(0)


def test_array_in_pixels_gives_xenium_layout(source):
    from spatialdata.models import TableModel, get_table_keys
    from spatialdata.transformations import get_transformation

    adata = source["adata"]
    before = adata.copy()
    sdata = sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL)
    assert set(sdata.images) == {"he"}
    assert set(sdata.shapes) == {"cell_circles"}
    assert set(sdata.tables) == {"table"}
    assert sdata.attrs["sigmma"] == {"um_per_unit": {"global": 1.0}}
    t = get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(t, np.diag([HE_PIXEL, HE_PIXEL, 1.0]))
    assert list(sdata.images["he"].coords["c"].values) == ["r", "g", "b"]
    table = sdata.tables["table"]
    region, _, instance_key = get_table_keys(table)
    assert region == "cell_circles"
    assert table.uns[TableModel.ATTRS_KEY]["region"] == "cell_circles"
    np.testing.assert_allclose(table.obsm["spatial"], source["he_px"] * HE_PIXEL)
    circles = sdata.shapes["cell_circles"]
    np.testing.assert_allclose(circles.geometry.x.to_numpy(), table.obsm["spatial"][:, 0])
    assert np.array_equal(circles.index.to_numpy(), table.obs[instance_key].to_numpy())
    assert list(table.obs["cell_id"]) == list(adata.obs_names)
    # registered: the cells sit on haematoxylin-dark nuclei, not on random pixels
    assert np.mean(_he_under_cells(sdata) < 150) > 0.9
    # the user's AnnData is unchanged
    np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])
    assert list(adata.obs.columns) == list(before.obs.columns)


def test_um_coordinates_equal_pixel_coordinates(source):
    adata = source["adata"].copy()
    adata.obsm["spatial"] = source["he_px"] * HE_PIXEL
    sdata = sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL, coordinates="um")
    ref = sg.io.from_anndata(source["adata"], source["he"], pixel_size_um=HE_PIXEL)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], ref.tables["table"].obsm["spatial"])


def test_ome_tiff_pyramid_read_lazily_then_tiled_and_graphed(source, run_dir, monkeypatch):
    """An OME-TIFF path is not read while building the object; tiling then reads it at the requested scale."""
    from sigmma_sc.io import _xenium

    reads = []
    original = _xenium._TiffLevel.__getitem__
    monkeypatch.setattr(
        _xenium._TiffLevel, "__getitem__", lambda self, key: reads.append(self.level) or original(self, key)
    )
    sdata = sg.io.from_anndata(source["adata"], run_dir / HE, pixel_size_um=HE_PIXEL)
    assert reads == []
    image = sdata.images["he"]
    assert hasattr(image, "children")
    assert len(image.children) > 1
    assert np.mean(_he_under_cells(sdata) < 150) > 0.9
    sg.pp.tile(sdata, tile_size_um=64.0, pixel_size_um=1.0)  # no image_key, coordinate system or um_per_unit needed
    sg.pp.cell_graph(sdata, n_comps=8)
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert tiles.uns["sigmma"]["tile"]["um_per_unit"] == 1.0
    assert tiles.obs["n_cells"].sum() >= 0.95 * sdata.tables["table"].n_obs
    assert max(reads) >= 1  # the coarse levels served the tissue detection


def test_morphology_element_and_training(source):
    """A 1-channel spatialdata element (DAPI) in µm: tile, graph, one tiny epoch, embed."""
    from spatialdata.transformations import get_transformation

    adata = source["adata"].copy()
    adata.obsm["spatial"] = source["um"]
    dapi = source["dapi"]
    before = get_transformation(dapi, get_all=True)
    sdata = sg.io.from_anndata(adata, dapi, pixel_size_um=PIXEL_SIZE, coordinates="um")
    assert "morphology" in sdata.images
    assert get_transformation(dapi, get_all=True) == before  # the source element is unchanged
    sg.pp.tile(sdata, image_key="morphology", tile_size_um=64.0, pixel_size_um=2.0)
    sg.pp.cell_graph(sdata, n_comps=8)
    model = sg.tl.train_sigmma(
        sdata, epochs=1, backbone="test_efficientnet", pretrained=False, hidden=8, out_dim=8, batch_size=64
    )
    sg.tl.embed(sdata, model)
    emb = sdata.tables["table"].obsm[Keys.EMB_CELL.format(scale="macro")]
    tiled = sdata.tables["table"].obs[Keys.CELL_TILE].to_numpy() >= 0
    assert np.isfinite(emb[tiled]).all()


def test_outside_image_error_and_swap_hint(source):
    adata = source["adata"].copy()
    he = source["he"]
    wide = np.full((3, 100, 300), 240, np.uint8)  # 300 px wide, 100 px high
    cells = adata[:50].copy()
    rng = np.random.default_rng(0)
    cells.obsm["spatial"] = np.c_[rng.uniform(0, 100, 50), rng.uniform(0, 300, 50)]  # (row, col): transposed
    cells.obsm["spatial"][0] = [50.0, 250.0]
    with pytest.raises(ValueError, match="look transposed; swap them"):
        sg.io.from_anndata(cells, wide, pixel_size_um=HE_PIXEL)
    cells.obsm["spatial"] = np.ascontiguousarray(cells.obsm["spatial"][:, ::-1])
    assert sg.io.from_anndata(cells, wide, pixel_size_um=HE_PIXEL).tables["table"].n_obs == 50
    with pytest.raises(ValueError, match="fit when read as pixels: pass coordinates='pixels'"):
        sg.io.from_anndata(adata, he, pixel_size_um=HE_PIXEL / 4, coordinates="um")
    off = adata.copy()
    off.obsm["spatial"] = adata.obsm["spatial"] + np.array([he.shape[2] * 0.6, 0.0])
    with pytest.raises(ValueError, match=r"cells lie outside the image .* cells_outside='drop'"):
        sg.io.from_anndata(off, he, pixel_size_um=HE_PIXEL)
    kept = sg.io.from_anndata(off, he, pixel_size_um=HE_PIXEL, cells_outside="drop")
    n_in = int((off.obsm["spatial"][:, 0] <= he.shape[2]).sum())
    assert 0 < kept.tables["table"].n_obs == n_in < adata.n_obs


@pytest.mark.parametrize(
    ("change", "exc", "message"),
    [
        (lambda a, im: (a[:, :0].copy(), im), None, None),  # no genes is fine here (image-only tiling later)
        (lambda a, im: (_no_spatial(a), im), KeyError, "obsm\\['spatial'\\]"),
        (lambda a, im: (a, im[:2]), ValueError, "has 2 channels"),
        (lambda a, im: (a, np.zeros((5, 6, 7), np.uint8)), ValueError, "pass image_axes="),
        (lambda a, im: (a, "missing.tif"), FileNotFoundError, "does not exist"),
        (lambda a, im: (_nan(a), im), ValueError, "NaN or infinite"),
        (lambda a, im: (_dup(a), im), ValueError, "obs_names_make_unique"),
    ],
)
def test_bad_inputs(source, change, exc, message):
    adata, image = change(source["adata"].copy(), source["he"])
    if exc is None:
        sg.io.from_anndata(adata, image, pixel_size_um=HE_PIXEL)
        return
    with pytest.raises(exc, match=message):
        sg.io.from_anndata(adata, image, pixel_size_um=HE_PIXEL)


def _no_spatial(a):
    del a.obsm["spatial"]
    return a


def _nan(a):
    a.obsm["spatial"][0, 0] = np.nan
    return a


def _dup(a):
    a.obs_names = ["c"] * a.n_obs
    return a


def test_rgba_and_channels_last(source):
    rgba = np.concatenate([source["he"], np.full((1, *source["he"].shape[1:]), 255, np.uint8)]).transpose(1, 2, 0)
    sdata = sg.io.from_anndata(source["adata"], rgba, pixel_size_um=HE_PIXEL)
    assert sdata.images["he"].shape[0] == 3
    np.testing.assert_array_equal(sdata.images["he"].data[:, :50, :50].compute(), source["he"][:, :50, :50])


def test_um_per_unit_from_coordinate_system_name(section):
    """A section whose only shared coordinate system is named in µm needs neither coordinate_system nor um_per_unit."""
    from spatialdata.transformations import get_transformation, set_transformation

    for element in (section.images["he"], section.shapes[next(iter(section.shapes))]):
        t = get_transformation(element, "global")
        set_transformation(element, {"microns": t}, set_all=True)
    section.attrs.pop("sigmma")
    sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    params = section.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    assert params["coordinate_system"] == "microns"
    assert params["um_per_unit"] == 1.0


def test_unknown_scale_names_the_readers(section):
    from spatialdata.transformations import get_transformation, set_transformation

    for element in (section.images["he"], section.shapes[next(iter(section.shapes))]):
        set_transformation(element, {"aligned": get_transformation(element, "global")}, set_all=True)
    section.attrs.pop("sigmma")
    with pytest.raises(ValueError, match="'aligned' is unknown.*sg.io.from_anndata"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    assert Keys.TILE_TABLE not in section.tables
