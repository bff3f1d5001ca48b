"""``sg.tl.train_sigmma`` checks every cheap thing before the slow featurization (issue 10, defect 6)."""

from __future__ import annotations

import logging

import pytest
from _section import make_section

import sigmma_sc as sg
import sigmma_sc.tl._train as train_module
from sigmma_sc._constants import Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def _graphed():
    sdata = make_section(n_cells=700, image_px=200, rotation_deg=8.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    return sdata


@pytest.fixture
def graphed(_graphed):
    import spatialdata as sd

    sdata = sd.deepcopy(_graphed)
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    return sdata


@pytest.fixture
def no_featurize(monkeypatch):
    """Fail the test if train_sigmma reaches the featurization."""

    def refuse(*args, **kwargs):
        raise AssertionError("featurize ran before the check")

    monkeypatch.setattr(train_module, "featurize", refuse)


def test_stale_graph_after_retiling(graphed, no_featurize):
    sg.pp.tile(graphed, image_key="he", tile_size_um=10.0, pixel_size_um=0.25)
    with pytest.raises(ValueError, match=r"earlier tiling.*run `sg.pp.cell_graph` again"):
        sg.tl.train_sigmma(graphed, epochs=1, **TINY)
    with pytest.raises(ValueError, match="run `sg.pp.cell_graph` again"):  # every graph consumer says so
        sg.data.build_bundle(graphed, require_image_features=False)
    sg.pp.cell_graph(graphed, n_comps=8)  # the fix works
    bundle, _ = sg.data.build_bundle(graphed, require_image_features=False)
    assert bundle.n_tiles == graphed.tables[Keys.TILE_TABLE].n_obs


def test_stale_graph_without_recorded_tiling(graphed):
    """Graphs written before the tiling was recorded: the cross-tile edges still name the fix."""
    cells = graphed.tables["table"]
    del cells.uns["sigmma"]["cell_graph"]["tiling"]
    sg.data.build_bundle(graphed, require_image_features=False)  # current graph: fine
    sg.pp.tile(graphed, image_key="he", tile_size_um=10.0, pixel_size_um=0.25)
    cells.uns["sigmma"]["cell_graph"].pop("tiling", None)
    with pytest.raises(ValueError, match="run `sg.pp.cell_graph` again"):
        sg.data.build_bundle(graphed, require_image_features=False)


def test_same_tiling_again_keeps_the_graph(graphed):
    sg.pp.tile(graphed, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)  # identical tiles: graph still valid
    sg.data.build_bundle(graphed, require_image_features=False)


def test_missing_graph_before_featurization(no_featurize):
    sdata = make_section(n_cells=300, image_px=100)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    with pytest.raises(KeyError, match="run `sg.pp.cell_graph` first"):
        sg.tl.train_sigmma(sdata, epochs=1, **TINY)


def test_one_tile_before_featurization(no_featurize):
    sdata = make_section(n_cells=100, image_px=64)
    sg.pp.tile(sdata, image_key="he", tile_size_um=40.0, pixel_size_um=1.0)
    sg.pp.cell_graph(sdata, n_comps=4)
    with pytest.raises(ValueError, match=r"Only \d training tile.*smaller `tile_size_um`"):
        sg.tl.train_sigmma(sdata, epochs=1, **TINY)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"hiden": 8}, TypeError, "unknown setting `hiden`; did you mean `hidden`"),
        ({"n_features": 8}, TypeError, "unknown setting `n_features`"),
        ({"dropout": 2.0}, ValueError, "dropout"),
        ({"preset": "fast"}, ValueError, "preset"),
        ({"epochs": 0}, ValueError, "epochs"),
    ],
)
def test_invalid_settings_before_featurization(graphed, no_featurize, config, error, match):
    kwargs = TINY | {"epochs": 1} | config
    with pytest.raises(error, match=match):
        sg.tl.train_sigmma(graphed, **kwargs)


def test_resume_without_checkpoint_dir(graphed, no_featurize):
    with pytest.raises(ValueError, match="`resume=True` needs `checkpoint_dir`"):
        sg.tl.train_sigmma(graphed, epochs=1, resume=True, **TINY)


def test_corrupt_checkpoint_before_featurization(graphed, no_featurize, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not a SIGMMA checkpoint"):
        sg.tl.train_sigmma(graphed, epochs=1, checkpoint_dir=tmp_path, resume=True, **TINY)


def test_resume_without_checkpoint_warns_once(graphed, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.tl.train_sigmma(graphed, epochs=1, checkpoint_dir=tmp_path / "ckpt", resume=True, **TINY)
    warned = [r for r in caplog.records if "No checkpoint at" in r.getMessage()]
    assert len(warned) == 1
    assert (tmp_path / "ckpt" / "last.pt").exists()


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"backbone": "test_resnet", "finetune_blocks": 1}, ValueError, "no `blocks`"),
        ({"backbone": "test_vit_relpos", "finetune_blocks": 1}, ValueError, "cannot be split.*finetune_cache='off'"),
        ({"finetune_blocks": 6}, ValueError, "only 5 blocks"),
        ({"finetune_blocks": 1, "finetune_cache": "gpu"}, ValueError, "finetune_cache"),
    ],
)
def test_finetune_backbone_before_featurization(graphed, no_featurize, config, error, match):
    with pytest.raises(error, match=match):
        sg.tl.train_sigmma(graphed, **(TINY | {"epochs": 1} | config))


def test_finetune_cache_too_large_before_featurization(graphed, no_featurize, monkeypatch):
    import sigmma_sc.model._finetune as finetune

    monkeypatch.setattr(finetune, "available_memory", lambda: 1000)  # 1 kB free, and a full disk
    monkeypatch.setattr(finetune.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(MemoryError, match=r"does not fit.*cache_dir=.*finetune_cache='off'"):
        sg.tl.train_sigmma(graphed, epochs=1, finetune_blocks=1, **TINY)
