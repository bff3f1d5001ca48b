"""Worker of tests/model/test_distributed.py, launched with ``torchrun --nproc-per-node 2`` (gloo, CPU).

``grad OUT``: gradients of the global-batch loss from each rank's shard (whole shard, and GradCache micro-batches).
``fit OUT CKPT``: 1 epoch with a checkpoint, then resumed to 3 epochs; rank 0 saves the weights.
"""

from __future__ import annotations

import sys

import torch

from sigmma_sc.model import SigmmaModel
from sigmma_sc.model._distributed import distributed_backward, init_from_env
from sigmma_sc.model._toy import toy_bundle

CONFIG = {"hidden": 16, "out_dim": 16, "dropout": 0.0, "edge_addition": False, "batch_size": 10, "lr": 1e-2}


def setup():
    torch.set_num_threads(1)
    bundle = toy_bundle(n_tiles=40, seed=3)
    model = SigmmaModel.from_bundle(bundle, seed=0, **CONFIG)
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
        result[str(mb)] = {"loss": loss, **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    torch.save(result, f"{out}.rank{ctx.rank}")


def fit(out: str, ckpt: str) -> None:
    ctx, device = init_from_env("cpu")
    bundle, model = setup()
    model.fit(bundle, epochs=1, device=device, checkpoint_dir=ckpt, progress=False)
    resumed = SigmmaModel.from_bundle(bundle, seed=0, **CONFIG)
    resumed.fit(bundle, epochs=3, device=device, checkpoint_dir=ckpt, resume=True, progress=False)
    if ctx.is_main:
        torch.save({"state": resumed.state_dict(), "history": resumed.history}, out)


if __name__ == "__main__":
    {"grad": grads, "fit": fit}[sys.argv[1]](*sys.argv[2:])
