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
