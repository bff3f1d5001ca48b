"""benchmarks/noise_ceiling.py: the split-half ceiling is ~1 for noiseless-ish data and ~0 for pure noise."""

from __future__ import annotations

import numpy as np
from _benchmarks import load_benchmark


def _ceiling():
    return load_benchmark("noise_ceiling").split_half_ceiling


def test_split_half_ceiling_bounds():
    ceiling = _ceiling()
    rng = np.random.default_rng(0)
    n_tiles, n_genes = 400, 20
    train = np.zeros(n_tiles, dtype=bool)
    train[:200] = True
    ev = ~train
    genes = np.arange(n_genes)
    # strong tile-to-tile variation of the composition, deep counts: halves agree, ceiling close to 1
    rate = rng.gamma(2.0, 1.0, size=(n_tiles, n_genes)) * 2000
    deep = ceiling(rng.poisson(rate).astype(float), train, ev, genes, rng)
    assert np.nanmean(deep) > 0.95
    # every tile has the same composition: all variation is counting noise, the halves do not agree
    flat = np.broadcast_to(rng.gamma(2.0, 1.0, size=n_genes) * 20, (n_tiles, n_genes))
    noise = ceiling(rng.poisson(flat).astype(float), train, ev, genes, rng, repeats=3)
    assert abs(np.nanmean(noise)) < 0.1  # the signed root does not inflate a zero ceiling
