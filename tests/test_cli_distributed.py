"""``sigmma train-bundle`` under ``torchrun --nproc-per-node 2`` (gloo on the CPU) trains as one process would."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from _toy import toy_bundle

from sigmma_sc._cli import main
from sigmma_sc.model import SigmmaModel


def test_train_bundle_under_torchrun(tmp_path):
    torch.set_num_threads(1)
    bundle_path = tmp_path / "toy.pt"
    toy_bundle(n_tiles=40, seed=3).save(bundle_path)
    args = ["train-bundle", str(bundle_path), "--epochs", "2", "--batch-size", "10", "--device", "cpu"]
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "sigmma_sc._cli", *args, "--out", str(tmp_path / "two.pt"), "--checkpoint-dir", str(ckpt)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Distributed training on 2 processes" in out.stderr  # the loop ran sharded, not twice over
    assert (ckpt / "last.pt").exists()
    assert main(["-q", *args, "--out", str(tmp_path / "one.pt")]) == 0
    two, one = SigmmaModel.load(tmp_path / "two.pt"), SigmmaModel.load(tmp_path / "one.pt")
    assert [h["step"] for h in two.history] == [h["step"] for h in one.history]
    for (name, a), b in zip(two.state_dict().items(), one.state_dict().values(), strict=True):
        if not name.endswith("gate_nn.2.bias"):  # softmax-shift bias: zero true gradient (see test_distributed.py)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
