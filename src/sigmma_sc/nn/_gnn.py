"""Hierarchical graph encoder of the ST side (paper §3.2).

Pure torch + torch_geometric. Inputs are batches of tiles as collated by
:meth:`sigmma_sc.model.TrainingBundle.select`: node features, positions inside the tile,
the tile index of each cell, the kNN edges and the precomputed candidate edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from .._constants import GRID, SCALES
from ._edges import EdgeSampler, block_ids, rewire_edges, scale_mask, tile_local_index
from ._pool import AttentionalPooling, mean_pool


class WeightedSAGEConv(MessagePassing):
    r"""GraphSAGE layer with an edge-weighted mean aggregation that cannot blow up.

    .. math::
        x'_i = W_l \frac{\sum_{j \in N(i)} w_{ji} x_j}{\max(\sum_{j \in N(i)} w_{ji}, 1)} + W_r x_i

    PyG's :class:`~torch_geometric.nn.conv.SAGEConv` takes no edge weights; here gradients flow
    through ``edge_weight`` (the Gumbel-sampled edges of :class:`~sigmma_sc.nn.EdgeSampler`). Messages flow
    along ``edge_index[0] -> edge_index[1]`` (PyG's ``source_to_target``). When
    ``in_channels > out_channels`` the features are projected before aggregation (mean aggregation
    is linear, so the result is the same at lower cost).

    Why ``max(sum w, 1)``: the sampled weights are hard ``{0, 1}`` values (straight-through), so for a node
    with at least one sampled edge the denominator is its number of sampled edges and the layer computes
    exactly the mean over the edges that exist (the same forward pass as removing the zero-weight edges,
    and PyG's mean ``SAGEConv`` for unit weights). A node whose incoming weights are all 0 (or that has no
    incoming edge) aggregates 0, and the gradient of its aggregate with respect to an edge weight is
    ``x_j``: exactly the change that switching that edge on makes, never amplified. Dividing by
    ``max(sum w, eps)`` instead gives such a node a gradient of ``x_j / eps`` (a million-fold
    amplification of the straight-through gradient for ``eps = 1e-6``), and dividing by the in-degree (dgl's weighted ``SAGEConv``)
    would shrink the message of a node by its unsampled candidates, so the forward pass would no longer be
    the mean over the graph's edges. Through a zero-weight edge, the gradient with respect to the
    neighbour's features ``x_j`` is 0. Weights are meant to be non-negative; fractional weights whose sum is
    below 1 give their weighted sum (not a mean that would scale them up).

    Parameters
    ----------
    in_channels
        Input node feature width.
    out_channels
        Output node feature width.
    bias
        Add a bias to the neighbour branch.

    Shapes
    ------
    - input: node features ``(N, in_channels)``, edges ``(2, E)``, edge weights ``(E,)`` (optional, default 1)
    - output: ``(N, out_channels)``
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True):
        super().__init__(aggr="sum")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.lin_l = nn.Linear(in_channels, out_channels, bias=bias)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)

    def reset_parameters(self) -> None:
        """Re-initialise both linear maps."""
        super().reset_parameters()
        self.lin_l.reset_parameters()
        self.lin_r.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Aggregate weighted neighbour means and add the root term."""
        n = x.shape[0]
        if edge_weight is None:
            edge_weight = x.new_ones(edge_index.shape[1])
        edge_weight = edge_weight.to(x.dtype)
        project_first = self.in_channels > self.out_channels
        src = F.linear(x, self.lin_l.weight) if project_first else x
        num = self.propagate(edge_index, x=src, edge_weight=edge_weight, size=(n, n))
        den = scatter(edge_weight, edge_index[1], dim=0, dim_size=n, reduce="sum")
        # never divide by less than 1 (class docstring); unlike clamp_min, the gradient still flows through
        # a denominator of exactly 1 (a node with one sampled edge), as for any other mean
        agg = num / torch.where(den >= 1, den, torch.ones_like(den)).unsqueeze(-1)
        if project_first:
            out = agg if self.lin_l.bias is None else agg + self.lin_l.bias
        else:
            out = self.lin_l(agg)
        return out + self.lin_r(x)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return edge_weight.unsqueeze(-1) * x_j

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"


@dataclass
class GraphEncoderOutput:
    """What :class:`HierarchicalGraphEncoder` returns.

    Attributes
    ----------
    nodes
        Scale -> node embeddings ``(N, out)``.
    pooled
        Scale -> tile embeddings ``(T, out)`` (zero rows for tiles without cells).
    graphs
        Scale -> ``(edge_index (2, E_s), edge_weight (E_s,))`` of the graph the scale's layers ran on
        (every scale the hierarchy ran through, including finer scales not requested).
    added
        ``"meso"``/``"macro"`` -> ``(candidate edges (2, E_c), sampled weights (E_c,))`` after the
        neighbour-patch mask (only with edge addition).
    """

    nodes: dict[str, Tensor]
    pooled: dict[str, Tensor]
    graphs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    added: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


GRAPHS = ("hierarchical", "tile")
#: what the GNN's edges are: the spatial graphs, none (self only: the no-edges control) or the spatial graphs with
#: their targets rewired at random inside each block, every degree kept (the rewired-edges control), or across the
#: whole tile (the tile-wide rewired control: no arrangement left in which cells are linked)
EDGES = ("spatial", "none", "rewired", "rewired_tile")


def check_graph(
    graph: str, *, scales: Sequence[str], edge_addition: bool, use_graph: bool, edges: str = "spatial"
) -> None:
    """Raise ``ValueError`` unless ``graph`` is one of :data:`GRAPHS` and consistent with the other switches."""
    if graph not in GRAPHS:
        raise ValueError(f"`graph` must be one of {GRAPHS}, got {graph!r}.")
    if edges not in EDGES:
        raise ValueError(f"`edges` must be one of {EDGES}, got {edges!r}.")
    if edges != "spatial" and not use_graph:
        raise ValueError(
            f"`edges={edges!r}` is a control of the cell-graph model (same GNN and pooling, other edges); with "
            "`use_graph=False` there is no GNN: leave `edges='spatial'`."
        )
    if graph != "tile":
        return
    if not use_graph:
        raise ValueError("`graph='tile'` is a cell-graph model; with `use_graph=False` leave `graph='hierarchical'`.")
    if tuple(scales) != ("macro",) or edge_addition:
        raise ValueError(
            "`graph='tile'` (the single-scale graph ablation: one GNN over the tile's kNN graph, pooled once) needs "
            f"`scales=('macro',)` and `edge_addition=False`; got scales={tuple(scales)!r}, "
            f"edge_addition={edge_addition!r}."
        )


def _empty_edges(device: torch.device) -> Tensor:
    return torch.empty(2, 0, dtype=torch.long, device=device)


class HierarchicalGraphEncoder(nn.Module):
    r"""Multi-scale ST encoder: stacked weighted-SAGE layers on growing cell graphs (paper §3.2).

    ``G_micro`` keeps the kNN edges whose ends share a micro block (4x4 grid over the tile);
    ``layers_per_scale`` SAGE layers give ``h_micro``. The candidate edges ``cand_meso`` (restricted
    to pairs in the same meso block, 2x2 grid) are scored on ``h_micro`` and sampled by
    :class:`~sigmma_sc.nn.EdgeSampler`; ``G_meso = G_micro (weight 1) + sampled edges (weight = sample)``
    and more SAGE layers on ``h_micro`` give ``h_meso``. The same with ``cand_macro`` (restricted to the
    tile) gives ``G_macro`` and ``h_macro``. Each requested scale is pooled per tile by global attention.

    Ablations (paper Table 5): ``edge_addition=False`` keeps the hierarchy with fixed graphs (``G_meso`` = kNN
    edges inside a meso block, ``G_macro`` = all kNN edges of the tile, weight 1, no scorer);
    ``graph="tile"`` (with ``scales=("macro",)`` and ``edge_addition=False``) is the single-scale graph row: one
    stack of ``layers_per_scale`` SAGE layers over the tile's plain kNN graph (every kNN edge of the tile, no
    block constraint, no edge addition), pooled once into the macro vector; ``use_graph=False`` is
    BLEEP-style, no GNN: tile vector ``MLP(mean of the tile's node features)`` and cell vectors
    ``MLP(x)``, the same for every scale; ``scales`` restricts the scales returned (the hierarchy still
    runs through the finer scales needed to build the coarsest requested one).

    Controls that change only the edges (same layers, attention pooling and heads): ``edges="none"`` runs every
    layer with no edge at all (no kNN edge, no candidate), so each SAGE layer reduces to its root term
    ``W_r x_i`` plus the neighbour branch's bias, a per-cell MLP of the same depth; ``edges="rewired"`` permutes
    the targets of the kNN edges among the edges of the same kind and block (same micro block, same meso block,
    same tile) and the targets of the meso / macro candidates among those of the same meso block / tile
    (``sigmma_sc.nn._edges.rewire_edges``): every cell keeps its in- and out-degree in each edge set and every
    edge stays in its block, but which cells are linked is random (a fixed draw per tile, the same in training
    and at inference). Inside a small block the partners stay near each other, so ``"rewired"`` keeps the
    arrangement at scales above the block; ``edges="rewired_tile"`` permutes the targets of every edge set among
    the edges of the same kind in the whole tile instead (each cell keeps its in- and out-degree in each edge set,
    but its partners are any cells of its tile, so the graph carries the tile's composition and no arrangement).

    Parameters
    ----------
    in_channels
        Node feature width ``F``.
    hidden
        Width of the intermediate SAGE layers.
    out
        Width of each scale's node and tile embeddings.
    layers_per_scale
        SAGE layers per scale (paper: 2).
    dropout
        Dropout after every layer.
    tau_e
        Gumbel-sigmoid temperature of the edge sampler: it shapes the straight-through gradient only, never which
        edges are sampled (see :class:`~sigmma_sc.nn.EdgeSampler`).
    edge_addition
        Stochastic edge addition (else fixed block-restricted kNN graphs).
    use_graph
        Message passing on cell graphs (else the BLEEP-style MLP).
    scales
        Scales to compute, a subset of ``("micro", "meso", "macro")``.
    graph
        ``"hierarchical"`` (micro -> meso -> macro, see above) or ``"tile"`` (one GNN over the tile's kNN graph;
        needs ``scales=("macro",)`` and ``edge_addition=False``).
    edges
        ``"spatial"`` (the graphs above), ``"none"`` (no edges: the no-edges control), ``"rewired"`` (degree-
        preserving random rewiring inside blocks: the rewired-edges control) or ``"rewired_tile"`` (the same across
        the whole tile); see above.
    edge_evaluation
        Edge weights of an evaluation pass: ``"threshold"`` (keep ``s_uv > 0.5``) or ``"expected"`` (weight
        ``s_uv``); see :class:`~sigmma_sc.nn.EdgeSampler`.

    Shapes
    ------
    - input: ``x (N, F)``, ``pos (N, 2)`` in ``[0, 1]``, ``batch (N,)``, ``edge_index (2, E)``,
      ``cand_meso (2, E_m)``, ``cand_macro (2, E_M)``
    - output: :class:`GraphEncoderOutput` with ``nodes[s] (N, out)`` and ``pooled[s] (T, out)``
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 512,
        out: int = 512,
        *,
        layers_per_scale: int = 2,
        dropout: float = 0.1,
        tau_e: float = 1.0,
        edge_addition: bool = True,
        use_graph: bool = True,
        scales: Sequence[str] = SCALES,
        graph: str = "hierarchical",
        edges: str = "spatial",
        edge_evaluation: str = "threshold",
    ):
        super().__init__()
        scales = tuple(scales)
        if not scales or any(s not in SCALES for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"`scales` must be a non-empty subset of {SCALES}, got {scales!r}.")
        if layers_per_scale < 1:
            raise ValueError(f"`layers_per_scale` must be >= 1, got {layers_per_scale}.")
        check_graph(graph, scales=scales, edge_addition=edge_addition, use_graph=use_graph, edges=edges)
        self.graph = graph
        self.edges = edges
        self.scales = tuple(s for s in SCALES if s in scales)
        self.in_channels, self.hidden, self.out = in_channels, hidden, out
        self.dropout = dropout
        self.edge_addition = edge_addition
        self.use_graph = use_graph
        self.act = nn.LeakyReLU()
        # the hierarchy runs up to the coarsest requested scale; the tile graph is one stack of layers
        self._run = ("macro",) if graph == "tile" else SCALES[: max(SCALES.index(s) for s in self.scales) + 1]

        if not use_graph:
            self.mlp = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.LeakyReLU(), nn.Dropout(dropout), nn.Linear(hidden, out)
            )
            return
        self.convs = nn.ModuleDict()
        dim = in_channels
        for s in self._run:
            widths = [hidden] * (layers_per_scale - 1) + [out]
            layers = []
            for w in widths:
                layers.append(WeightedSAGEConv(dim, w))
                dim = w
            self.convs[s] = nn.ModuleList(layers)
        self.samplers = nn.ModuleDict()
        if edge_addition:
            for s in self._run[1:]:
                self.samplers[s] = EdgeSampler(out, tau=tau_e, evaluation=edge_evaluation)
        self.pools = nn.ModuleDict({s: AttentionalPooling(out) for s in self.scales})

    def reset_parameters(self) -> None:
        """Re-initialise every layer."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def _layers(self, scale: str, h: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        for conv in self.convs[scale]:
            h = F.dropout(self.act(conv(h, edge_index, edge_weight)), self.dropout, self.training)
        return h

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        cand_meso: Tensor | None = None,
        cand_macro: Tensor | None = None,
        *,
        num_tiles: int | None = None,
        edge_sections: tuple[int, int, int] | None = None,
        candidates_in_blocks: bool = False,
    ) -> GraphEncoderOutput:
        """Encode a batch of tiles (see the class docstring).

        ``edge_sections`` and ``candidates_in_blocks`` (set by :meth:`sigmma_sc.model.TrainingBundle.select`)
        declare that the inputs already satisfy the neighbour-patch constraint: ``edge_index`` is ordered
        into ``(n_micro, n_meso, n_other)`` edges (same micro block, same meso block only, other) and the
        candidates lie in their blocks. The graphs are then slices instead of boolean masks, so the forward
        pass has only static shapes (no device-to-host synchronisation on CUDA); the result is the same.
        """
        if edge_sections is not None and sum(edge_sections) != edge_index.shape[1]:
            raise ValueError(
                f"`edge_sections` {tuple(edge_sections)} do not add up to the {edge_index.shape[1]} edges."
            )
        if num_tiles is None:
            num_tiles = int(batch.max()) + 1 if batch.numel() else 0
        if not self.use_graph:
            cells = self.mlp(x)
            tiles = self.mlp(mean_pool(x, batch, num_tiles))
            return GraphEncoderOutput(nodes=dict.fromkeys(self.scales, cells), pooled=dict.fromkeys(self.scales, tiles))

        device = x.device
        if self.edges == "none":
            edge_index = cand_meso = cand_macro = _empty_edges(device)
            edge_sections, candidates_in_blocks = (0, 0, 0), True
        elif self.edges in ("rewired", "rewired_tile"):
            tile_wide = self.edges == "rewired_tile"
            edge_index, cand_meso, cand_macro, edge_sections = _rewired(
                edge_index, cand_meso, cand_macro, pos, batch, num_tiles, edge_sections, tile_wide=tile_wide
            )
            candidates_in_blocks = candidates_in_blocks or tile_wide  # rewired out of their blocks: keep them
        cands = {"meso": cand_meso, "macro": cand_macro}
        nodes: dict[str, Tensor] = {}
        graphs: dict[str, tuple[Tensor, Tensor]] = {}
        added: dict[str, tuple[Tensor, Tensor]] = {}
        h = x
        ei = wi = None

        def knn(scale: str) -> Tensor:  # the kNN edges allowed at `scale`
            if edge_sections is None:
                return edge_index[:, scale_mask(edge_index, pos, batch, scale)]
            return edge_index[:, : sum(edge_sections[: SCALES.index(scale) + 1])]

        for s in self._run:
            if s == self._run[0]:  # the first graph: the fixed kNN edges allowed at that scale
                ei = knn(s)
                wi = x.new_ones(ei.shape[1])
            elif self.edge_addition:
                cand = cands[s] if cands[s] is not None else _empty_edges(device)
                if not candidates_in_blocks:
                    cand = cand[:, scale_mask(cand, pos, batch, s)]  # neighbour-patch constraint
                w = self.samplers[s](h, cand)
                added[s] = (cand, w)
                ei, wi = torch.cat([ei, cand], dim=1), torch.cat([wi, w.to(wi.dtype)])
            else:
                ei = knn(s)
                wi = x.new_ones(ei.shape[1])
            h = self._layers(s, h, ei, wi)
            nodes[s], graphs[s] = h, (ei, wi)
        pooled = {s: self.pools[s](nodes[s], batch, num_tiles) for s in self.scales}
        return GraphEncoderOutput(nodes={s: nodes[s] for s in self.scales}, pooled=pooled, graphs=graphs, added=added)


def _rewired(
    edge_index: Tensor,
    cand_meso: Tensor | None,
    cand_macro: Tensor | None,
    pos: Tensor,
    batch: Tensor,
    num_tiles: int,
    edge_sections: tuple[int, int, int] | None,
    *,
    tile_wide: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, tuple[int, int, int]]:
    """The rewired-edges control: every edge set rewired inside its blocks (see :class:`HierarchicalGraphEncoder`).

    The kNN edges come back ordered into ``(same micro block, same meso block only, other)`` sections, each
    rewired inside the blocks of its sources at that scale (``tile_wide``: inside the tile), with the section sizes.
    """
    local = tile_local_index(batch, num_tiles)
    ids = {s: block_ids(pos, batch, GRID[s]) for s in ("micro", "meso")}
    tile = batch.long()
    src, dst = edge_index
    if edge_sections is not None:
        group = torch.repeat_interleave(
            torch.arange(3, device=src.device), torch.as_tensor(edge_sections, device=src.device)
        )
    else:
        same_meso = ids["meso"][src] == ids["meso"][dst]
        group = 2 - same_meso.long() - (ids["micro"][src] == ids["micro"][dst]).long()
        order = torch.sort(group, stable=True).indices
        edge_index, group = edge_index[:, order], group[order]
        src = edge_index[0]
    block = torch.where(group == 0, ids["micro"][src], torch.where(group == 1, ids["meso"][src], tile[src]))
    if tile_wide:
        block = tile[src]
    edge_index = rewire_edges(edge_index, block * 3 + group, local, salt=0)
    sections = tuple(int(c) for c in torch.bincount(group, minlength=3).tolist())
    out = []
    meso_seg = tile if tile_wide else ids["meso"]
    for salt, (cand, seg) in enumerate(((cand_meso, meso_seg), (cand_macro, tile)), start=1):
        out.append(None if cand is None else rewire_edges(cand, seg[cand[0]], local, salt=salt))
    return edge_index, out[0], out[1], sections  # type: ignore[return-value]
