"""Worker of tests/model/test_distributed.py, launched with ``torchrun --nproc-per-node 2`` (gloo, CPU).

``grad OUT``: gradients of the global-batch loss from each rank's shard (whole shard, and GradCache micro-batches).
``fit OUT CKPT``: ``fit`` with dropout and stochastic edge addition: 2 epochs with a checkpoint, resumed to
``EPOCHS``; the same with GradCache micro-batches; and a control without gradient averaging. Every rank saves
its weights and history to ``OUT.rank{r}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sigmma_sc.model import SigmmaModel
from sigmma_sc.train import _distributed as D
from sigmma_sc.train._distributed import distributed_backward, init_from_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the toy bundle
from _toy import toy_bundle

CONFIG = {"hidden": 16, "out_dim": 16, "dropout": 0.0, "edge_addition": False, "batch_size": 10, "lr": 1e-2}
#: the fit test: every stochastic layer on (dropout, Gumbel edge sampling), early stopping on, 3 epochs
FIT = {**CONFIG, "dropout": 0.2, "edge_addition": True, "patience": 1000, "warmup": 0.2}
EPOCHS = 3


def setup(config=CONFIG):
    torch.set_num_threads(1)
    bundle = toy_bundle(n_tiles=40, seed=3)
    model = SigmmaModel.from_bundle(bundle, seed=0, **config)
    return bundle, model


def grads(out: str) -> None:
    ctx, _ = init_from_env("cpu")
    bundle, model = setup()
    idx = torch.arange(3, 16)  # 13 tiles: shards of 7 and 6
    result = {}
    for mb in (None, 3):
        model.zero_grad(set_to_none=True)
        loss = distributed_backward(lambda i: model.embed_batch(bundle.select(i)), idx, model.loss_from_embeddings,
                                    model.parameters(), ctx, micro_batch=mb)  # fmt: skip
        result[str(mb)] = {
            "loss": loss,
            **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(result, f"{out}.rank{ctx.rank}")


def _run(bundle, micro_batch=None, ckpt=None):
    model = SigmmaModel.from_bundle(bundle, seed=0, **{**FIT, "micro_batch": micro_batch})
    if ckpt is not None:  # interrupted after 2 epochs, resumed by a fresh model
        model.fit(bundle, epochs=2, device="cpu", checkpoint_dir=ckpt, progress=False)
        model = SigmmaModel.from_bundle(bundle, seed=0, **{**FIT, "micro_batch": micro_batch})
    model.fit(bundle, epochs=EPOCHS, device="cpu", checkpoint_dir=ckpt, resume=ckpt is not None, progress=False)
    return {"state": model.state_dict(), "history": model.history}


def fit(out: str, ckpt: str) -> None:
    ctx, _ = init_from_env("cpu")
    bundle, _ = setup(FIT)
    result = {"resumed": _run(bundle, ckpt=ckpt), "gradcache": _run(bundle, micro_batch=3)}
    D.average_gradients = lambda params, ctx: None  # control: every rank steps on its own gradient
    result["no_averaging"] = _run(bundle)
    torch.save(result, f"{out}.rank{ctx.rank}")


if __name__ == "__main__":
    {"grad": grads, "fit": fit}[sys.argv[1]](*sys.argv[2:])
