"""Pure-torch building blocks of SIGMMA (tensors in, tensors out; no SpatialData).

Imports only torch, torch_geometric, numpy and the standard library (timm lazily).
"""

from ._distributed import GlobalBatchNoise, all_gather_with_grad, gather_embeddings
from ._edges import EdgeSampler, block_ids, same_block
from ._frozen_features import featurize
from ._gnn import GraphEncoderOutput, HierarchicalGraphEncoder, WeightedSAGEConv
from ._image_encoder import BackboneInfo, MultiCropEncoder, build_backbone
from ._loss import ProjectionHead, grad_cache_backward, info_nce, multiscale_info_nce
from ._pool import AttentionalPooling

__all__ = [
    "AttentionalPooling",
    "BackboneInfo",
    "EdgeSampler",
    "GlobalBatchNoise",
    "GraphEncoderOutput",
    "HierarchicalGraphEncoder",
    "MultiCropEncoder",
    "ProjectionHead",
    "WeightedSAGEConv",
    "all_gather_with_grad",
    "block_ids",
    "build_backbone",
    "featurize",
    "gather_embeddings",
    "grad_cache_backward",
    "info_nce",
    "multiscale_info_nce",
    "same_block",
]
