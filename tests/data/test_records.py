"""Typed records resolved once, the array-level bundle constructor and the tiling geometry shared by every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sigmma_sc as sg
from sigmma_sc._constants import GRID, Keys
from sigmma_sc.data._build import build_bundle
from sigmma_sc.data._geometry import block_ids, cell_blocks, grid_cells, tile_of_points
from sigmma_sc.data._records import CellGraph, EmbeddingRun, Tiling
from sigmma_sc.nn._edges import block_ids as torch_block_ids


@pytest.fixture
def graphed(section):
    sg.pp.tile(section, image_key="he", tile_size_um=16.0, pixel_size_um=0.25, min_tissue_fraction=0.0)
    sg.pp.cell_graph(section, n_comps=5)
    return section


def test_tiling_and_graph_resolve_what_tile_and_cell_graph_wrote(graphed):
    tiling = Tiling.resolve(graphed)
    tiles = graphed.tables[Keys.TILE_TABLE]
    assert tiling.tiles is tiles
    assert tiling.n_tiles == tiles.n_obs
    assert tiling.params == sg.data.tile_params(graphed)
    assert np.array_equal(tiling.origins(), tiles.obs[[Keys.TILE_X0, Keys.TILE_Y0]].to_numpy())
    assert list(tiling.split_codes()) == [("train", "val", "test").index(s) for s in tiles.obs[Keys.SPLIT]]
    graph = CellGraph.resolve(graphed, tiling)
    cells = graphed.tables["table"]
    assert graph.cells is cells
    assert graph.n_neighs == 6
    assert np.array_equal(graph.features(), cells.obsm[graph.features_key])
    micro, meso = graph.blocks()
    assert np.array_equal(micro, cells.obs["sigmma_micro_block"])
    assert np.array_equal(meso, cells.obs["sigmma_meso_block"])


def test_records_raise_the_errors_that_name_the_fix(graphed):
    with pytest.raises(KeyError, match=r"No tile table 'other_tiles'.*run `sg.pp.tile` first.*Tile tables here"):
        Tiling.resolve(graphed, "other_tiles")
    with pytest.raises(KeyError, match="is not a sigmma tile table"):
        Tiling.resolve(graphed, "table")
    tiling = Tiling.resolve(graphed)
    with pytest.raises(KeyError, match="has no SIGMMA cell graph 'nope'"):
        CellGraph.resolve(graphed, tiling, graph_key="nope")
    sg.pp.tile(graphed, image_key="he", tile_size_um=24.0, pixel_size_um=0.25, min_tissue_fraction=0.0)
    with pytest.raises(ValueError, match="earlier tiling"):  # stale: pp.tile ran again after pp.cell_graph
        CellGraph.resolve(graphed, Tiling.resolve(graphed))


def test_embedding_run_keys_are_those_written(graphed):
    tiles = graphed.tables[Keys.TILE_TABLE]
    run = EmbeddingRun.resolve(tiles, "sigmma")
    assert run.keys["image"] == {}
    assert run.scales == ()
    tiles.obsm["X_sigmma_micro_image"] = np.zeros((tiles.n_obs, 2))
    run = EmbeddingRun.resolve(tiles, "sigmma")
    assert run.keys["image"] == {"micro": "X_sigmma_micro_image"}
    assert run.scales == ("micro",)


def test_grid_assignment_ranks_kept_squares_and_blocks_follow_the_tile():
    xy = np.array([[0.5, 0.5], [3.9, 0.1], [4.1, 0.1], [0.1, 4.5], [9.0, 9.0]])
    row, col, grid_id, counts = grid_cells(xy, np.array([True, True, True, True, False]), (0.0, 0.0), 4.0, (2, 2))
    assert list(grid_id) == [0, 0, 1, 2, -1]
    assert list(counts) == [2, 1, 1, 0]
    tile = tile_of_points(grid_id, np.array([0, 2]), 4)  # square 1 dropped
    assert list(tile) == [0, 0, -1, 1, -1]
    blocks = cell_blocks(xy, row, col, (0.0, 0.0), 4.0, tile)
    assert list(blocks["micro"]) == [0, 3, -1, 0, -1]
    assert list(blocks["meso"]) == [0, 1, -1, 0, -1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_and_torch_block_ids_agree_off_the_float_precision_of_borders(seed):
    """The tiling's block ids (numpy, from coordinates) and the model's (torch, from bundle positions) are one map.

    A point closer to a block border than float32 resolves (~1e-7 of the tile side) may fall on either side:
    the model's positions are float32 fractions of the tile side.
    """
    rng = np.random.default_rng(seed)
    size, origin, shape = rng.uniform(1, 300), tuple(rng.uniform(-1000, 1000, 2)), (5, 7)
    xy = np.c_[origin[0] + rng.uniform(0, shape[1], 50_000) * size, origin[1] + rng.uniform(0, shape[0], 50_000) * size]
    row, col, grid_id, _ = grid_cells(xy, np.ones(len(xy), bool), origin, size, shape)
    tile = tile_of_points(grid_id, np.arange(shape[0] * shape[1]), shape[0] * shape[1])
    frac = (xy - np.c_[origin[0] + col * size, origin[1] + row * size]) / size
    pos = torch.from_numpy(np.clip(frac, 0, np.nextafter(1.0, 0)).astype(np.float32))
    for g in (GRID["micro"], GRID["meso"]):
        off_border = (np.abs(frac * g - np.round(frac * g)) > 1e-5).all(1)
        ours = block_ids(xy, row, col, origin, size, g)
        model = torch_block_ids(pos, torch.from_numpy(tile), g).numpy() - tile * g * g
        assert off_border.mean() > 0.99
        assert np.array_equal(ours[off_border], model[off_border])


def test_unshifted_grid_bundle_is_build_bundle(graphed):
    """Shifted embedding builds its bundles from arrays; under the section's own grid that is build_bundle's."""
    from sigmma_sc.tl._shifts import _ShiftedGrids

    tiling = Tiling.resolve(graphed)
    ours, rows = build_bundle(graphed, require_image_features=False)
    origin, shifted, shifted_rows = _ShiftedGrids(CellGraph.resolve(graphed, tiling)).bundle(0.0, 0.0)
    assert origin == tiling.grid_origin
    assert np.array_equal(rows, shifted_rows)
    for name in ("x", "pos", "cell_ptr", "edge_index", "cand_meso", "cand_macro"):
        assert torch.equal(getattr(ours, name), getattr(shifted, name)), name
