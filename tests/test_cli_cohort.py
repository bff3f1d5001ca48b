"""``sigmma run`` / ``sigmma bundle`` / ``sigmma train-bundle`` on a cohort of two small Xenium folders."""

from __future__ import annotations

import pytest

import sigmma_sc as sg
from sigmma_sc._cli import main
from sigmma_sc._constants import Keys


@pytest.mark.slow
def test_cohort_run_bundle_and_train_bundle(tmp_path):
    import spatialdata as sd

    from sigmma_sc.model import SigmmaModel, TrainingBundle

    progress = sg.settings.progress_bar
    folders = [
        sg.datasets.synthetic_xenium(tmp_path / name, n_cells=900, n_genes=30, seed=seed, transcripts=False,
                                     morphology=False, labels=False)  # fmt: skip
        for seed, name in enumerate(("donor1", "donor2"))
    ]
    out = tmp_path / "cohort"
    common = ["--tile-size-um", "64", "--pixel-size-um", "2", "--input-size", "32", "--epochs", "2"]
    try:
        run = ["-q", "run", "--xenium", *map(str, folders), "--out", str(out), *common, "--batch-size", "64"]
        assert main(run) == 0
        zarrs = [out / "donor1.zarr", out / "donor2.zarr"]
        for z, name in zip(zarrs, ("donor1", "donor2"), strict=True):
            tiles = sd.read_zarr(z, selection=("tables",)).tables[Keys.TILE_TABLE]
            assert set(tiles.obs[Keys.SECTION]) == {name}
            assert Keys.embedding()["image"]["macro"] in tiles.obsm
        with pytest.raises(SystemExit, match="drop --he"):
            main(["-q", "run", "--xenium", *map(str, folders), "--out", str(tmp_path / "x"), "--he", "a.tif"])

        bundles = tmp_path / "bundles"
        cmd = ["-q", "bundle", *map(str, zarrs), "--out", str(bundles), "--backbone", "efficientnet_lite0",
               "--input-size", "32", "--split", "section", "--test-sections", "donor2"]  # fmt: skip
        assert main(cmd) == 0
        files = sorted(bundles.glob("*.pt"))
        assert [f.name for f in files] == ["donor1.pt", "donor2.pt"]
        joined = TrainingBundle.load(files)
        assert joined.meta["sections"] == ["donor1", "donor2"]
        assert set(joined.split[joined.section == 1].tolist()) == {2}  # donor2 held out for testing
        model_path = tmp_path / "model.pt"
        train = ["-q", "train-bundle", *map(str, files), "--out", str(model_path), "--epochs", "1", "--batch-size", "32"]
        assert main(train) == 0
        assert SigmmaModel.load(model_path).meta["sections"] == ["donor1", "donor2"]
    finally:
        sg.settings.progress_bar = progress
