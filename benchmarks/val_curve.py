"""Validation loss vs validation retrieval per epoch, on the cached demo bundle of ``train_defaults.py``.

Diagnoses why early stopping on the validation InfoNCE picks near-initial weights (issue 14): after every epoch a
:class:`sigmma_sc.train.Callback` scores the validation tiles by their loss and by cross-modal retrieval (partner
ranks, R@10%, summed cosine similarity over the scales); ``patience=None`` lets the budget run out instead of
early stopping. Usage (after ``python benchmarks/train_defaults.py prepare``)::

    python benchmarks/val_curve.py '{"steps": 200}'
"""

import json
import sys
import time
from pathlib import Path

from sigmma_sc.model import SigmmaModel, TrainingBundle
from sigmma_sc.train import Callback


class ValidationRetrieval(Callback):
    """Each epoch's validation loss (from the loop's record) and retrieval of the validation tiles."""

    def __init__(self):
        self.rows = []

    def on_epoch_end(self, trainer, record):
        idx = trainer.val_idx
        emb = trainer.embed(idx)
        n = idx.numel()
        k = max(1, round(0.1 * n))
        sim = sum(emb[f"image/{s}"] @ emb[f"st/{s}"].T for s in trainer.model.scales)
        rank_i2s = (sim > sim.diag()[:, None]).sum(1)
        rank_s2i = (sim > sim.diag()[None, :]).sum(0)
        r = {
            "val_loss": record["val_loss"],
            "chance": record["val_chance"],
            "R10_i2s": float((rank_i2s < k).float().mean()),
            "R10_s2i": float((rank_s2i < k).float().mean()),
            "mean_rank": float((rank_i2s.float().mean() + rank_s2i.float().mean()) / 2),
        }
        self.rows.append(r)
        print(len(self.rows), {k: round(v, 3) for k, v in r.items()}, flush=True)


if __name__ == "__main__":
    bundle = TrainingBundle.load(
        str(Path(__file__).resolve().parents[1] / "bench_out/train_defaults/demo_96um_112px/bundle.pt")
    )
    extra = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    steps = extra.pop("steps", 300)
    model = SigmmaModel.from_bundle(bundle, seed=0, hidden=128, out_dim=128, steps=steps, patience=None, **extra)
    t0 = time.time()
    model.fit(bundle, seed=0, progress=False, callbacks=[ValidationRetrieval()])
    print("seconds", time.time() - t0)
