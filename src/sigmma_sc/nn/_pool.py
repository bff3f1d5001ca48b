"""Graph-level readouts over the cells of each tile."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn.aggr import AttentionalAggregation
from torch_geometric.utils import scatter


class AttentionalPooling(nn.Module):
    r"""Global attention pooling (Li et al., 2015) of node embeddings into one vector per tile.

    ``z_t = sum_{i in t} softmax_t(gate(h_i)) * h_i`` with a two-layer gate MLP
    (PyG's :class:`~torch_geometric.nn.aggr.AttentionalAggregation`). A tile without cells gets a zero
    vector (the softmax has no terms and the sum is empty), never NaN. Under CUDA autocast the pooling
    runs in float32 (softmax and sums over up to hundreds of cells).

    Parameters
    ----------
    in_channels
        Width of the node embeddings.
    hidden_channels
        Width of the gate MLP's hidden layer (default ``max(in_channels // 2, 8)``).

    Shapes
    ------
    - input: node embeddings ``(N, in_channels)``, tile index ``(N,)``, number of tiles ``T``
    - output: ``(T, in_channels)``
    """

    def __init__(self, in_channels: int, hidden_channels: int | None = None):
        super().__init__()
        hidden_channels = hidden_channels or max(in_channels // 2, 8)
        gate = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.LeakyReLU(), nn.Linear(hidden_channels, 1))
        self.aggr = AttentionalAggregation(gate_nn=gate)

    def reset_parameters(self) -> None:
        """Re-initialise the gate MLP."""
        self.aggr.reset_parameters()

    def forward(self, x: Tensor, batch: Tensor, num_tiles: int) -> Tensor:
        """Pool ``x`` over the nodes of each tile."""
        if x.shape[0] == 0:
            return x.new_zeros(num_tiles, x.shape[1])
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # the per-tile softmax and sums stay in float32
            with torch.autocast("cuda", enabled=False):
                return self.aggr(x.float(), index=batch, dim_size=num_tiles)
        return self.aggr(x, index=batch, dim_size=num_tiles)


def mean_pool(x: Tensor, batch: Tensor, num_tiles: int) -> Tensor:
    """Mean of the node features of each tile, ``(T, F)``; zero for tiles without cells."""
    return scatter(x, batch, dim=0, dim_size=num_tiles, reduce="mean")
