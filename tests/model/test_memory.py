"""Host-memory planning of CPU training steps (``sigmma_sc.train._memory``)."""

import logging
import sys

import numpy as np
import pytest
import torch

from sigmma_sc.model import SigmmaModel
from sigmma_sc.train import _memory as M


def test_available_memory_reads_the_machine():
    got = M.available_memory()
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/meminfo")
    assert got is not None
    assert 0 < got < 1 << 50


def test_estimate_grows_with_edges_width_and_graph(bundle, small_config):
    m = SigmmaModel.from_bundle(bundle, **small_config)
    per_tile = M.step_bytes_per_tile(m, bundle)
    assert per_tile.shape == (bundle.n_tiles,)
    assert (per_tile > 0).all()
    edges = sum(bundle._host_counts[k] for k in ("knn0", "knn1", "knn2", "cand_meso", "cand_macro"))
    busiest, quietest = int(edges.argmax()), int(edges.argmin())
    assert per_tile[busiest] > per_tile[quietest]
    wide = SigmmaModel.from_bundle(bundle, **{**small_config, "hidden": 64, "out_dim": 64})
    torch.testing.assert_close(M.step_bytes_per_tile(wide, bundle), 4 * per_tile)  # linear in the width
    no_graph = SigmmaModel.from_bundle(bundle, **{**small_config, "use_graph": False})
    assert (M.step_bytes_per_tile(no_graph, bundle) < per_tile).all()
    no_addition = SigmmaModel.from_bundle(bundle, **{**small_config, "edge_addition": False})
    assert (M.step_bytes_per_tile(no_addition, bundle) <= per_tile).all()


def test_plan_splits_only_what_does_not_fit(bundle, small_config):
    m = SigmmaModel.from_bundle(bundle, **small_config)
    train = bundle.tiles_in("train")
    per_tile = M.step_bytes_per_tile(m, bundle)[train]
    batch = 8
    need = float(per_tile.sort(descending=True).values[:batch].sum())
    assert M.plan_cpu_micro_batch(m, bundle, train, batch, available=int(3 * need)) is None
    micro = M.plan_cpu_micro_batch(m, bundle, train, batch, available=int(need))  # half of it is the budget
    assert micro is not None
    assert 1 <= micro < batch
    assert micro & (micro - 1) == 0
    largest = per_tile.sort(descending=True).values
    assert float(largest[:micro].sum()) <= M.MEMORY_FRACTION * need  # the costliest micro-batch fits
    assert float(largest[: 2 * micro].sum()) > M.MEMORY_FRACTION * need or 2 * micro > batch  # and is the largest
    with pytest.raises(MemoryError, match="hidden"):
        M.plan_cpu_micro_batch(m, bundle, train, batch, available=int(float(largest[0])))
    assert M.plan_cpu_micro_batch(m, bundle, train, batch, available=None) in (None, *range(1, batch))


def test_fit_on_the_cpu_splits_a_batch_that_would_not_fit(bundle, small_config, monkeypatch, caplog):
    """The planned micro-batch trains with GradCache (same model as an explicit micro_batch) and is logged."""
    m = SigmmaModel.from_bundle(bundle, **small_config)
    train = bundle.tiles_in("train")
    need = float(M.step_bytes_per_tile(m, bundle)[train].sort(descending=True).values[:8].sum())
    monkeypatch.setattr(M, "available_memory", lambda: int(need / 2))  # a quarter of the batch per pass at most
    chunks = []
    original = SigmmaModel.embed_batch

    def spy(self, batch):
        if self.training and torch.is_grad_enabled():
            chunks.append(batch.num_tiles)
        return original(self, batch)

    monkeypatch.setattr(SigmmaModel, "embed_batch", spy)
    with caplog.at_level(logging.INFO, logger="sigmma_sc.train._memory"):
        history = m.fit(bundle, progress=False, epochs=1, seed=0)
    assert "accumulating its gradients over micro-batches of" in caplog.text
    micro = max(chunks)
    assert 1 <= micro <= 2
    assert np.isfinite(history[0]["train_loss"])
    monkeypatch.setattr(SigmmaModel, "embed_batch", original)
    explicit = SigmmaModel.from_bundle(bundle, **{**small_config, "micro_batch": micro})
    history_explicit = explicit.fit(bundle, progress=False, epochs=1, seed=0)
    assert history_explicit[0]["train_loss"] == pytest.approx(history[0]["train_loss"], rel=1e-6)
    for p, q in zip(m.parameters(), explicit.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # an explicit micro_batch is the user's choice: never replaced
    chosen = SigmmaModel.from_bundle(bundle, **{**small_config, "micro_batch": 4})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sigmma_sc.train._memory"):
        chosen.fit(bundle, progress=False, epochs=1, seed=0)
    assert "micro-batches" not in caplog.text


def test_fit_refuses_a_tile_larger_than_memory_before_training(bundle, small_config, monkeypatch):
    monkeypatch.setattr(M, "available_memory", lambda: 1000)
    m = SigmmaModel.from_bundle(bundle, **small_config)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(MemoryError, match="GiB of memory is available"):
        m.fit(bundle, progress=False, epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters(), strict=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_rss_helpers_of_the_memory_benchmark():
    from _benchmarks import load_benchmark

    bench = load_benchmark("cpu_memory")
    assert bench.rss_peak_reset()
    assert bench.rss_bytes("VmRSS") <= bench.rss_bytes("VmHWM")


def test_inference_chunks_fit_the_budget_and_change_no_result(bundle, small_config, monkeypatch):
    m = SigmmaModel.from_bundle(bundle, **small_config)
    idx = torch.arange(bundle.n_tiles)
    cost = M.inference_bytes_per_tile(m, bundle)
    assert (cost > 0).all()
    assert (cost < M.step_bytes_per_tile(m, bundle)).all()
    assert [c.numel() for c in M.inference_chunks(m, bundle, idx, 10, available=1 << 50)] == [10, 10, 4]
    available = int(3 * float(cost.max()) / M.MEMORY_FRACTION)  # about three tiles per chunk
    chunks = M.inference_chunks(m, bundle, idx, 1000, available=available)
    budget = M.MEMORY_FRACTION * available
    assert torch.equal(torch.cat(chunks), idx)
    assert len(chunks) > 2
    assert all(float(cost[c].sum()) <= budget for c in chunks)  # each fits
    assert all(
        float(cost[c].sum() + cost[n[0]]) > budget for c, n in zip(chunks, chunks[1:], strict=False)
    )  # and is maximal
    assert [c.numel() for c in M.inference_chunks(m, bundle, idx, 1000, available=1)] == [1] * bundle.n_tiles

    tiles, cells = m.encode_st(bundle)
    monkeypatch.setattr(M, "available_memory", lambda: available)
    small_tiles, small_cells = m.encode_st(bundle)
    for s in m.scales:
        torch.testing.assert_close(small_tiles[s], tiles[s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(small_cells[s], cells[s], rtol=1e-5, atol=1e-6)
