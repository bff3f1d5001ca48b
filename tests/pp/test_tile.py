from __future__ import annotations

import numpy as np
import pytest
import shapely
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import Keys


def _run(sdata, **kwargs):
    kwargs = {"image_key": "he", "tile_size_um": 16.0, "pixel_size_um": 0.5, **kwargs}
    sg.pp.tile(sdata, **kwargs)
    return sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]


@pytest.mark.parametrize("cells_in_um", [False, True])
def test_cells_land_in_their_tile_and_block_under_affine(cells_in_um):
    sdata = make_section(rotation_deg=17.0, offset=(40.0, -25.0), unit_per_px=1.3, cells_in_um=cells_in_um)
    tiles, cells = _run(sdata)
    polys = sdata.shapes[Keys.tiling(image_key="he")["shapes"]].geometry.to_numpy()
    xy = cells.obsm[Keys.tiling()["cell_spatial"]]
    tile_of = cells.obs[Keys.CELL_TILE].to_numpy()
    assert (tile_of >= 0).all()
    # brute force: the polygon that contains each centroid
    pts = shapely.points(xy)
    for i in np.random.default_rng(0).choice(len(xy), 60, replace=False):
        inside = np.flatnonzero(shapely.contains(polys, pts[i]) | shapely.touches(polys, pts[i]))
        assert tile_of[i] in inside
        b = polys[tile_of[i]].bounds
        side = b[2] - b[0]
        for scale, g in (("micro", 4), ("meso", 2)):
            blk = cells.obs[Keys.tiling()["cell_blocks"][scale]].iloc[i]
            by, bx = divmod(blk, g)
            box = shapely.box(
                b[0] + bx * side / g, b[1] + by * side / g, b[0] + (bx + 1) * side / g, b[1] + (by + 1) * side / g
            )
            assert box.buffer(1e-9).contains(pts[i])
    # every cell in exactly one kept tile: counts add up
    assert tiles.obs[Keys.N_CELLS].sum() == len(cells)
    assert np.allclose(np.asarray(tiles.X.sum(0)).ravel(), np.asarray(cells.X.sum(0)).ravel())


def test_registration_dot_lands_at_cell_position():
    """A bright dot in the image at a cell's location appears at that cell's position in its tile image."""
    from sigmma_sc.data import iter_tile_images

    sdata = make_section(rotation_deg=30.0, offset=(10.0, 5.0), unit_per_px=0.8, scale_factors=[2, 2], n_cells=50)
    img = sdata.images["he"]
    # paint a small black dot at the pixel of cell 0 in every pyramid level via its centroid
    sg.pp.tile(sdata, image_key="he", tile_size_um=32.0, pixel_size_um=0.5)
    cells = sdata.tables["table"]
    xy = cells.obsm[Keys.tiling()["cell_spatial"]][0]
    reader = sg.data.ImageReader(img, "global", 0.5)
    for lv in range(len(reader.levels)):
        px = reader.to_pixels(xy[None], lv)[0]
        arr = img[f"scale{lv}"]["image"]
        data = arr.data.compute()
        r = max(1, int(round(2 / 2**lv)))
        iy, ix = int(px[1]), int(px[0])
        data[:, iy - r : iy + r + 1, ix - r : ix + r + 1] = 0
        img[f"scale{lv}"]["image"].data = __import__("dask.array").array.from_array(data)
    t = int(cells.obs[Keys.CELL_TILE].iloc[0])
    tile_img = next(iter_tile_images(sdata, indices=[t]))
    params = sdata.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    obs = sdata.tables[Keys.TILE_TABLE].obs.iloc[t]
    exp = (xy - [obs["x0"], obs["y0"]]) / params["tile_size"] * params["tile_px"]
    dark = tile_img.astype(int).sum(0)
    iy, ix = np.unravel_index(dark.argmin(), dark.shape)
    assert abs(ix + 0.5 - exp[0]) <= 2.5
    assert abs(iy + 0.5 - exp[1]) <= 2.5


