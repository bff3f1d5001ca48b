"""Evaluation (paper Suppl. D.2): cross-modal retrieval and gene-expression linear probes of tile embeddings.

Retrieval scores image -> ST and ST -> image Recall@p% with ``K = floor(p * N)`` on held-out tiles.
Linear probes predict tile-level expression from image embeddings with PCA + ridge, under the paper's
protocol (tile-level PCC and MSE across the top 50 HVGs, mean ± std over test tiles) and under
HEST-Benchmark's (gene-wise PCC; fixed penalty, no intercept). Fitting sees training tiles only,
validation tiles only pick the paper protocol's ridge penalty, test tiles are only scored; see
:mod:`sigmma_sc.metrics._probe` for the details and for how the missing intercept affects HEST's MSE.
"""

from ._bootstrap import paired_bootstrap, tile_metrics
from ._collapse import embedding_collapse
from ._evaluate import compare, evaluate
from ._folds import spatial_folds
from ._grid import grid_artefact
from ._niches import microenvironment_metrics, spatial_coherence
from ._probe import ProbeResult, linear_probe, mean_baseline
from ._reliance import graph_reliance
from ._retrieval import cross_modal_retrieval, recall_at

__all__ = [
    "ProbeResult",
    "compare",
    "cross_modal_retrieval",
    "embedding_collapse",
    "evaluate",
    "graph_reliance",
    "grid_artefact",
    "linear_probe",
    "mean_baseline",
    "microenvironment_metrics",
    "paired_bootstrap",
    "recall_at",
    "spatial_coherence",
    "spatial_folds",
    "tile_metrics",
]
