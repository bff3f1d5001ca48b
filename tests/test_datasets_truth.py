"""The demo's planted ground truth joined into its cell table."""

from __future__ import annotations

import pandas as pd
import pytest

import sigmma_sc as sg


def test_demo_truth_domains(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMMA_SC_CACHE", str(tmp_path))
    sdata = sg.datasets.demo(n_cells=300, seed=2, truth=True)
    obs = sdata.tables["table"].obs
    truth = pd.read_parquet(tmp_path / "demo_300_2" / "sigmma_truth.parquet").set_index("cell_id")
    assert isinstance(obs["truth_domain"].dtype, pd.CategoricalDtype)
    assert obs["truth_domain"].notna().all()
    ids = obs["cell_id"].astype(str)
    assert (obs["truth_domain"].astype(str).to_numpy() == truth.loc[ids, "domain"].astype(str).to_numpy()).all()
    assert (obs["truth_cell_type"].astype(str).to_numpy() == truth.loc[ids, "cell_type"].astype(str).to_numpy()).all()
    assert "truth_domain" not in sg.datasets.demo(n_cells=300, seed=2).tables["table"].obs  # off by default
    with pytest.raises(FileNotFoundError, match="synthetic_xenium"):
        sg.datasets.add_truth(sdata, tmp_path)
    sdata.tables["table"].obs["cell_id"] = "x" + ids.to_numpy()
    with pytest.raises(ValueError, match="not in"):
        sg.datasets.add_truth(sdata, tmp_path / "demo_300_2")