@pytest.mark.parametrize(("unit_per_px", "scale_factors", "pixel_size_um", "level"), [
    (1.0, None, 0.5, 0),  # native 0.5 µm/px
    (0.5, [2, 2], 0.5, 1),  # native 0.25 µm/px: level 1 is 0.5 µm/px
    (0.25, [2, 2], 1.0, 2),  # native 0.125 µm/px: level 2 is 0.5 µm/px, closest not coarser than 1.0
    (2.0, None, 0.5, 0),  # native 1 µm/px: upsampled
])  # fmt: skip
def test_tile_pixel_size_and_level(unit_per_px, scale_factors, pixel_size_um, level):
    """Stripes of a known physical period keep that period (in output pixels) at any resolution and level."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from sigmma_sc.data import iter_tile_images

    sdata = make_section(unit_per_px=unit_per_px, scale_factors=scale_factors, image_px=512, n_cells=200)
    period_um = 8.0
    reader = sg.data.ImageReader(sdata.images["he"], "global", 0.5)
    assert reader.level_for(pixel_size_um) == level
    old = sdata.images["he"]
    w = 512
    x_um = (np.arange(w) + 0.5) * reader.levels[0].pixel_size_um
    stripe = ((np.sin(2 * np.pi * x_um / period_um) > 0) * 200 + 20).astype(np.uint8)
    sdata.images["he"] = Image2DModel.parse(
        np.broadcast_to(stripe, (3, w, w)).copy(),
        dims=("c", "y", "x"),
        scale_factors=scale_factors,
        transformations=get_transformation(old, get_all=True),
    )
    sg.pp.tile(sdata, image_key="he", tile_size_um=32.0, pixel_size_um=pixel_size_um, min_tissue_fraction=0.0)
    params = sdata.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    assert params["tile_px"] == round(32 / pixel_size_um)
    tile_img = next(iter_tile_images(sdata, indices=[0]))
    assert tile_img.shape == (3, params["tile_px"], params["tile_px"])
    profile = tile_img[0].astype(float).mean(0) - tile_img[0].mean()
    spectrum = np.abs(np.fft.rfft(profile))
    freq = np.fft.rfftfreq(profile.size)[spectrum[1:].argmax() + 1]
    assert 1 / freq == pytest.approx(period_um / pixel_size_um, rel=0.08)


def test_background_tiles_dropped_and_cells_accounted():
    sdata = make_section(n_cells=300)
    tiles, cells = _run(sdata, tile_size_um=10.0)
    params = tiles.uns["sigmma"]["tile"]
    n_rows, n_cols = params["grid_shape"]
    assert len(tiles) < n_rows * n_cols  # margin tiles without tissue or cells are gone
    assert (tiles.obs[Keys.N_CELLS] >= 1).all()
    assert (tiles.obs[Keys.TISSUE_FRACTION] >= 0.05).all()
    tile_of = cells.obs[Keys.CELL_TILE].to_numpy()
    assert ((tile_of >= 0).sum() + params["n_dropped_cells"]) == len(cells)
    counts = np.bincount(tile_of[tile_of >= 0], minlength=len(tiles))
    assert np.array_equal(counts, tiles.obs[Keys.N_CELLS].to_numpy())


def test_min_cells_drops_cells_and_counts_them():
    sdata = make_section(n_cells=300)
    tiles, cells = _run(sdata, tile_size_um=10.0, min_cells=5)
    tile_of = cells.obs[Keys.CELL_TILE].to_numpy()
    dropped = (tile_of < 0).sum()
    assert dropped == tiles.uns["sigmma"]["tile"]["n_dropped_cells"] > 0
    assert (cells.obs.loc[tile_of < 0, Keys.tiling()["cell_blocks"]["micro"]] == -1).all()


def test_split_fractions_and_spatial_disjointness():
    sdata = make_section(n_cells=3000, image_px=512)
    tiles, _ = _run(sdata, tile_size_um=8.0, split_region_tiles=2)
    obs = tiles.obs
    frac = obs[Keys.SPLIT].value_counts(normalize=True)
    assert frac["train"] == pytest.approx(0.8, abs=0.05)
    assert frac["val"] == pytest.approx(0.1, abs=0.04)
    assert frac["test"] == pytest.approx(0.1, abs=0.04)
    # a split region holds one split only, and regions are 2x2 tile blocks
    assert (obs.groupby(Keys.SPLIT_REGION, observed=True)[Keys.SPLIT].nunique() == 1).all()
    assert (obs.groupby(Keys.SPLIT_REGION)[Keys.TILE_ROW].agg(lambda r: r.max() - r.min()) <= 1).all()
    # deterministic for a seed, different for another
    again = make_section(n_cells=3000, image_px=512)
    tiles2, _ = _run(again, tile_size_um=8.0, split_region_tiles=2)
    assert (tiles2.obs[Keys.SPLIT] == obs[Keys.SPLIT]).all()
    tiles3, _ = _run(make_section(n_cells=3000, image_px=512), tile_size_um=8.0, split_region_tiles=2, seed=1)
    assert not (tiles3.obs[Keys.SPLIT] == obs[Keys.SPLIT]).all()


@pytest.mark.parametrize("buffer", [1, 2])
def test_split_buffer_separates_held_out_tiles_from_training(buffer):
    """With ``split_buffer=b`` no training tile lies within ``b`` tiles of a val/test tile; the rest is unchanged."""
    sdata = make_section(n_cells=3000, image_px=512)
    plain, _ = _run(sdata, tile_size_um=8.0, split_region_tiles=2)
    plain = plain.obs.copy()
    tiles, _ = _run(
        make_section(n_cells=3000, image_px=512), tile_size_um=8.0, split_region_tiles=2, split_buffer=buffer
    )
    obs = tiles.obs
    split, plain_split = obs[Keys.SPLIT].astype(str).to_numpy(), plain[Keys.SPLIT].astype(str).to_numpy()
    rc = obs[[Keys.TILE_ROW, Keys.TILE_COL]].to_numpy()
    cheb = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1)  # grid distance between every two tiles
    held = np.isin(split, ["val", "test"])
    train = split == "train"
    # without a buffer the regions touch: some training tile is the direct neighbour of a held-out tile
    plain_train = plain_split == "train"
    assert (cheb[np.ix_(plain_train, held)] <= 1).any()
    assert (cheb[np.ix_(train, held)] > buffer).all()
    # val/test are unchanged; the buffer tiles are exactly the training tiles that were too close
    assert (split[held] == plain_split[held]).all()
    buf = split == "buffer"
    assert buf.any()
    assert (plain_split[buf] == "train").all()
    assert (cheb[np.ix_(buf, held)].min(1) <= buffer).all()
    assert train.sum() + buf.sum() == plain_train.sum()
    assert tiles.uns["sigmma"]["tile"]["split_buffer"] == buffer
    # the bundle leaves buffer tiles out of every split the model uses
    from sigmma_sc.data._build import build_bundle

    buffered = make_section(n_cells=3000, image_px=512)
    _run(buffered, tile_size_um=8.0, split_region_tiles=2, split_buffer=buffer)
    sg.pp.cell_graph(buffered, n_comps=5)
    bundle, _ = build_bundle(buffered, require_image_features=False)
    codes = bundle.split.numpy()
    assert (codes[buf] == 3).all()
    assert set(bundle.tiles_in("train").tolist()) == set(np.flatnonzero(train).tolist())
    assert set(bundle.tiles_in("test").tolist()) == set(np.flatnonzero(split == "test").tolist())


def test_fluorescence_image_tissue_detection():
    sdata = make_section(rgb=False, n_cells=300)
    tiles, _ = _run(sdata, tile_size_um=10.0)
    assert len(tiles) > 0
    assert tiles.obs[Keys.TISSUE_FRACTION].median() > 0.5


def test_zarr_round_trip(section, tmp_path):
    import spatialdata as sd

    sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    sg.pp.cell_graph(section, n_comps=5)
    path = tmp_path / "section.zarr"
    section.write(path)
    back = sd.read_zarr(path)
    t0, t1 = section.tables[Keys.TILE_TABLE], back.tables[Keys.TILE_TABLE]
    assert t1.obs[Keys.SPLIT].tolist() == t0.obs[Keys.SPLIT].tolist()
    assert np.allclose(t1.X.toarray(), t0.X.toarray())
    assert t1.uns["sigmma"]["tile"]["tile_px"] == t0.uns["sigmma"]["tile"]["tile_px"]
    c0, c1 = section.tables["table"], back.tables["table"]
    for key in (Keys.CELL_TILE, Keys.tiling()["cell_blocks"]["micro"], Keys.tiling()["cell_blocks"]["meso"]):
        assert np.array_equal(c0.obs[key].to_numpy(), c1.obs[key].to_numpy())
    assert (c1.obsp["sigmma_connectivities"] != c0.obsp["sigmma_connectivities"]).nnz == 0
    assert np.allclose(c1.obsm["sigmma_features"], c0.obsm["sigmma_features"])
    shp = back.shapes[Keys.tiling(image_key="he")["shapes"]]
    assert len(shp) == len(t1)
    assert back.attrs["sigmma"]["um_per_unit"]["global"] == 0.5
    from spatialdata.models import get_table_keys

    assert get_table_keys(t1)[0] == Keys.tiling(image_key="he")["shapes"]


def test_inplace_false_leaves_sdata_unchanged(section):
    before_tables, before_shapes = set(section.tables), set(section.shapes)
    shapes, tiles, cells = sg.pp.tile(section, image_key="he", tile_size_um=16.0, inplace=False)
    assert set(section.tables) == before_tables
    assert set(section.shapes) == before_shapes
    assert Keys.CELL_TILE not in section.tables["table"].obs
    assert len(shapes) == len(tiles)
    assert len(cells) == section.tables["table"].n_obs


# ---- bad input: one clear error each, nothing written ----------------------------------------------


def _assert_untouched(sdata):
    assert Keys.TILE_TABLE not in sdata.tables
    assert not any(k.endswith(Keys.tiling(image_key="")["shapes"]) for k in sdata.shapes)
    assert Keys.CELL_TILE not in sdata.tables["table"].obs


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_key": "nope"}, "No image 'nope'.*image_key"),
    ({"table_key": "nope"}, "No table 'nope'.*table_key"),
    ({"tile_size_um": 0}, "tile_size_um.*positive"),
    ({"tile_size_um": -5}, "tile_size_um.*positive"),
    ({"pixel_size_um": 0}, "pixel_size_um.*positive"),
    ({"tile_size_um": 4.0, "pixel_size_um": 0.5}, "micro crops.*Increase `tile_size_um`"),
    ({"tile_size_um": 6.0, "pixel_size_um": 0.1}, "full resolution.*Increase `tile_size_um`"),
    ({"coordinate_system": "other"}, "coordinate system 'other'"),
    ({"split_fractions": (0.5, 0.1, 0.1)}, "split_fractions"),
    ({"split_buffer": -1}, "split_buffer.*non-negative"),
    ({"split_buffer": 0.5}, "split_buffer.*non-negative"),
])  # fmt: skip
def test_bad_arguments(section, kwargs, match):
    with pytest.raises((ValueError, KeyError), match=match):
        sg.pp.tile(section, **{"image_key": "he", "tile_size_um": 16.0, **kwargs})
    _assert_untouched(section)


def test_unknown_physical_scale(section):
    section.attrs.clear()
    with pytest.raises(ValueError, match="um_per_unit="):
        sg.pp.tile(section, image_key="he")
    _assert_untouched(section)
    sg.pp.tile(section, image_key="he", um_per_unit=0.5, tile_size_um=16.0)


def test_table_annotating_nothing(section):
    import anndata as ad

    section.tables["table"] = ad.AnnData(section.tables["table"].X.copy())
    with pytest.raises(ValueError, match="annotates no SpatialData element.*TableModel.parse"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)


def test_no_shared_coordinate_system(section):
    from spatialdata.transformations import Identity, remove_transformation, set_transformation

    set_transformation(section.images["he"], Identity(), to_coordinate_system="aligned")
    remove_transformation(section.images["he"], "global")
    with pytest.raises(ValueError, match="share no coordinate system"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    _assert_untouched(section)


def test_cells_outside_image(section):
    from spatialdata.transformations import Scale, set_transformation

    set_transformation(section.images["he"], Scale([0.5, 0.5], axes=("x", "y")), to_coordinate_system="global")
    with pytest.raises(ValueError, match="outside image.*cells_outside='drop'"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    _assert_untouched(section)
    sg.pp.tile(section, image_key="he", tile_size_um=16.0, cells_outside="drop")
    tile_of = section.tables["table"].obs[Keys.CELL_TILE]
    assert (tile_of == -1).any()
    assert (tile_of >= 0).any()


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_bad_counts(section, bad):
    X = section.tables["table"].X.copy()
    X[3, 2] = bad
    section.tables["table"].X = X
    with pytest.raises(ValueError, match="raw counts"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    _assert_untouched(section)


def test_image_only_tiling_keeps_tissue_tiles_without_cells():
    """``table_key=None``: an image without transcriptomics; the cell table, if any, is left untouched."""
    sdata = make_section(n_cells=300, image_px=96)
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0)
    with_cells = sdata.tables[Keys.TILE_TABLE]
    obs_before = sdata.tables["table"].obs.copy()
    shapes, tiles, cells = sg.pp.tile(sdata, image_key="he", table_key=None, tile_size_um=16.0, inplace=False)
    assert cells.empty
    assert tiles.n_vars == 0
    assert (tiles.obs[Keys.N_CELLS] == 0).all()
    assert len(shapes) == tiles.n_obs
    # every tile kept with cells is tissue, so it is kept without cells too (same grid)
    grid = set(zip(tiles.obs[Keys.TILE_ROW], tiles.obs[Keys.TILE_COL], strict=True))
    assert set(zip(with_cells.obs[Keys.TILE_ROW], with_cells.obs[Keys.TILE_COL], strict=True)) <= grid
    assert (tiles.obs[Keys.TISSUE_FRACTION] >= 0.05).all()
    sg.pp.tile(sdata, image_key="he", table_key=None, tile_size_um=16.0, key_added="he_only")
    assert sdata.tables["table"].obs.equals(obs_before)
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    blank = sd.SpatialData(images={"he": Image2DModel.parse(np.full((3, 64, 64), 255, np.uint8), dims=("c", "y", "x"))})
    with pytest.raises(ValueError, match="No tile of image 'he' holds at least 5% tissue"):
        sg.pp.tile(blank, image_key="he", table_key=None, tile_size_um=16.0, um_per_unit=1.0, inplace=False)


# ---- image intensities and channels ----------------------------------------------------------------


def _replace_image(sdata, img, key="he"):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    old = sdata.images[key]
    sdata.images[key] = Image2DModel.parse(
        img, dims=("c", "y", "x"), transformations=get_transformation(old, get_all=True)
    )


def _tiled(sdata, **kwargs):
    sg.pp.tile(sdata, image_key="he", tile_size_um=10.0, **kwargs)
    return sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]


def test_float_rgb_image_in_unit_range_reads_like_uint8():
    """Float H&E in [0, 1]: glass stays white (not grey) and areas off the image are background, not black."""
    from sigmma_sc.data._image import ImageReader

    ref = make_section(n_cells=300)
    img = np.asarray(ref.images["he"].data)
    sdata = make_section(n_cells=300)
    _replace_image(sdata, img.astype(np.float32) / 255)
    reader = ImageReader(sdata.images["he"], "global", 0.5)
    assert reader.intensity_range() == (0.0, 1.0)
    glass = reader.read_square(0.0, 0.0, 10.0, 8)  # image corner: glass (245)
    assert glass.min() >= 244
    off = reader.read_square(-100.0, -100.0, 10.0, 8)
    assert (off == 255).all()
    tiles, _ = _tiled(sdata)
    ref_tiles, _ = _tiled(ref)
    assert tiles.n_obs == ref_tiles.n_obs
    assert np.allclose(tiles.obs[Keys.TISSUE_FRACTION], ref_tiles.obs[Keys.TISSUE_FRACTION])


def test_saturated_artefact_does_not_hide_the_tissue(caplog):
    """uint16 morphology with a saturated artefact on 2% of the area: tissue is still found, with a warning."""
    import logging

    ref = make_section(rgb=False, n_cells=300)
    ref_tiles, ref_cells = _tiled(ref)
    sdata = make_section(rgb=False, n_cells=300)
    img = np.asarray(sdata.images["he"].data).copy()
    side = int(np.sqrt(0.02) * img.shape[1])
    img[:, :side, :side] = np.iinfo(np.uint16).max  # a bright artefact in a corner
    _replace_image(sdata, img)
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        tiles, cells = _tiled(sdata)
    assert "saturated" in caplog.text
    assert tiles.n_obs >= 0.9 * ref_tiles.n_obs
    assert (cells.obs[Keys.CELL_TILE] >= 0).sum() >= 0.9 * (ref_cells.obs[Keys.CELL_TILE] >= 0).sum()


def test_warning_when_most_cells_are_untiled(section, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=10.0, min_cells=8)
    assert "are tiled" in caplog.text
    assert "fewer than `min_cells`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=10.0)
    assert "are tiled" not in caplog.text


def test_rgba_image_is_composited_over_white():
    """RGBA (transparent, black outside the tissue) tiles like the RGB image."""
    ref = make_section(n_cells=300)
    rgb = np.asarray(ref.images["he"].data)
    tissue = (rgb != 245).any(0)
    rgba = np.concatenate([np.where(tissue, rgb, 0), np.where(tissue, 255, 0)[None]]).astype(np.uint8)
    sdata = make_section(n_cells=300)
    _replace_image(sdata, rgba)
    tiles, _ = _tiled(sdata)
    ref_tiles, _ = _tiled(ref)
    assert tiles.n_obs == ref_tiles.n_obs
    from sigmma_sc.data._tiles import iter_tile_images

    assert next(iter_tile_images(sdata, indices=[0])).shape[0] == 3


def test_two_channel_image_refused_before_tiling(section):
    img = np.zeros((2, 64, 64), dtype=np.uint16)
    _replace_image(section, img)
    with pytest.raises(ValueError, match=r"2 channels.*Store the channel to use as its own image element"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    _assert_untouched(section)


def test_pixel_size_much_finer_than_image_warns(section, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, pixel_size_um=0.05, inplace=False)
    assert "10x finer than image 'he'" in caplog.text


def test_native_crop_message_does_not_contradict_itself(section):
    with pytest.raises(ValueError, match=r"spans only 3\.9\d? image pixels"):
        sg.pp.tile(section, image_key="he", tile_size_um=7.9, pixel_size_um=0.05)


def test_crop_messages_never_print_the_limit(section):
    """Just below 4 px must not read "4 px (at least 4 needed)" (issue 10, defect 6)."""
    with pytest.raises(ValueError, match=r"spans only 3\.99 image pixels \(at least 4 needed\)"):
        sg.pp.tile(section, image_key="he", tile_size_um=7.999, pixel_size_um=0.05, inplace=False)
    with pytest.raises(ValueError, match=r"read as 12 px, giving micro crops of 3 px; at least 4"):
        sg.pp.tile(section, image_key="he", tile_size_um=13.9, pixel_size_um=1.0, inplace=False)
    # 15.96 µm at 1 µm/px is read as 16 px: micro crops of 4 px, accepted (the ratio 3.99 was refused as "4.0 px")
    tiles = sg.pp.tile(section, image_key="he", tile_size_um=15.96, pixel_size_um=1.0, inplace=False)
    assert tiles is not None


def test_small_section_warns_about_empty_splits(caplog):
    import logging

    sdata = make_section(n_cells=100, image_px=64)
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, pixel_size_um=1.0)
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert tiles.n_obs < 10
    assert f"Only {tiles.n_obs} tiles" in caplog.text
    assert "smaller `tile_size_um`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(make_section(n_cells=3000, image_px=512), image_key="he", tile_size_um=8.0, split_region_tiles=2)
    assert "Only" not in caplog.text


# ---- issue 28: silent wrong results and unclear messages ---------------------------------------------------------


def _dapi_pyramid(artefact_side: int | None = None, n: int = 512, seed: int = 0):
    """A DAPI-like uint16 section (nuclei in a disc, dark background) as a 4-level pyramid of 2x2 means (as slide
    writers make it), optionally with a saturated corner (65535) whose soft rim the optics leave at >= 30000."""
    import dask.array as da
    from scipy import ndimage
    from spatialdata.transformations import Scale

    from sigmma_sc.datasets._tiff import _downsample2
    from sigmma_sc.io._anndata import parse_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    disc = (xx - n / 2) ** 2 + (yy - n / 2) ** 2 < (0.42 * n) ** 2
    pts = rng.uniform(0, n, (n * n // 120, 2)).astype(int)
    pts = pts[disc[pts[:, 1], pts[:, 0]]]
    img = np.zeros((n, n), np.float32)
    img[pts[:, 1], pts[:, 0]] = rng.uniform(0.5, 1.5, len(pts))
    img = ndimage.gaussian_filter(img, 2.0) * 1e5 + 150 + rng.normal(0, 20, img.shape)
    img = np.clip(img, 0, 65535).astype(np.uint16)
    if artefact_side is not None:
        img[:artefact_side, :artefact_side] = 65535
        rim = ndimage.binary_dilation(img == 65535, iterations=3) & (img < 65535)
        img[rim] = np.maximum(img[rim], 30000)
    levels = [img]
    for _ in range(3):
        levels.append(_downsample2(levels[-1]))
    return parse_image([da.from_array(lv[None]) for lv in levels], None, {"global": Scale([0.5, 0.5], ("x", "y"))})


@pytest.mark.parametrize("side", [72, 75, 77])  # 2.0-2.3% of the area; 72 is aligned with the pyramid's blocks
def test_saturated_corner_leaves_range_and_tissue_tiles_unchanged(side, caplog):
    """A saturated 2% corner whose rim a downsampled level and the optics blur below the maximum: the intensity range,
    the kept tiles and their tissue fractions equal the clean image's (before: the rim stayed in the coarse level's
    99.9th percentile and raised the range up to 12x); the warning says what was left out."""
    import logging

    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from sigmma_sc.data._image import ImageReader

    def section(image):
        rng = np.random.default_rng(1)
        xy = rng.uniform(30, 226, (400, 2))  # µm; the image is 256 x 256 µm
        circles = ShapesModel.parse(xy, geometry=0, radius=np.full(400, 3.0), transformations={"global": Identity()})
        table = TableModel.parse(
            ad.AnnData(rng.poisson(2, (400, 5)).astype(np.float32), obs={"region": ["c"] * 400, "i": np.arange(400)}),
            region="c", region_key="region", instance_key="i",
        )  # fmt: skip
        s = sd.SpatialData(images={"dapi": image}, shapes={"c": circles}, tables={"table": table})
        s.attrs["sigmma"] = {"um_per_unit": {"global": 1.0}}
        return s

    clean, dirty = _dapi_pyramid(), _dapi_pyramid(side)
    lo0, hi0 = ImageReader(clean, "global", 1.0).intensity_range()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        lo1, hi1 = ImageReader(dirty, "global", 1.0).intensity_range()
    assert "saturated at 65535" in caplog.text
    assert "they and their rim" in caplog.text
    assert lo1 == pytest.approx(lo0, rel=0.02)
    assert hi1 == pytest.approx(hi0, rel=0.02)
    from sigmma_sc.data._tiles import iter_tile_images

    out, images = {}, {}
    for name, image in (("clean", clean), ("dirty", dirty)):
        s = section(image)
        sg.pp.tile(s, image_key="dapi", tile_size_um=32.0, pixel_size_um=1.0)
        out[name] = s.tables[Keys.TILE_TABLE].obs
        images[name] = np.stack(list(iter_tile_images(s, n_workers=1))).astype(int)
    keep = [Keys.TILE_ROW, Keys.TILE_COL, Keys.TISSUE_FRACTION]
    np.testing.assert_allclose(out["dirty"][keep].to_numpy(), out["clean"][keep].to_numpy())
    # what the model sees: the same images, to one grey level, for every tile clear of the artefact and its rim
    reach = (side + 4) * 0.5  # µm
    clear = ((out["clean"][Keys.TILE_X0] >= reach) | (out["clean"][Keys.TILE_Y0] >= reach)).to_numpy()
    assert clear.sum() >= len(clear) - 1
    assert np.abs(images["dirty"][clear] - images["clean"][clear]).max() <= 1


def test_pixel_size_four_times_finer_warns(section, caplog):
    """4x upsampling warns (the limit is included); 2.5x does not."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, pixel_size_um=0.2, inplace=False)
    assert "finer than image" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, pixel_size_um=0.125, inplace=False)
    assert "4x finer than image 'he'" in caplog.text


