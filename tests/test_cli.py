"""The ``sigmma`` command line: help texts, ``sigmma run`` on a small Xenium folder, then ``sigmma evaluate``."""

from __future__ import annotations

import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._cli import main
from sigmma_sc._constants import Keys


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["evaluate"], ["bundle"], ["train-bundle"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sigmma" in out
    if command == ["evaluate"]:
        assert "training tiles only" in out


def test_run_then_evaluate(tmp_path, capsys):
    import spatialdata as sd

    progress = sg.settings.progress_bar
    folder = sg.datasets.synthetic_xenium(
        tmp_path / "run", n_cells=1500, n_genes=40, seed=0, transcripts=False, morphology=False, labels=False
    )
    out = tmp_path / "out.zarr"
    common = ["--tile-size-um", "64", "--pixel-size-um", "2", "--input-size", "32", "--epochs", "3"]
    try:
        assert main(["-q", "run", "--xenium", str(folder), "--out", str(out), *common, "--batch-size", "64"]) == 0
    finally:
        sg.settings.progress_bar = progress
    sdata = sd.read_zarr(out)
    tiles, cells = sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]
    assert Keys.EMB_IMAGE.format(scale="macro") in tiles.obsm
    assert all(Keys.MICROENV.format(scale=s) in cells.obs for s in ("micro", "meso", "macro"))
    assert tiles.uns[Keys.UNS]["backbone"]["input_size"] == 32  # --input-size reaches featurization
    with pytest.raises(FileExistsError, match="exists"):  # refused before any work
        main(["-q", "run", "--xenium", str(folder), "--out", str(out), *common])
    with pytest.raises(SystemExit, match="--alignment needs --he"):
        main(["-q", "run", "--xenium", str(folder), "--out", str(tmp_path / "x.zarr"), "--alignment", "a.csv"])

    capsys.readouterr()
    assert main(["-q", "evaluate", str(out), "--backbone", "--n-genes", "10", "--csv", str(tmp_path / "s.csv")]) == 0
    printed = capsys.readouterr().out
    assert "Scores on" in printed
    assert "image->st R@10%" in printed
    assert "hest_gene_pcc" in printed
    scores = pd.read_csv(tmp_path / "s.csv", index_col=0)
    assert {"all", "backbone_macro", "backbone_concat"} <= set(scores.index)
    assert 0 <= scores.loc["all", "image->st R@10%"] <= 1
    assert -1 <= scores.loc["all", "paper_gene_pcc"] <= 1
    assert pd.isna(scores.loc["backbone_macro", "image->st R@10%"])  # no ST partner: no retrieval
    with pytest.raises(SystemExit, match="No such zarr"):
        main(["evaluate", str(tmp_path / "missing.zarr")])
