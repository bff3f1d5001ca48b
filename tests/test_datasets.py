"""Synthetic Xenium folder: format, registration, ground truth, determinism."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

import sigmma_sc as sg

PIXEL_SIZE = 0.2125
N_CELLS = 600


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return sg.datasets.synthetic_xenium(tmp_path_factory.mktemp("xenium") / "run", n_cells=N_CELLS, n_genes=60, seed=0)


@pytest.fixture(scope="module")
def sdata_raw(run_dir):
    import spatialdata_io

    return spatialdata_io.xenium(run_dir)  # the reader unchanged, with its defaults: every element


@pytest.fixture(scope="module")
def contact_dir(tmp_path_factory):
    return sg.datasets.synthetic_xenium(
        tmp_path_factory.mktemp("xenium") / "contact", n_cells=N_CELLS, n_genes=60, seed=0, transcripts=False,
        contact_program=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def truth(run_dir):
    return pd.read_parquet(run_dir / "sigmma_truth.parquet")


def test_folder_layout(run_dir):
    expected = {
        "experiment.xenium",
        "cells.parquet",
        "cells.zarr.zip",
        "cell_feature_matrix.h5",
        "cell_boundaries.parquet",
        "nucleus_boundaries.parquet",
        "transcripts.parquet",
        "morphology_focus",
        "sigmma_synthetic_he_image.ome.tif",
        "sigmma_synthetic_he_imagealignment.csv",
        "sigmma_truth.parquet",
    }
    assert {p.name for p in run_dir.iterdir()} == expected
    specs = json.loads((run_dir / "experiment.xenium").read_text())
    assert specs["pixel_size"] == PIXEL_SIZE
    assert specs["analysis_sw_version"].startswith("xenium-3.")
    assert specs["num_cells"] == N_CELLS


def test_spatialdata_io_reads_folder(sdata_raw, run_dir):
    assert {"morphology_focus", "he_image"} <= set(sdata_raw.images)
    assert {"cell_labels", "nucleus_labels"} <= set(sdata_raw.labels)
    assert {"cell_boundaries", "nucleus_boundaries"} <= set(sdata_raw.shapes)
    assert "transcripts" in sdata_raw.points
    table = sdata_raw.tables["table"]
    assert table.shape == (N_CELLS, 60)
    assert {"CXCL2", "CXCL6", "EPCAM", "PTPRC"} <= set(table.var_names)
    cells = pd.read_parquet(run_dir / "cells.parquet")
    np.testing.assert_array_equal(table.obs["cell_id"].to_numpy(), cells["cell_id"].to_numpy())
    np.testing.assert_array_equal(sdata_raw.shapes["cell_boundaries"].index.to_numpy(), cells["cell_id"].to_numpy())
    # counts in the matrix agree with cells.parquet and with the transcripts (qv >= 20, assigned)
    counts = np.asarray(table.X.sum(1)).ravel()
    np.testing.assert_array_equal(counts, cells["transcript_counts"].to_numpy())
    assert 40 < np.median(counts) < 300
    tx = pd.read_parquet(run_dir / "transcripts.parquet", columns=["cell_id", "feature_name", "qv"])
    assigned = tx[(tx.cell_id != "UNASSIGNED") & (tx.qv >= 20) & ~tx.feature_name.str.startswith("NegControl")]
    assert len(assigned) == counts.sum()


def test_cell_density_is_realistic(run_dir):
    specs = json.loads((run_dir / "experiment.xenium").read_text())
    width, height = specs["sigmma_synthetic"]["section_um"]
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert cells.x_centroid.between(0, width).all()
    assert cells.y_centroid.between(0, height).all()
    area_per_cell = width * height / N_CELLS  # includes the blank margin and holes
    assert 100 < area_per_cell < 300
    assert cells.cell_area.between(15, 400).all()


def test_centroids_match_dapi_nuclei(run_dir):
    dapi = tifffile.imread(run_dir / "morphology_focus" / "morphology_focus_0000.ome.tif")
    cells = pd.read_parquet(run_dir / "cells.parquet")
    rows = (cells.y_centroid.to_numpy() / PIXEL_SIZE).astype(int)
    cols = (cells.x_centroid.to_numpy() / PIXEL_SIZE).astype(int)
    at_cells = dapi[rows, cols].astype(float)
    background = np.median(dapi)
    assert np.mean(at_cells > 4 * background) > 0.95
    # and the nucleus label under each centroid is that cell's
    import zarr

    group = zarr.open_group(zarr.storage.ZipStore(run_dir / "cells.zarr.zip", read_only=True), mode="r")
    labels = group["masks/0"][...]
    assert np.mean(labels[rows, cols] == np.arange(1, N_CELLS + 1)) > 0.9


def test_he_alignment_registers_nuclei(run_dir):
    matrix = np.loadtxt(run_dir / "sigmma_synthetic_he_imagealignment.csv", delimiter=",")
    assert matrix.shape == (3, 3)
    assert not np.allclose(matrix, np.eye(3))
    linear = matrix[:2, :2]
    scale = np.sqrt(abs(np.linalg.det(linear)))
    assert scale == pytest.approx(0.5 / PIXEL_SIZE)  # H&E at 0.5 µm per pixel
    assert abs(linear[1, 0]) > 1e-3  # a rotation
    assert np.abs(matrix[:2, 2]).max() > 1  # a translation

    he = tifffile.imread(run_dir / "sigmma_synthetic_he_image.ome.tif")
    assert he.dtype == np.uint8
    assert he.shape[2] == 3
    cells = pd.read_parquet(run_dir / "cells.parquet")
    xenium_px = np.column_stack([cells.x_centroid / PIXEL_SIZE, cells.y_centroid / PIXEL_SIZE, np.ones(len(cells))])
    he_px = np.linalg.solve(matrix, xenium_px.T).T  # the matrix maps H&E pixels -> Xenium pixels
    rows, cols = he_px[:, 1].astype(int), he_px[:, 0].astype(int)
    brightness = he[rows, cols].astype(float).mean(1)
    assert np.mean(brightness < 150) > 0.9  # haematoxylin: dark purple nuclei
    # a wrong registration (identity scaling) does not land on nuclei
    wrong = he[
        np.clip(xenium_px[:, 1].astype(int) // 3, 0, he.shape[0] - 1),
        np.clip(xenium_px[:, 0].astype(int) // 3, 0, he.shape[1] - 1),
    ]
    assert np.mean(wrong.astype(float).mean(1) < 150) < 0.8
    # blank margin: the image border is background (white)
    assert he[:5].mean() > 230
    assert he[-5:].mean() > 230


def test_he_is_tiled_pyramid(run_dir):
    with tifffile.TiffFile(run_dir / "sigmma_synthetic_he_image.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.keyframe.is_tiled
        assert len(series.levels) >= 2
        assert series.levels[1].shape[0] == -(-series.levels[0].shape[0] // 2)


def test_chemokines_mark_hypoxic_tumour_cells(sdata_raw, truth):
    table = sdata_raw.tables["table"]
    assert (truth["cell_id"].to_numpy() == table.obs["cell_id"].to_numpy()).all()
    high = truth["chemokine_high"].to_numpy()
    assert high.sum() >= 10
    assert (truth.loc[high, "cell_type"] == "tumour").all()
    assert (truth.loc[high, "domain"] == "tumour_nest_hypoxic").all()
    for gene in ("CXCL2", "CXCL6"):
        x = np.asarray(table[:, gene].X.todense()).ravel()
        assert x[high].mean() > 3.0
        assert x[~high].mean() < 0.3
        other_tumour = ~high & (truth["cell_type"] == "tumour").to_numpy()
        assert x[other_tumour].mean() < 0.3


def test_contact_programme_marks_tumour_cells_touching_t_cells(contact_dir):
    from scipy.spatial import distance_matrix

    run_dir = contact_dir
    truth = pd.read_parquet(run_dir / "sigmma_truth.parquet")
    sdata_raw = sg.io.xenium(run_dir)

    cells = pd.read_parquet(run_dir / "cells.parquet")
    xy = cells[["x_centroid", "y_centroid"]].to_numpy()
    tumour = (truth["cell_type"] == "tumour").to_numpy()
    t_cell = (truth["cell_type"] == "T_cell").to_numpy()
    near = (distance_matrix(xy[tumour], xy[t_cell]) < 15.0).any(1)  # brute force: centroids closer than 15 µm
    expected = np.zeros(len(truth), dtype=bool)
    expected[np.flatnonzero(tumour)[near]] = True
    contact = truth["contact"].to_numpy()
    np.testing.assert_array_equal(contact, expected)
    assert 10 <= contact.sum() < tumour.sum() / 2  # a cell-scale programme, not the whole tumour
    table = sdata_raw.tables["table"]
    record = json.loads((run_dir / "experiment.xenium").read_text())["sigmma_synthetic"]["contact_program"]
    assert record["genes"] == ["CXCL10", "CD274", "IDO1"]
    assert (record["receiver"], record["sender"], record["distance_um"]) == ("tumour", "T_cell", 15.0)
    assert record["n_contacted"] == contact.sum()
    for gene in record["genes"]:
        x = np.asarray(table[:, gene].X.todense()).ravel()
        assert x[contact].mean() > 3.0, gene
        assert x[tumour & ~contact].mean() < 0.2, gene  # the same cell type without contact: background
        assert x[~tumour].mean() < 0.2, gene
    assert table.uns["sigmma_synthetic"]["contact_program"]["genes"] == record["genes"]


def test_contact_programme_shows_in_the_he(contact_dir, run_dir, truth):
    off, run_dir = run_dir, contact_dir  # the same section (seed) without and with the programme
    truth_off, truth = truth, pd.read_parquet(contact_dir / "sigmma_truth.parquet")
    assert not truth_off["contact"].any()  # off by default
    assert "CXCL10" not in sg.io.xenium(off).tables["table"].var_names
    pd.testing.assert_frame_equal(truth_off.drop(columns="contact"), truth.drop(columns="contact"))
    cells = pd.read_parquet(run_dir / "cells.parquet")
    matrix = np.loadtxt(run_dir / "sigmma_synthetic_he_imagealignment.csv", delimiter=",")
    np.testing.assert_array_equal(matrix, np.loadtxt(off / "sigmma_synthetic_he_imagealignment.csv", delimiter=","))
    he_on = tifffile.imread(run_dir / "sigmma_synthetic_he_image.ome.tif").astype(float).mean(2)
    he_off = tifffile.imread(off / "sigmma_synthetic_he_image.ome.tif").astype(float).mean(2)
    px = np.linalg.solve(matrix, np.column_stack([cells.x_centroid / PIXEL_SIZE, cells.y_centroid / PIXEL_SIZE,
                                                  np.ones(len(cells))]).T).T  # fmt: skip
    r = 12  # 6 µm at 0.5 µm/px: a tumour nucleus is ~4.6 µm, contacted ones ~6.2 µm

    def dark_pixels(img, i):
        row, col = int(px[i, 1]), int(px[i, 0])
        return int((img[row - r : row + r + 1, col - r : col + r + 1] < 150).sum())

    contact = truth["contact"].to_numpy()
    tumour = (truth["cell_type"] == "tumour").to_numpy()
    on = np.array([dark_pixels(he_on, i) - dark_pixels(he_off, i) for i in np.flatnonzero(contact)])
    rest = np.array([dark_pixels(he_on, i) - dark_pixels(he_off, i) for i in np.flatnonzero(tumour & ~contact)])
    assert np.median(on) > 40  # larger, darker nuclei
    assert np.mean(on > 0) > 0.9
    assert np.median(rest) == 0  # untouched tumour cells look the same


def test_cell_types_and_domains(truth, sdata_raw):
    assert set(truth["cell_type"].cat.categories) == {
        "tumour",
        "fibroblast",
        "T_cell",
        "B_cell",
        "macrophage",
        "endothelial",
        "pericyte",
    }
    assert {"stroma", "tumour_nest", "tumour_nest_hypoxic"} <= set(truth["domain"])
    assert set(truth["region"]) == {"tumour", "stroma"}
    table = sdata_raw.tables["table"]
    epcam = np.asarray(table[:, "EPCAM"].X.todense()).ravel()
    is_tumour = (truth["cell_type"] == "tumour").to_numpy()
    assert epcam[is_tumour].mean() > 5 * epcam[~is_tumour].mean()


def test_determinism(tmp_path, run_dir):
    again = sg.datasets.synthetic_xenium(
        tmp_path / "a", n_cells=N_CELLS, n_genes=60, seed=0, he=False, transcripts=False
    )
    other = sg.datasets.synthetic_xenium(
        tmp_path / "b", n_cells=N_CELLS, n_genes=60, seed=1, he=False, transcripts=False
    )
    ref = pd.read_parquet(run_dir / "cells.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(again / "cells.parquet"), ref)
    assert not np.allclose(pd.read_parquet(other / "cells.parquet").x_centroid, ref.x_centroid)
    import h5py

    def matrix(folder):
        with h5py.File(folder / "cell_feature_matrix.h5") as f:
            return {k: f["matrix"][k][...] for k in ("data", "indices", "indptr", "barcodes")}

    m_ref, m_again, m_other = matrix(run_dir), matrix(again), matrix(other)
    for key in m_ref:
        np.testing.assert_array_equal(m_again[key], m_ref[key])
    assert len(m_other["data"]) != len(m_ref["data"]) or not np.array_equal(m_other["data"], m_ref["data"])


def test_options_and_overwrite(tmp_path):
    import spatialdata_io

    out = tmp_path / "run"
    sg.datasets.synthetic_xenium(
        out, n_cells=200, n_genes=30, he=False, transcripts=False, morphology=False, labels=False
    )
    assert len(pd.read_parquet(out / "transcripts.parquet")) == 1  # placeholder for the reader
    assert not list(out.glob("*he_image.ome.tif"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sg.datasets.synthetic_xenium(out, n_cells=200)
    specs = json.loads((out / "experiment.xenium").read_text())
    assert specs["sigmma_synthetic"]["morphology"] == "blank"
    assert specs["sigmma_synthetic"]["labels"] == "blank"
    # the blank placeholders still read with the reader's defaults, and sg.io.xenium skips them
    sdata = spatialdata_io.xenium(out)
    assert int(sdata.labels["cell_labels"]["scale0"]["image"].max()) == 0
    assert int(sdata.images["morphology_focus"]["scale0"]["image"].max()) == 0
    ours = sg.io.xenium(out)
    assert not ours.labels
    assert not ours.images
    # labels without the DAPI image
    sg.datasets.synthetic_xenium(out, n_cells=200, n_genes=30, he=False, morphology=False, overwrite=True)
    sdata = spatialdata_io.xenium(out)
    assert int(sdata.labels["nucleus_labels"]["scale0"]["image"].max()) == 200
    assert int(sdata.images["morphology_focus"]["scale0"]["image"].max()) == 0
    with pytest.raises(ValueError, match="n_genes"):
        sg.datasets.synthetic_xenium(tmp_path / "small", n_cells=200, n_genes=5)
    with pytest.raises(ValueError, match="n_cells"):
        sg.datasets.synthetic_xenium(tmp_path / "small", n_cells=0)


def test_demo_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMMA_SC_CACHE", str(tmp_path))
    sdata = sg.datasets.demo(n_cells=300, seed=2)
    folder = tmp_path / "demo_300_2"
    assert (folder / "experiment.xenium").exists()
    assert {"he", "morphology_focus"} <= set(sdata.images)
    assert sdata.tables["table"].n_obs == 300
    assert sdata.attrs["sigmma"]["um_per_unit"]["global"] == PIXEL_SIZE
    stamp = (folder / "cells.parquet").stat().st_mtime_ns
    sg.datasets.demo(n_cells=300, seed=2)  # read from the cache, not rewritten
    assert (folder / "cells.parquet").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_large_section_is_multiscale(tmp_path):
    from spatialdata.models import get_model
    from xarray import DataTree

    out = sg.datasets.synthetic_xenium(tmp_path / "big", n_cells=20_000, transcripts=False)
    with tifffile.TiffFile(out / "sigmma_synthetic_he_image.ome.tif") as tif:
        assert len(tif.series[0].levels) >= 3
    sdata = sg.io.xenium(out)
    he = sdata.images["he"]
    assert isinstance(he, DataTree)
    assert len(he.children) >= 3
    get_model(he)().validate(he)
    assert he["scale0"]["image"].data.chunksize[1] <= 1024  # lazy, tile-wise


@pytest.mark.data
def test_xenium_bonemarrow_reads_the_real_section():
    from conftest import SHARED_DATA

    from sigmma_sc._constants import Keys

    sdata = sg.datasets.xenium_bonemarrow(SHARED_DATA / "xenium-bonemarrow", n_levels=3)
    cells = sdata.tables["table"]
    assert cells.shape == (84_518, 477)
    assert cells.obs["celldega_cluster"].nunique() == 35
    assert sdata.attrs[Keys.UNS]["um_per_unit"]["global"] == pytest.approx(0.2125)
    dapi = sdata.images["dapi"]
    assert dapi["scale0"]["image"].shape == (1, 8571, 24134)  # full-resolution DeepZoom level
    assert dapi["scale0"]["image"].data.chunksize == (1, 512, 512)  # lazy, one JPEG per chunk
    xy = np.stack([sdata.shapes["cell_circles"].geometry.x, sdata.shapes["cell_circles"].geometry.y], 1)
    assert (xy.min(0) >= 0).all()
    assert (xy.max(0) <= [24134, 8571]).all()  # centroids in DAPI pixels


def test_xenium_bonemarrow_explains_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="celldega_Xenium_data_human-bone-and-bone-marrow"):
        sg.datasets.xenium_bonemarrow(tmp_path)


@pytest.fixture(scope="module")
def arrangement():
    return sg.datasets.synthetic_arrangement(n_tiles_side=4, cells_per_tile=64, n_genes=30, seed=3)


def test_arrangement_section_differs_only_in_arrangement(arrangement):
    from scipy.stats import spearmanr

    cells = arrangement.tables["table"]
    obs = cells.obs
    uns = cells.uns["sigmma_arrangement"]
    score, param = np.asarray(uns["mixing_score"]), np.asarray(uns["mixing_param"])
    # the same composition in every tile: 64 cells, half tumour
    counts = pd.crosstab(obs["arrangement_tile"], obs["cell_type"])
    assert (counts["tumour"] == 32).all()
    assert (counts["T_cell"] == 32).all()
    # the arrangement varies from segregated to intermixed and follows the mixing parameter
    assert score.min() < 0.6
    assert score.max() > 0.85
    assert spearmanr(param, score).statistic > 0.5  # 64 cells per tile: a noisy but clear relation
    # expression is drawn from the type alone: within a type, a cell's library does not follow its tile's mixing
    lib = np.asarray(cells.X.sum(1)).ravel()
    for t in ("tumour", "T_cell"):
        m = (obs["cell_type"] == t).to_numpy()
        per_tile = pd.Series(lib[m]).groupby(obs["arrangement_tile"].to_numpy()[m]).mean()
        assert abs(spearmanr(per_tile.to_numpy(), score[per_tile.index]).statistic) < 0.6
    # sg.pp.tile with the same tile size finds the generating tiles: exactly 64 cells each
    sg.pp.tile(arrangement, image_key="he", tile_size_um=128.0)
    assert (arrangement.tables["sigmma_tiles"].obs["n_cells"] == 64).all()
    per_tile = pd.crosstab(obs["sigmma_tile"], obs["arrangement_tile"])
    assert ((per_tile > 0).sum(1) == 1).all()


def test_arrangement_is_visible_in_the_he(arrangement):
    """Tumour and T-cell nuclei look different, and segregated tiles have patchier nuclei than intermixed ones."""
    from scipy.stats import spearmanr

    cells = arrangement.tables["table"]
    img = np.asarray(arrangement.images["he"]["scale0"]["image"].data if hasattr(arrangement.images["he"], "keys")
                     else arrangement.images["he"].data)  # fmt: skip
    dark = 255.0 - img.astype(np.float32).mean(0)  # (y, x) darkness
    xy = np.asarray(cells.obsm["spatial"])
    px = (xy / 0.5).astype(int)
    at = dark[px[:, 1], px[:, 0]]
    tumour = (cells.obs["cell_type"] == "tumour").to_numpy()
    assert at[~tumour].mean() > at[tumour].mean() + 10  # small dark T-cell nuclei, pale vesicular tumour nuclei
    # per tile: how unevenly the darkest pixels (T-cell nuclei) fill its 32 µm blocks falls with the mixing (the
    # mean darkness of a block does not tell: pale large tumour nuclei and small dark T-cell nuclei even out)
    score = np.asarray(cells.uns["sigmma_arrangement"]["mixing_score"])
    darkest = dark > np.percentile(dark, 98)
    spread = []
    for t in range(16):
        r, c = divmod(t, 4)
        tile = darkest[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256].astype(np.float32)
        spread.append(tile.reshape(4, 64, 4, 64).mean((1, 3)).std())
    assert spearmanr(spread, score).statistic < -0.5


def test_arrangement_arguments():
    with pytest.raises(ValueError, match="n_tiles_side"):
        sg.datasets.synthetic_arrangement(n_tiles_side=1)
    with pytest.raises(ValueError, match="cells_per_tile"):
        sg.datasets.synthetic_arrangement(cells_per_tile=3)