def test_single_level_image_is_subsampled_without_a_warning(caplog):
    """A large single-level image (a JPEG, a flat TIFF) has no pyramid by nature: INFO, not a WARNING."""
    import logging

    from sigmma_sc.data._image import ImageReader

    sdata = make_section(n_cells=50, image_px=4200)  # 17.6 megapixels, one level
    reader = ImageReader(sdata.images["he"], "global", 0.5)
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        thumb, _ = reader.thumbnail(max_pixel_size_um=4.0)
    assert thumb.shape[1] == 2100
    assert "one resolution level; reading it subsampled by 2" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_instance_key_column_names_the_fix(section):
    del section.tables["table"].obs["cell_id"]
    with pytest.raises(KeyError, match=r"lacks its instance-key column `.obs\['cell_id'\]`.*TableModel.parse"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    _assert_untouched(section)


def _scanpy_style(table):
    """scanpy's convention: counts kept in `.raw` (all genes), `.X` log-normalised and subset to some genes."""
    import anndata as ad
    import scanpy as sc

    counts = ad.AnnData(table.X.copy(), obs=table.obs.copy(), var=table.var.copy(), uns=dict(table.uns))
    counts.raw = counts.copy()
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    return counts[:, 2:].copy()  # .X: log-normalised, fewer genes; .raw: every gene's counts


def test_counts_in_raw_are_used_and_logged(section, caplog):
    import logging

    from scipy import sparse

    counts = section.tables["table"].X.copy()
    section.tables["table"] = _scanpy_style(section.tables["table"])
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        tiles, cells = _run(section)
    assert "using `.raw` (layer='raw')" in caplog.text
    assert "are not integers" not in caplog.text
    assert tiles.uns["sigmma"]["tile"]["layer"] == "raw"
    member = sparse.csr_matrix(
        (np.ones(cells.n_obs), (np.maximum(cells.obs[Keys.CELL_TILE], 0), np.arange(cells.n_obs))),
        shape=(tiles.n_obs, cells.n_obs),
    ).multiply((cells.obs[Keys.CELL_TILE].to_numpy() >= 0)[None])
    np.testing.assert_allclose(tiles.X.toarray(), member @ np.asarray(counts)[:, 2:])
    sg.pp.cell_graph(section, n_comps=4)  # reads the recorded layer 'raw' without complaint


def test_raw_named_in_errors_and_layer_raw(section):
    table = _scanpy_style(section.tables["table"])
    ref = _scanpy_style(section.tables["table"])
    tiles_explicit = sg.pp.tile(section, image_key="he", tile_size_um=16.0, inplace=False)  # counts in .X
    section.tables["table"] = table
    tiles_raw = sg.pp.tile(section, image_key="he", tile_size_um=16.0, layer="raw", inplace=False)
    np.testing.assert_allclose(tiles_raw[1].X.toarray(), tiles_explicit[1].X.toarray()[:, 2:])
    with pytest.raises(KeyError, match=r"No layer 'counts'.*available layers: \[\]; `layer='raw'` reads `.raw`"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, layer="counts")
    ref.raw = None
    section.tables["table"] = ref
    with pytest.raises(KeyError, match=r"no `.raw` and no layer 'raw'"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, layer="raw")
    _assert_untouched(section)
