"""Pure-torch building blocks of SIGMMA (tensors in, tensors out; no SpatialData).

Imports only torch, torch_geometric, numpy and the standard library (timm lazily). The training plumbing
(GradCache, distributed gathers, the global batch's random draws) lives in :mod:`sigmma_sc.train`.
"""

from ._edges import EdgeSampler, same_block
from ._frozen_features import featurize
from ._gnn import GraphEncoderOutput, HierarchicalGraphEncoder, WeightedSAGEConv
from ._image_encoder import BackboneInfo, MultiCropEncoder, build_backbone
from ._loss import ProjectionHead, info_nce, multiscale_info_nce
from ._pool import AttentionalPooling

__all__ = [
    "AttentionalPooling",
    "BackboneInfo",
    "EdgeSampler",
    "GraphEncoderOutput",
    "HierarchicalGraphEncoder",
    "MultiCropEncoder",
    "ProjectionHead",
    "WeightedSAGEConv",
    "build_backbone",
    "featurize",
    "info_nce",
    "multiscale_info_nce",
    "same_block",
]
