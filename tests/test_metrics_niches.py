"""Microenvironment scores: spatial coherence, and ARI / NMI / coherence recomputed on resampled tiles."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from spatialdata import SpatialData

import sigmma_sc as sg
from sigmma_sc.metrics._niches import neighbour_pairs


def _grid_cells(n: int = 30, seed: int = 0):
    """Cells on a jittered n x n grid, 4 square domains, 9 tiles of 10 x 10 cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    xy = np.c_[xx.ravel(), yy.ravel()] + rng.uniform(-0.2, 0.2, (n * n, 2))
    domain = (xx.ravel() >= n // 2).astype(int) + 2 * (yy.ravel() >= n // 2).astype(int)
    tile = (xx.ravel() // 10) + 3 * (yy.ravel() // 10)
    return xy, domain, tile


def test_spatial_coherence_separates_domains_from_noise():
    xy, domain, _ = _grid_cells()
    rng = np.random.default_rng(1)
    table = ad.AnnData(
        obs=pd.DataFrame(
            {
                "domain": pd.Categorical(domain.astype(str)),
                "noise": pd.Categorical(rng.integers(0, 4, len(domain)).astype(str)),
            },
            index=[str(i) for i in range(len(domain))],
        ),
        obsm={"spatial": xy},
    )
    sdata = SpatialData(tables={"table": table})
    coherent = sg.metrics.spatial_coherence(sdata, key="domain")
    noise = sg.metrics.spatial_coherence(sdata, key="noise")
    assert coherent > 0.9  # only pairs across the two domain borders differ
    assert abs(noise - 0.25) < 0.05  # 4 random labels: chance
    table.obs.loc[table.obs_names[:100], "domain"] = None  # missing labels leave cells out
    assert sg.metrics.spatial_coherence(sdata, key="domain") > 0.9
    with pytest.raises(KeyError, match="no microenvironments recorded"):
        sg.metrics.spatial_coherence(sdata, key="sigmma_microenv_macro")
    with pytest.raises(KeyError, match="sg.tl.microenvironments"):  # the default run, not computed yet
        sg.metrics.spatial_coherence(sdata)
    # a tl.microenvironments run is read through its record (key = its use_rep, column of `scale`)
    from sigmma_sc._utils._record import write_record

    write_record(table, "run", "microenvironments", {"keys": {"macro": "domain", "micro": "noise"}})
    assert sg.metrics.spatial_coherence(sdata, key="run") == sg.metrics.spatial_coherence(sdata, key="domain")
    assert sg.metrics.spatial_coherence(sdata, key="run", scale="micro") == pytest.approx(noise)
    # without obsm['spatial'], the centroids pp.tile wrote are used; with neither, the error names the fix
    table.obsm["sigmma_spatial"] = table.obsm.pop("spatial")
    assert sg.metrics.spatial_coherence(sdata, key="domain") > 0.9
    del table.obsm["sigmma_spatial"]
    with pytest.raises(KeyError, match="sg.pp.tile"):
        sg.metrics.spatial_coherence(sdata, key="domain")


def test_agreement_equals_sklearn_and_bootstraps():
    xy, domain, tile = _grid_cells()
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(domain)) < 0.2, rng.integers(0, 6, len(domain)), domain)
    pairs = neighbour_pairs(xy, 6)
    m = sg.metrics.microenvironment_metrics(noisy, tile, reference=domain, pairs=pairs)
    ones = np.ones((9, 1))
    assert m["ARI"].values(ones)[0] == pytest.approx(adjusted_rand_score(domain, noisy))
    assert m["NMI"].values(ones)[0] == pytest.approx(normalized_mutual_info_score(domain, noisy))
    # a tile drawn twice counts its cells twice
    counts = np.ones((9, 1))
    counts[0] = 2
    dup = np.r_[np.arange(len(domain)), np.flatnonzero(tile == 0)]
    assert m["ARI"].values(counts)[0] == pytest.approx(adjusted_rand_score(domain[dup], noisy[dup]))
    # cells of tiles marked -1 are not scored
    held = np.where(tile < 3, -1, tile - 3)
    m_held = sg.metrics.microenvironment_metrics(noisy, held, reference=domain)
    keep = held >= 0
    assert m_held["ARI"].values(np.ones((6, 1)))[0] == pytest.approx(adjusted_rand_score(domain[keep], noisy[keep]))
    # paired CI: the truth beats the noisy labels on every resample; identical labellings differ by 0
    truth = sg.metrics.microenvironment_metrics(domain, tile, reference=domain, pairs=pairs)
    df = sg.metrics.paired_bootstrap(truth, m, n_boot=200).set_index("metric")
    assert df.loc["ARI", "a"] == pytest.approx(1.0)
    assert df.loc["ARI", "ci_low"] > 0
    assert df.loc["coherence", "ci_low"] > 0
    same = sg.metrics.paired_bootstrap(m, m, n_boot=50).set_index("metric")
    assert (same["ci_low"] == 0).all()
    assert (same["ci_high"] == 0).all()
    with pytest.raises(ValueError, match="nothing to score"):
        sg.metrics.microenvironment_metrics(noisy, tile)
