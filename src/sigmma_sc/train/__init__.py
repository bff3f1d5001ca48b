"""The training layer: the loop that fits a :class:`~sigmma_sc.model.SigmmaModel`, in pieces with hooks (pure torch).

:meth:`SigmmaModel.fit <sigmma_sc.model.SigmmaModel.fit>` runs a :class:`Trainer`; :class:`Callback` hooks
observe a run (loss curves, edge-sampler statistics, validation retrieval) without changing it. The tools for
large batches live here too: GradCache micro-batches (:func:`grad_cache_backward`), the global batch's random
draws (:class:`GlobalBatchNoise`) and the differentiable all-gather of distributed training
(:func:`all_gather_with_grad`, :func:`gather_embeddings`). Imports only torch, numpy and the standard library;
:mod:`sigmma_sc.model` builds on it, never the reverse.
"""

from ._distributed import all_gather_with_grad, gather_embeddings
from ._gradcache import grad_cache_backward
from ._noise import GlobalBatchNoise
from ._trainer import Callback, Trainer, TrainingState

__all__ = [
    "Callback",
    "GlobalBatchNoise",
    "Trainer",
    "TrainingState",
    "all_gather_with_grad",
    "gather_embeddings",
    "grad_cache_backward",
]
