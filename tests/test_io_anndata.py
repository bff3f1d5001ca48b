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
    """An OME-TIFF path is read only at a coarse level while building the object (the cells are compared with the
    tissue there); tiling then reads it at the requested scale."""
    from sigmma_sc.io import _xenium

    reads = []
    original = _xenium._TiffLevel.__getitem__
    monkeypatch.setattr(
        _xenium._TiffLevel, "__getitem__", lambda self, key: reads.append(self.level) or original(self, key)
    )
    sdata = sg.io.from_anndata(source["adata"], run_dir / HE, pixel_size_um=HE_PIXEL)
    assert reads
    assert min(reads) >= 1  # never the full resolution
    reads.clear()
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
    emb = sdata.tables["table"].obsm[Keys.embedding()["cell"]["macro"]]
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
    with pytest.raises(ValueError, match=r"fit when read as pixels, and then match the image's tissue .*: pass "
                       r"coordinates='pixels'"):  # fmt: skip
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
        # issue 28: a multiplexed stack is told about its channels (not its axes); named columns read by name
        (lambda a, im: (a, np.zeros((5, 300, 400), np.uint16)), ValueError, "has 5 channels.*Select one channel"),
        (lambda a, im: (_named(a, ["a", "b"]), im), ValueError, "Cannot tell the x and y columns"),
        (lambda a, im: (_named(a, ["y", "x"]), im), None, None),
    ],
)
def test_bad_inputs(source, change, exc, message):
    adata, image = change(source["adata"].copy(), source["he"])
    if exc is None:
        sdata = sg.io.from_anndata(adata, image, pixel_size_um=HE_PIXEL)
        if adata.n_vars:
            np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], source["he_px"] * HE_PIXEL)
        return
    with pytest.raises(exc, match=message):
        sg.io.from_anndata(adata, image, pixel_size_um=HE_PIXEL)


def _no_spatial(a):
    del a.obsm["spatial"]
    return a


def _named(a, columns):
    a.obsm["spatial"] = pd.DataFrame(a.obsm["spatial"][:, ::-1] if columns == ["y", "x"] else a.obsm["spatial"],
                                     index=a.obs_names, columns=columns)  # fmt: skip
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


# ---- coordinates: units, named columns (issue 28) ---------------------------------------------------------------


def test_um_passed_as_pixels_warns_with_the_unit_that_fits(source, caplog):
    """Cells in µm read as pixels of a 0.5 µm/px H&E all fit on the image, in a corner of the tissue: a warning names
    coordinates='um'; the right reading (either unit) gives none."""
    import logging

    adata = source["adata"].copy()
    adata.obsm["spatial"] = source["he_px"] * HE_PIXEL  # µm, passed with the default coordinates='pixels'
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        wrong = sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL)
    assert "sit on the image's nuclei only when read as um" in caplog.text
    assert "pass coordinates='um'" in caplog.text
    np.testing.assert_allclose(wrong.tables["table"].obsm["spatial"], source["he_px"] * HE_PIXEL**2)  # half-placed
    for coords, xy in (("pixels", source["he_px"]), ("um", source["he_px"] * HE_PIXEL)):
        caplog.clear()
        adata.obsm["spatial"] = xy
        with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
            sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL, coordinates=coords)
        assert not caplog.records, (coords, caplog.text)


def test_unit_hint_only_when_the_other_unit_matches_the_tissue(source):
    """Coordinates of a 1.5x finer image (off this one): dividing by pixel_size_um=2 fits them on the image but not on
    the tissue, so no 'coordinates=um' hint; the scale that matches is named instead."""
    adata = source["adata"].copy()
    adata.obsm["spatial"] = source["he_px"] * 1.5
    with pytest.raises(ValueError, match=r"cells lie outside the image") as err:
        sg.io.from_anndata(adata, source["he"], pixel_size_um=2.0)
    message = str(err.value)
    assert "coordinates='um'" not in message
    assert "when scaled by 0.6" in message  # 1 / 1.5 = 0.667, found to about 2%
    assert "check `pixel_size_um` (2)" in message


