"""Distributed training with 2 local processes (torchrun, gloo on the CPU): gradients and weights as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_dist_worker.py")


def _torchrun(*args: str, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _single():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _dist_worker
    finally:
        sys.path.pop(0)
    return _dist_worker


def test_distributed_gradients_equal_full_batch(tmp_path):
    """Each rank embeds half of a 13-tile batch; the averaged gradients equal one process's full-batch gradients."""
    _torchrun("grad", str(tmp_path / "g"))
    w = _single()
    bundle, model = w.setup()
    idx = torch.arange(3, 16)
    model.zero_grad(set_to_none=True)
    loss = model.loss_from_embeddings(model.embed_batch(bundle.select(idx)))
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in want.values())
    ranks = [torch.load(tmp_path / f"g.rank{r}", weights_only=True) for r in range(2)]
    for mb in ("None", "3"):  # whole shard, and GradCache micro-batches of 3 tiles
        for got in ranks:
            assert torch.allclose(got[mb]["loss"], loss.detach(), atol=1e-5)
            assert set(got[mb]) - {"loss"} == set(want)
            for name, g in want.items():
                # float32 sums in another order (shards, micro-batches): rounding relative to the largest gradient
                # (e.g. an attention gate's bias has a true gradient of 0 and a rounding residue of ~1e-6)
                tol = 1e-5 * scale
                assert torch.allclose(got[mb][name], g, rtol=1e-4, atol=tol), (mb, name, (got[mb][name] - g).abs().max())
    # the gradient is not trivially equal to a one-shard gradient: the gathered negatives matter
    model.zero_grad(set_to_none=True)
    model.loss_from_embeddings(model.embed_batch(bundle.select(idx[:7]))).backward()
    name = next(iter(want))
    assert not torch.allclose(model.get_parameter(name).grad, want[name], rtol=1e-3)


def test_distributed_fit_equals_one_process(tmp_path):
    """A 2-process fit (dropout, Gumbel edge sampling, validation, checkpoint + resume, GradCache) = 1-process fit.

    The reference is one process training on the same global batches with the same seed; the ranks draw the
    noise that one process draws for their rows, so the weights agree up to float rounding. Without gradient
    averaging (the control) they do not.
    """
    _torchrun("fit", str(tmp_path / "w"), str(tmp_path / "ckpt"))
    w = _single()
    bundle, _ = w.setup(w.FIT)
    refs = {"resumed": w._run(bundle, ckpt=str(tmp_path / "ref")), "gradcache": w._run(bundle)}
    ref = refs["gradcache"]
    assert len(ref["history"]) == w.EPOCHS
    assert ref["history"][-1]["step"] >= 9  # several optimiser steps
    ranks = [torch.load(tmp_path / f"w.rank{r}", weights_only=False) for r in range(2)]
    assert (tmp_path / "ckpt" / "last.pt").exists()
    # the attention gates' last bias shifts every logit of a softmax: its true gradient is 0, and AdamW turns
    # the rounding noise into steps of ~lr, so it is left out (it does not change any output)
    keys = [k for k in ref["state"] if not k.endswith("gate_nn.2.bias")]
    for run, want in refs.items():
        for got in ranks:
            for name in keys:
                torch.testing.assert_close(got[run]["state"][name], want["state"][name], rtol=1e-4, atol=1e-4,
                                           msg=lambda m, n=f"{run} {name}": f"{n}: {m}")  # fmt: skip
            for a, b in zip(got[run]["history"], want["history"], strict=True):
                assert a["step"] == b["step"]
                assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
                assert abs(a["val_rank"] - b["val_rank"]) < 1e-6  # the model-selection criterion
                assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        # every rank holds the same weights and validation losses (identical early-stopping decisions)
        assert all(torch.equal(ranks[0][run]["state"][k], ranks[1][run]["state"][k]) for k in ref["state"])
        for key in ("val_loss", "val_rank"):
            assert [h[key] for h in ranks[0][run]["history"]] == [h[key] for h in ranks[1][run]["history"]]
    bad = ranks[0]["no_averaging"]["state"]
    assert any(not torch.allclose(bad[k], ref["state"][k], rtol=1e-3, atol=1e-3) for k in keys)


def test_shard_noise_equals_global_batch_noise():
    """One process, no process group: each shard's forward under rank_noise equals its rows of the full-batch forward.

    Dropout and Gumbel edge sampling on; shards and GradCache micro-batches, including chunks without any
    candidate edge (tiles 1-4 have no meso candidates): the random stream ends where one process's ends.
    """
    from _toy import toy_bundle

    from sigmma_sc.model import SigmmaModel
    from sigmma_sc.train._noise import rank_noise

    torch.set_num_threads(1)
    bundle = toy_bundle(n_tiles=40, seed=3, min_cells=2, max_cells=5, n_cand=1)
    model = SigmmaModel.from_bundle(bundle, seed=0, hidden=16, out_dim=16, dropout=0.3, edge_addition=True)
    model.train()
    idx = torch.arange(1, 14)
    assert int(bundle._host_counts["cand_meso"][1:5].sum()) == 0  # a chunk of tiles 1-4 skips the meso sampler
    torch.manual_seed(5)
    full = model.embed_batch(bundle.select(idx))
    after = torch.get_rng_state()
    with rank_noise(model, bundle._host_counts) as noise:
        for chunks in ([(0, 7)], [(7, 13)], [(0, 4), (4, 7)], [(7, 9), (9, 13)], [(12, 13)]):
            torch.manual_seed(5)
            noise.start_step(idx)
            for a, z in chunks:
                noise.start_chunk(a, z)
                with noise:
                    part = model.embed_batch(bundle.select(idx[a:z]))
                noise.end_chunk()
                for k, v in full.items():
                    torch.testing.assert_close(part[k], v[a:z], rtol=1e-5, atol=1e-6)
            assert torch.equal(torch.get_rng_state(), after), chunks
    torch.manual_seed(5)  # without the mode, a shard draws its own (other) noise
    plain = model.embed_batch(bundle.select(idx[:7]))
    assert not torch.allclose(plain["st/macro"], full["st/macro"][:7], atol=1e-3)
