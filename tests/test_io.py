"""sg.io.xenium: reading, H&E registration, errors, physical units."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg

PIXEL_SIZE = 0.2125
HE = "sigmma_synthetic_he_image.ome.tif"
ALIGNMENT = "sigmma_synthetic_he_imagealignment.csv"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return sg.datasets.synthetic_xenium(
        tmp_path_factory.mktemp("xenium") / "run", n_cells=400, n_genes=40, seed=3, transcripts=False
    )


@pytest.fixture(scope="module")
def sdata(run_dir):
    return sg.io.xenium(run_dir)


def test_reads_run_with_he(sdata, run_dir):
    from spatialdata.models import get_model
    from spatialdata.transformations import Affine, get_transformation

    assert {"he", "morphology_focus"} <= set(sdata.images)
    assert "he_image" not in sdata.images  # not read twice
    he = sdata.images["he"]
    get_model(he)().validate(he)
    scale0 = he["scale0"]["image"] if hasattr(he, "children") else he
    assert list(scale0.coords["c"].values) == ["r", "g", "b"]
    t = get_transformation(he, "global")
    assert isinstance(t, Affine)
    np.testing.assert_allclose(t.matrix, np.loadtxt(run_dir / ALIGNMENT, delimiter=","))


def test_transformation_matches_spatialdata_io(sdata, run_dir):
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    reference = spatialdata_io.xenium_aligned_image(run_dir / HE, run_dir / ALIGNMENT)
    np.testing.assert_allclose(
        get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y")),
        get_transformation(reference, "global").to_affine_matrix(("x", "y"), ("x", "y")),
    )


def test_table_annotates_circles(sdata, run_dir):
    from spatialdata.models import TableModel

    table = sdata.tables["table"]
    attrs = table.uns[TableModel.ATTRS_KEY]
    assert attrs[TableModel.REGION_KEY] == "cell_circles"
    assert attrs[TableModel.INSTANCE_KEY] == "cell_id"
    assert "cell_id" in table.obs
    circles = sdata.shapes["cell_circles"]
    np.testing.assert_array_equal(circles.index.to_numpy(), table.obs["cell_id"].to_numpy())
    cells = pd.read_parquet(run_dir / "cells.parquet")
    np.testing.assert_allclose(table.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy())


def test_he_pixels_under_cells_are_nuclei(sdata):
    """Going through the spatialdata transformation: global (Xenium px) -> H&E px lands on haematoxylin."""
    from spatialdata.transformations import get_transformation

    table = sdata.tables["table"]
    global_xy = table.obsm["spatial"] / PIXEL_SIZE  # µm -> 'global' units
    matrix = get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    he_xy = (np.linalg.inv(matrix) @ np.column_stack([global_xy, np.ones(len(global_xy))]).T).T[:, :2]
    image = sdata.images["he"]["scale0"]["image"].data.compute()
    rgb = image[:, he_xy[:, 1].astype(int), he_xy[:, 0].astype(int)].astype(float)
    assert np.mean(rgb.mean(0) < 150) > 0.9


def test_um_per_unit_round_trips_zarr(sdata, tmp_path):
    import spatialdata

    assert sdata.attrs["sigmma"] == {"um_per_unit": {"global": PIXEL_SIZE}}
    sdata.write(tmp_path / "out.zarr")
    back = spatialdata.read_zarr(tmp_path / "out.zarr")
    assert back.attrs["sigmma"]["um_per_unit"]["global"] == PIXEL_SIZE
    assert "he" in back.images


def test_he_none_and_explicit(run_dir, tmp_path):
    without = sg.io.xenium(run_dir, he_image=None, cells_labels=False, nucleus_labels=False)
    assert "he" not in without.images
    # explicit files, from another folder, under another key
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(run_dir / HE, other / "slide.ome.tif")
    shutil.copy(run_dir / ALIGNMENT, other / "slide.csv")
    matrix = np.loadtxt(run_dir / ALIGNMENT, delimiter=",")
    sdata = sg.io.xenium(run_dir, he_image=other / "slide.ome.tif", he_alignment=matrix, he_key="HE")
    assert "HE" in sdata.images


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass the output folder"):
        sg.io.xenium(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Xenium output folder"):
        sg.io.xenium(tmp_path)


def test_he_without_alignment(run_dir):
    with pytest.raises(ValueError, match="without he_alignment; pass he_alignment="):
        sg.io.xenium(run_dir, he_image=run_dir / HE)


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the run folder whose alignment file each test may break."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b,c\nd,e,f\n0,0,1\n", "non-numeric"),
        ("1,0,5\n0,1,7\n", r"shape \(2, 3\), expected a 3x3"),
        ("1,2,3\n2,4,6\n0,0,1\n", "singular"),
        ("1,0,0\n0,1,0\n0.1,0,1\n", "not affine"),
        ("", "not a 3x3 numeric CSV"),
    ],
)
def test_malformed_alignment(run_copy, content, message):
    (run_copy / ALIGNMENT).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        sg.io.xenium(run_copy)
    assert "Xenium Explorer" in str(err.value)  # names the fix


def test_missing_alignment_file(run_copy):
    (run_copy / ALIGNMENT).unlink()
    with pytest.raises(FileNotFoundError, match="he_image=None"):
        sg.io.xenium(run_copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sg.io.xenium(run_copy, he_image=HE, he_alignment="missing.csv")


def test_inverted_alignment(run_dir):
    matrix = np.loadtxt(run_dir / ALIGNMENT, delimiter=",")
    with pytest.raises(ValueError, match="numpy.linalg.inv"):
        sg.io.xenium(run_dir, he_image=run_dir / HE, he_alignment=np.linalg.inv(matrix))


@pytest.mark.parametrize("recorded_pixel_size", [True, False])
def test_alignment_in_um_or_inverted_names_the_right_fix(run_dir, monkeypatch, recorded_pixel_size):
    """A matrix to µm (not Xenium pixels) gets the µm fix, not the advice to invert it (issue 10, defect 6)."""
    if not recorded_pixel_size:  # H&E without OME pixel size: decided on coverage alone
        monkeypatch.setattr("sigmma_sc.io._xenium._ome_pixel_size_um", lambda path: None)
    px = np.loadtxt(run_dir / ALIGNMENT, delimiter=",")
    um = np.diag([PIXEL_SIZE, PIXEL_SIZE, 1]) @ px  # H&E pixels -> µm
    with pytest.raises(ValueError, match="another reading") as err:
        sg.io.xenium(run_dir, he_image=run_dir / HE, he_alignment=um)
    assert (
        f"he_alignment=numpy.diag([1 / {PIXEL_SIZE:g}, 1 / {PIXEL_SIZE:g}, 1]) @ matrix (if it maps H&E pixels to µm)"
        in str(err.value)
    )
    if recorded_pixel_size:  # the OME pixel size rules out inverting
        assert "linalg.inv" not in str(err.value)
        with pytest.raises(ValueError, match=r"diag\(\[1 / 0.2125, 1 / 0.2125, 1\]\) @ numpy.linalg.inv") as err:
            sg.io.xenium(run_dir, he_image=run_dir / HE, he_alignment=np.linalg.inv(um))  # µm -> H&E pixels
        assert "implies" in str(err.value)  # says the scale is wrong
    fixed = np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1]) @ um  # the fix given works
    assert "he" in sg.io.xenium(run_dir, he_image=run_dir / HE, he_alignment=fixed).images


def test_placeholder_transcripts(run_dir):
    with pytest.raises(ValueError, match="transcripts=True"):
        sg.io.xenium(run_dir, transcripts=True)
