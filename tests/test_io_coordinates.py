"""Property-based tests (hypothesis) of sg.io.from_anndata's coordinate handling: units, axis order, the image's
transformation, DataFrame and array forms. Each property holds for every drawn section, so a new variant of the
input is caught here rather than by a user."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg

hypothesis = pytest.importorskip("hypothesis")  # in the `test` extra
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# CI draws the same examples every run (no flaky failures); elsewhere each run draws new ones, so a developer's
# run can still find a new variant (add it as an explicit test, as test_a_cell_on_the_border_in_um_is_on_the_image)
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=bool(os.environ.get("CI"))
)
H, W = 48, 64  # a small non-square H&E: tissue (dark) on glass (white)

X_NAMES = ["x", "X", "x_centroid", "center_x", "CenterX_global_px", "pxl_col_in_fullres", "imagecol", "x_location"]
Y_NAMES = ["y", "Y", "y_centroid", "center_y", "CenterY_global_px", "pxl_row_in_fullres", "imagerow", "y_location"]


def _image() -> np.ndarray:
    img = np.full((3, H, W), 240, np.uint8)
    img[:, 6:42, 8:58] = np.array([170, 90, 150], np.uint8)[:, None, None]
    return img


def _adata(xy: np.ndarray):
    import anndata as ad

    n = len(xy)
    a = ad.AnnData(np.ones((n, 2), np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    a.obsm["spatial"] = xy
    return a


cells = (
    st.integers(3, 30)
    .flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(0, W, allow_nan=False), min_size=n, max_size=n),
            st.lists(st.floats(0, H, allow_nan=False), min_size=n, max_size=n),
        )
    )
    .map(lambda t: np.c_[t[0], t[1]])
)
pixel_sizes = st.floats(0.1, 4.0, allow_nan=False)


@SETTINGS
@given(px=cells, ps=pixel_sizes, name=st.integers(0, len(X_NAMES) - 1), y_first=st.booleans())
def test_named_columns_in_any_order_equal_the_xy_array(px, ps, name, y_first):
    cols = [X_NAMES[name], Y_NAMES[name]]
    frame = pd.DataFrame(px, columns=cols)
    if y_first:
        frame = frame[cols[::-1]]
    a = _adata(px)
    b = _adata(px)
    b.obsm["spatial"] = frame.set_axis(b.obs_names)
    ref = sg.io.from_anndata(a, _image(), pixel_size_um=ps).tables["table"].obsm["spatial"]
    got = sg.io.from_anndata(b, _image(), pixel_size_um=ps).tables["table"].obsm["spatial"]
    np.testing.assert_allclose(got, ref)
    np.testing.assert_allclose(ref, px * ps)


@SETTINGS
@given(px=cells, ps=pixel_sizes)
def test_pixels_and_um_give_the_same_section(px, ps):
    by_px = sg.io.from_anndata(_adata(px), _image(), pixel_size_um=ps)
    by_um = sg.io.from_anndata(_adata(px * ps), _image(), pixel_size_um=ps, coordinates="um")
    np.testing.assert_allclose(by_um.tables["table"].obsm["spatial"], by_px.tables["table"].obsm["spatial"])
    circles = by_um.shapes["cell_circles"]
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], px * ps)


@SETTINGS
@given(px=cells, ps=pixel_sizes, prior=st.floats(0.2, 5.0), shift=st.floats(-100, 100))
def test_image_transformation_maps_the_cells_back_to_their_pixels(px, ps, prior, shift):
    """The image is registered by Scale(pixel_size_um), whatever transformation an element brought along."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine, get_transformation

    matrix = np.array([[prior, 0.0, shift], [0.0, prior, -shift], [0.0, 0.0, 1.0]])
    element = Image2DModel.parse(
        _image(), dims=("c", "y", "x"), transformations={"global": Affine(matrix, ("x", "y"), ("x", "y"))}
    )
    sdata = sg.io.from_anndata(_adata(px), element, pixel_size_um=ps)
    t = get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    um = sdata.tables["table"].obsm["spatial"]
    back = (np.linalg.inv(t) @ np.c_[um, np.ones(len(um))].T).T[:, :2]
    np.testing.assert_allclose(back, px, atol=1e-9 * max(1.0, float(np.abs(px).max())))
    assert get_transformation(element, "global").to_affine_matrix(("x", "y"), ("x", "y")).tolist() == matrix.tolist()


@SETTINGS
@given(px=cells, axes=st.sampled_from(["cyx", "yxc", "cxy", "xyc"]))
def test_image_axis_order_gives_the_same_image(px, axes):
    img = _image()
    arr = np.transpose(img, ["cyx".index(a) for a in axes])
    sdata = sg.io.from_anndata(_adata(px), arr, pixel_size_um=0.5, image_axes=axes)
    np.testing.assert_array_equal(np.asarray(sdata.images["he"].data), img)


@SETTINGS
@given(px=cells.filter(lambda p: (p[:, 0] > H + 1).any()))
def test_transposed_cells_get_the_swap_hint(px):
    """Cells given as (row, col) on a wider-than-high image: some fall off, and all fit when swapped."""
    with pytest.raises(ValueError, match="look transposed; swap them"):
        sg.io.from_anndata(_adata(px[:, ::-1].copy()), _image(), pixel_size_um=0.5)


def test_a_cell_on_the_border_in_um_is_on_the_image():
    """Found by hypothesis: (0, 48) px on a 48 px high image, given in µm at 2.83017 µm/px, came back 48.0000001 px."""
    px = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 48.0]])
    ps = 2.830172490854282
    sdata = sg.io.from_anndata(_adata(px * ps), _image(), pixel_size_um=ps, coordinates="um")
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], px * ps)
