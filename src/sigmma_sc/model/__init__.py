"""The SIGMMA model: assembles :mod:`sigmma_sc.nn` parts; its config, bundle, save, load and inference (pure torch).

:meth:`SigmmaModel.fit` runs the training loop of :mod:`sigmma_sc.train`. Imports only torch, torch_geometric,
numpy and the standard library, so training runs on a bare GPU machine from a saved :class:`TrainingBundle`.
"""

from ._bundle import TileBatch, TrainingBundle
from ._config import SigmmaConfig
from ._edge_scores import edge_scores
from ._inference import LinearProbe, RetrievalReference, inference_tiling
from ._sigmma import SigmmaModel

__all__ = [
    "LinearProbe",
    "RetrievalReference",
    "SigmmaConfig",
    "SigmmaModel",
    "TileBatch",
    "TrainingBundle",
    "edge_scores",
    "inference_tiling",
]
