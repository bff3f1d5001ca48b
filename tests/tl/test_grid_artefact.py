"""``sg.metrics.grid_artefact``: neighbouring cells' embeddings across block borders vs inside one block."""

from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import GRID, SCALES, Keys


@pytest.fixture(scope="module")
def _tiled():
    sdata = make_section(n_cells=3000, image_px=256, rotation_deg=8.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=32.0, pixel_size_um=0.25)
    return sdata


@pytest.fixture
def tiled(_tiled):
    import spatialdata as sd

    return sd.deepcopy(_tiled)


def _write(sdata, name: str, z: dict[str, np.ndarray]) -> str:
    cells = sdata.tables["table"]
    for s in SCALES:
        cells.obsm[f"X_{name}_{s}"] = z[s]
    return f"X_{name}_{{scale}}"


def _smooth(xy: np.ndarray, dim: int = 8) -> np.ndarray:
    """An embedding that varies smoothly with position (tissue structure, no grid)."""
    rng = np.random.default_rng(1)
    freq = rng.normal(size=(2, dim)) / 20.0
    return np.c_[np.cos(xy @ freq), np.sin(xy @ freq)] + 3.0


def test_a_blockwise_embedding_shows_the_grid_and_a_smooth_one_does_not(tiled):
    cells = tiled.tables["table"]
    params = tiled.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    xy = np.asarray(cells.obsm[Keys.CELL_SPATIAL], dtype=np.float64)
    smooth = _smooth(xy)
    rng = np.random.default_rng(0)
    blocky = {}
    for s in SCALES:  # each block of the scale adds its own random offset: the model's grid artefact
        side = float(params["tile_size"]) / GRID[s]
        ij = np.floor((xy - np.asarray(params["grid_origin"])) / side).astype(np.int64)
        _, block = np.unique(ij, axis=0, return_inverse=True)
        blocky[s] = smooth + 0.3 * rng.normal(size=(block.max() + 1, smooth.shape[1]))[block.ravel()]
    good = sg.metrics.grid_artefact(tiled, use_rep=_write(tiled, "smooth", dict.fromkeys(SCALES, smooth)))
    bad = sg.metrics.grid_artefact(tiled, use_rep=_write(tiled, "blocky", blocky))
    assert list(good.index) == list(SCALES)
    assert (good["ratio"] < 1.1).all(), good
    assert (good["ratio_control"] < 1.1).all(), good
    assert (bad["ratio"] > 2).all(), bad
    assert (bad["excess"] > 2).all(), bad
    assert (bad["n_across"] > 30).all()
    assert (bad["n_inside"] > 30).all()
    # the control grid, offset from the blocks, sees no excess of its own
    assert (bad["ratio_control"] < bad["ratio"] / 2).all(), bad


def test_grid_artefact_checks_its_inputs(tiled):
    with pytest.raises(KeyError, match="run `sg.tl.embed` first"):
        sg.metrics.grid_artefact(tiled)
    name = _write(tiled, "z", dict.fromkeys(SCALES, np.ones((tiled.tables["table"].n_obs, 4))))
    with pytest.raises(ValueError, match="`closest` is a fraction"):
        sg.metrics.grid_artefact(tiled, use_rep=name, closest=0)
    with pytest.raises(ValueError, match="`scale` must be among"):
        sg.metrics.grid_artefact(tiled, use_rep=name, scale="nano")
    with pytest.raises(ValueError, match="`control_offset`"):
        sg.metrics.grid_artefact(tiled, use_rep=name, control_offset=1.0)
    with pytest.raises(KeyError, match="run `sg.pp.tile` first"):
        sg.metrics.grid_artefact(make_section(n_cells=20, image_px=32))
