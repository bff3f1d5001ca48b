"""One helper writes and logs every output: the same words at every write site."""

from __future__ import annotations

import logging
import re

import anndata as ad
import numpy as np
import pytest

import sigmma_sc as sg
from sigmma_sc._utils._write import added_message, save_output, save_outputs, save_record

WRITE_LOGGER = "sigmma_sc._utils._write"


def _added(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WRITE_LOGGER and r.levelno == logging.INFO]


def test_save_output_writes_and_logs_one_line(caplog):
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    with caplog.at_level(logging.INFO, logger=WRITE_LOGGER):
        save_output(adata, "obsm", "X_a", np.ones((3, 4)), table="table", what="cell embeddings")
        save_outputs(adata, "obs", {"a": [1, 2, 3], "b": ["x", "y", "z"]}, table="table")
        save_record(adata, "run", "step", {"n": 1}, table="table")
    assert adata.obsm["X_a"].shape == (3, 4)
    assert list(adata.obs["b"]) == ["x", "y", "z"]
    assert adata.uns["run"]["step"] == {"n": 1}
    assert _added(caplog) == [
        "Added `.obsm['X_a']` to table 'table' (cell embeddings).",
        "Added `.obs['a', 'b']` to table 'table'.",
        "Added `.uns['run']['step']` to table 'table' (step record).",
    ]
    assert (
        added_message("shapes", ["he_sigmma_tiles"], what="tiles") == "Added `sdata.shapes['he_sigmma_tiles']` (tiles)."
    )


def test_save_output_rejects_an_unknown_field():
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="not a SpatialData element type"):
        save_output(adata, "obsx", "a", [1, 2])
    with pytest.raises(TypeError, match="has no 'shapes'"):
        save_output(adata, "shapes", "a", None)
    assert "a" not in adata.obs


def _logged_keys(messages: list[str]) -> set[str]:
    """Every key named in the ``Added `...[...]` `` lines."""
    out: set[str] = set()
    for m in messages:
        field = re.match(r"Added `[^`]*?\[(.*?)\](?:\[.*?\])?`", m)
        assert field, m
        out |= set(re.findall(r"'([^']+)'", field.group(1)))
    return out


def test_every_key_tile_and_cell_graph_write_is_logged(section, caplog):
    """Each key in the records of ``pp.tile`` / ``pp.cell_graph`` (what they wrote) has its INFO line."""
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.pp.tile(section, image_key="he", tile_size_um=16.0, min_cells=1, key_added="t")
        sg.pp.cell_graph(section, tile_key="t_tiles", n_comps=5, key_added="g")
    cells = section.tables["table"]
    tile_keys = cells.uns["t"]["tile"]["keys"]
    graph_keys = cells.uns["g"]["cell_graph"]["keys"]
    written = {
        tile_keys["tile_table"], tile_keys["shapes"], tile_keys["cell_tile"], tile_keys["cell_spatial"],
        *tile_keys["cell_blocks"].values(), graph_keys["connectivities"], graph_keys["distances"],
        graph_keys["features"], "t", "g",
    }  # fmt: skip
    logged = _logged_keys(_added(caplog))
    assert written <= logged, written - logged
    assert all(k in section.shapes or k in section.tables or k in cells.obs or k in cells.obsm or k in cells.obsp
               or k in cells.uns for k in logged)  # fmt: skip


def test_stain_normalize_logs_its_image(section, caplog):
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.pp.stain_normalize(section, image_key="he", key_added="he_norm")
    assert "he_norm" in section.images
    assert _added(caplog) == ["Added `sdata.images['he_norm']` (Macenko-normalised 'he')."]
