"""``sg.io.wsi``: whole-slide images into SpatialData (lazy, multiscale, MPP from the file)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

import sigmma_sc as sg
from sigmma_sc._constants import Keys

SVS = SHARED_DATA / "he-images" / "cmu1_small_region.svs"


def _pyramid(path, *, pixel_size=0.5, n=1024, ome=True):
    """A small tiled pyramidal TIFF: a pink disc on white glass, 3 levels."""
    import tifffile

    yy, xx = np.mgrid[0:n, 0:n]
    img = np.full((n, n, 3), 242, np.uint8)
    img[(xx - n / 2) ** 2 + (yy - n / 2) ** 2 < (0.35 * n) ** 2] = (190, 110, 170)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as tif:
        meta = {"axes": "YXS", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size} if ome else None
        kw = {"resolution": (1e4 / pixel_size, 1e4 / pixel_size), "resolutionunit": "CENTIMETER"} if ome else {}
        tif.write(img, subifds=2, metadata=meta, **kw, **opts)
        for k in (2, 4):
            tif.write(img[::k, ::k], subfiletype=1, **opts)
    return img


def test_reads_a_pyramidal_tiff_lazily_in_micrometres(tmp_path):
    import dask.array as da
    from spatialdata.transformations import get_transformation

    _pyramid(tmp_path / "slide.ome.tif", pixel_size=0.5)
    sdata = sg.io.wsi(tmp_path / "slide.ome.tif")
    image = sdata.images["he"]
    assert list(image.children) == ["scale0", "scale1", "scale2"]
    level0 = image["scale0"]["image"]
    assert level0.shape == (3, 1024, 1024)
    assert isinstance(level0.data, da.Array)
    assert image["scale2"]["image"].shape == (3, 256, 256)
    assert np.allclose(get_transformation(level0, "global").to_affine_matrix(("x", "y"), ("x", "y"))[:2, :2],
                       np.diag([0.5, 0.5]))  # fmt: skip
    assert sdata.attrs[Keys.UNS]["um_per_unit"] == {"global": 1.0}
    assert sdata.attrs[Keys.UNS]["slide"]["mpp"] == [0.5, 0.5]
    sg.pp.tile(sdata, table_key=None, tile_size_um=64.0, pixel_size_um=1.0)
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert 0 < tiles.n_obs < 64  # 8 x 8 grid: the corners are glass
    assert tiles.uns[Keys.UNS]["tile"]["pixel_size_um"] == 1.0


def test_missing_pixel_size_asks_for_it(tmp_path):
    _pyramid(tmp_path / "nompp.tif", ome=False)
    with pytest.raises(ValueError, match=r"no pixel size.*pixel_size_um="):
        sg.io.wsi(tmp_path / "nompp.tif")
    sdata = sg.io.wsi(tmp_path / "nompp.tif", pixel_size_um=0.25)
    assert sdata.attrs[Keys.UNS]["slide"]["mpp_source"] == "argument"
    with pytest.raises(ValueError, match="pixel_size_um"):
        sg.io.wsi(tmp_path / "nompp.tif", pixel_size_um=-1)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(ValueError, match=r"not a whole-slide image.*OME-TIFF"):
        sg.io.wsi(bad)
    with pytest.raises(FileNotFoundError, match="No such slide"):
        sg.io.wsi(tmp_path / "absent.svs")


@pytest.mark.data
def test_aperio_svs_mpp_and_tissue_tiles():
    sdata = sg.io.wsi(SVS)
    slide = sdata.attrs[Keys.UNS]["slide"]
    assert slide["mpp"] == pytest.approx([0.499, 0.499])
    assert slide["vendor"] == "aperio"
    assert sdata.images["he"].shape == (3, 2967, 2220)
    sg.pp.tile(sdata, table_key=None, tile_size_um=128.0, pixel_size_um=0.5)
    tiles = sdata.tables[Keys.TILE_TABLE]
    grid = np.prod(tiles.uns[Keys.UNS]["tile"]["grid_shape"])
    # the tissue is a diagonal strip over about 40% of the slide: tiles over it only, none on the glass
    assert 0.3 * grid < tiles.n_obs < 0.7 * grid
    assert (tiles.obs[Keys.TISSUE_FRACTION] >= 0.05).all()
    x0, y0 = tiles.obs[Keys.TILE_X0].to_numpy(), tiles.obs[Keys.TILE_Y0].to_numpy()
    assert not ((x0 < 256) & (y0 < 256)).any()  # the glass of the top-left corner holds no tile
    assert not ((x0 >= 896) & (y0 >= 1280)).any()  # nor that of the bottom-right corner