@pytest.mark.parametrize(
    ("columns", "order"),
    [
        (["x", "y"], [0, 1]),
        (["y", "x"], [1, 0]),
        (["Y", "X"], [1, 0]),
        (["y_centroid", "x_centroid"], [1, 0]),
        (["CenterY_global_px", "CenterX_global_px"], [1, 0]),
        (["pxl_row_in_fullres", "pxl_col_in_fullres"], [1, 0]),
        (["imagerow", "imagecol"], [1, 0]),
        ([0, 1], [0, 1]),
    ],
)
def test_dataframe_coordinates_read_by_column_name(source, columns, order):
    adata = source["adata"].copy()
    he_px = source["he_px"]
    adata.obsm["spatial"] = pd.DataFrame(he_px[:, order], index=adata.obs_names, columns=columns)
    sdata = sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], he_px * HE_PIXEL)


@pytest.mark.parametrize(
    ("columns", "coordinates", "message"),
    [
        (["a", "b"], "pixels", r"Cannot tell the x and y columns .* \['a', 'b'\]"),
        (["x_px", "x_um", "y_px", "y_um"], "pixels", r"x candidates \['x_px', 'x_um'\]"),
        (["array_row", "array_col"], "pixels", "spot grid index"),
        (["x_um", "y_um"], "pixels", r"say the coordinates are in µm, but coordinates='pixels'; pass coordinates='um'"),
        (["x_px", "y_px"], "um", r"in pixels, but coordinates='um'; pass coordinates='pixels'"),
    ],
)
def test_ambiguous_or_contradicting_coordinate_columns(source, columns, coordinates, message):
    adata = source["adata"].copy()
    values = np.tile(source["he_px"], (1, len(columns) // 2))
    adata.obsm["spatial"] = pd.DataFrame(values, index=adata.obs_names, columns=columns)
    with pytest.raises(ValueError, match=message):
        sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL, coordinates=coordinates)


# ---- images: multiplexed stacks, fluorescence composites --------------------------------------------------------


@pytest.mark.parametrize("axes", ["cyx", "yxc", "ome-tiff", "tiff"])
def test_five_channel_stack_says_channels_first(source, axes, tmp_path):
    """A 5-channel uint16 IF stack (array, OME-TIFF or plain multi-page TIFF): the first error is about the channels
    (how to select one), not about the axes or the file."""
    import tifffile

    stack = np.zeros((5, 120, 160), np.uint16)
    if axes == "yxc":
        stack = stack.transpose(1, 2, 0)
    elif axes == "ome-tiff":
        tifffile.imwrite(tmp_path / "if.ome.tif", stack, metadata={"axes": "CYX"})
        stack = tmp_path / "if.ome.tif"
    elif axes == "tiff":
        tifffile.imwrite(tmp_path / "if.tif", stack)  # pages, no OME axes
        stack = tmp_path / "if.tif"
    with pytest.raises(ValueError, match=r"has 5 channels \(uint16\).*Select one channel.*fluorescence=True"):
        sg.io.from_anndata(source["adata"][:5].copy(), stack, pixel_size_um=HE_PIXEL, cells_outside="drop")


def test_three_channel_fluorescence_composite(source, tmp_path):
    """A DAPI + 2-marker composite: `fluorescence=True` gives a dark fill, per-channel ranges and the tissue of the
    1-channel DAPI; read as brightfield (the default for 3 channels) it keeps other tiles."""
    from sigmma_sc.data._tiles import image_modality, tile_reader

    adata = source["adata"].copy()
    adata.obsm["spatial"] = source["um"]
    dapi = np.asarray(source["dapi"].data.compute() if hasattr(source["dapi"].data, "compute") else source["dapi"].data)
    composite = np.concatenate([dapi, dapi // 4, np.minimum(dapi.astype(np.uint32) * 3, 65535).astype(np.uint16)])
    kwargs = {"pixel_size_um": PIXEL_SIZE, "coordinates": "um"}
    ref = sg.io.from_anndata(adata, dapi, **kwargs)
    fl = sg.io.from_anndata(adata, composite, fluorescence=True, **kwargs)
    bf = sg.io.from_anndata(adata, composite, **kwargs)
    assert fl.attrs["sigmma"]["fluorescence"] == ["morphology"]
    assert "he" in bf.images
    tiled = {}
    for name, sdata in (("ref", ref), ("fl", fl), ("bf", bf)):
        sg.pp.tile(sdata, tile_size_um=32.0, pixel_size_um=1.0)
        tiled[name] = sdata.tables[Keys.TILE_TABLE].obs[[Keys.TILE_ROW, Keys.TILE_COL, Keys.TISSUE_FRACTION]]
    np.testing.assert_allclose(tiled["fl"].to_numpy(), tiled["ref"].to_numpy())
    assert len(tiled["bf"]) < 0.5 * len(tiled["ref"])  # control: read as brightfield, bright tissue looks like glass
    reader = tile_reader(fl)
    assert image_modality(fl) == "fluorescence"
    assert not reader.brightfield
    assert (reader.read_square(-500.0, -500.0, 20.0, 8) == 0).all()  # off the image: dark, not white
    lo, hi = reader.intensity_range()
    assert lo.shape == hi.shape == (3,)
    np.testing.assert_allclose(hi[1] * 4, hi[0], rtol=0.02)  # each channel stretched by its own percentiles
    import spatialdata as sd

    fl.write(tmp_path / "fl.zarr")  # the record survives a zarr round trip
    assert not tile_reader(sd.read_zarr(tmp_path / "fl.zarr")).brightfield
    with pytest.raises(ValueError, match="`fluorescence=False` needs RGB"):
        sg.io.from_anndata(adata, dapi, fluorescence=False, **kwargs)


@pytest.mark.data
def test_real_bone_marrow_from_matrix_metadata_and_image(caplog):
    """The files users often have: the 10x cell-feature matrix, the cell centroids and the DAPI image (the real
    bone-marrow crop, 3000 x 3000 px at 0.2125 µm/px). Right units: no placement warning; µm passed as pixels: a
    warning naming coordinates='um'; the cells of the left half or of the top-left quarter of the crop (regions of
    interest): none (the quarter is told from a wrong unit by its cells sitting on the nuclei)."""
    import logging

    import scanpy as sc
    from conftest import SHARED_DATA
    from skimage.io import imread

    root = SHARED_DATA / "xenium-bonemarrow"
    cells = pd.read_parquet(root / "roi" / "cells_roi.parquet").set_index("cell_id")
    matrix = sc.read_10x_h5(root / "cell_feature_matrix.h5")
    adata = matrix[matrix.obs_names.isin(cells.index)].copy()
    frame = cells.loc[adata.obs_names, ["x_px", "y_px"]] - [10_000.0, 1_000.0]  # pixels of the crop, named columns
    dapi = imread(root / "roi" / "dapi_roi_x10000-13000_y1000-4000.png")
    assert adata.n_obs == 12_063
    cases = {
        "right": (frame, "pixels", False),
        "um as pixels": (frame.set_axis(["x", "y"], axis=1) * PIXEL_SIZE, "pixels", True),
        "left half": (frame[frame["x_px"] < 1500], "pixels", False),
        # its extent matches the tissue best scaled by 2, but the cells sit on the DAPI nuclei only as given
        "top-left quarter": (frame[(frame["x_px"] < 1500) & (frame["y_px"] < 1500)], "pixels", False),
    }
    for name, (xy, unit, warns) in cases.items():
        sub = adata[xy.index].copy()
        sub.obsm["spatial"] = xy
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sigmma_sc"):
            sdata = sg.io.from_anndata(sub, dapi, pixel_size_um=PIXEL_SIZE, coordinates=unit)
        warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert ("pass coordinates='um'" in warnings) == warns, (name, warnings)
        assert ("nuclei only when read as um" in warnings) == warns, (name, warnings)
        assert "cover only part" not in warnings, (name, warnings)
        assert ("taken as a region of interest" in caplog.text) == (name == "top-left quarter"), name
        assert sdata.tables["table"].n_obs == len(xy)


def test_region_of_interest_is_not_taken_for_a_wrong_unit(source, caplog):
    """The cells of one quarter of the synthetic tissue, in the right unit: their extent alone would fit better
    scaled up, but they sit on the H&E's nuclei as given, so no warning; the same cells in µm passed as pixels
    (off their nuclei) still warn."""
    import logging

    px = source["he_px"]
    centre = np.median(px, 0)
    roi = (px[:, 0] < centre[0]) & (px[:, 1] < centre[1])
    adata = source["adata"][roi].copy()
    adata.obsm["spatial"] = px[roi]
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "match" in r.getMessage()]
    caplog.clear()
    adata.obsm["spatial"] = px[roi] * HE_PIXEL
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.io.from_anndata(adata, source["he"], pixel_size_um=HE_PIXEL)
    assert "nuclei only when read as um" in caplog.text
    assert "pass coordinates='um'" in caplog.text
