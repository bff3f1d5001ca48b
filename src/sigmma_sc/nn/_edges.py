"""Block ids, edge masks and the stochastic edge sampler of the hierarchical ST encoder.

Pure torch. A cell's *block* at a scale is the cell of a ``g x g`` grid over its tile
(``g = GRID[scale]``: 4 micro, 2 meso, 1 macro) that contains it; block ``(bx, by)`` covers
``x in [bx / g, (bx + 1) / g)`` and ``y in [by / g, (by + 1) / g)`` of the tile (positions are
fractions of the tile side). The neighbour-patch constraint of the paper (§3.2) allows an edge
at a scale only between cells of the same block at that scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._constants import GRID


def block_ids(pos: Tensor, batch: Tensor, grid: int) -> Tensor:
    """Global block id of every cell on a ``grid x grid`` partition of its tile.

    Parameters
    ----------
    pos
        ``(N, 2)`` position ``(x, y)`` of each cell inside its tile, as a fraction of the tile side
        in ``[0, 1]`` (1 is folded into the last block).
    batch
        ``(N,)`` tile index of each cell.
    grid
        Blocks per tile side (``GRID[scale]``).

    Returns
    -------
    ``(N,)`` int64 id, equal for two cells exactly when they share the tile and the block.

    Notes
    -----
    The same map as ``sigmma_sc.data._geometry.block_ids`` (numpy, from coordinates, which ``sg.pp.tile``
    writes) except for points closer to a block border than float32 resolves (``tests/data/test_records.py``).
    """
    b = torch.floor(pos * grid).long().clamp_(0, grid - 1)
    return (batch.long() * grid + b[:, 1]) * grid + b[:, 0]


def same_block(edge_index: Tensor, pos: Tensor, batch: Tensor, grid: int) -> Tensor:
    """Boolean ``(E,)`` mask of the edges whose two ends share a block on a ``grid x grid`` partition."""
    ids = block_ids(pos, batch, grid)
    return ids[edge_index[0]] == ids[edge_index[1]]


def scale_mask(edge_index: Tensor, pos: Tensor, batch: Tensor, scale: str) -> Tensor:
    """Mask of the edges allowed at ``scale`` (same tile and same block at that scale)."""
    return same_block(edge_index, pos, batch, GRID[scale])


def pair_ids(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Undirected pair id ``min(u, v) * num_nodes + max(u, v)`` of every edge (equal for ``u->v`` and ``v->u``)."""
    lo = torch.minimum(edge_index[0], edge_index[1])
    hi = torch.maximum(edge_index[0], edge_index[1])
    return lo * num_nodes + hi


def _pair_uniform(key: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform draws in ``[0, 1)``, one per distinct value of ``key``, shared by the entries with that value.

    Sort-based, with static shapes only (unlike ``torch.unique``, no device-to-host synchronisation): one draw
    per entry in sorted order, and each run of equal keys takes the draw of its first entry.
    """
    n = key.numel()
    sorted_key, order = torch.sort(key, stable=True)
    pos = torch.arange(n, device=key.device)
    start = torch.ones(n, dtype=torch.bool, device=key.device)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(0).values
    u = torch.rand(n, device=key.device, dtype=dtype)
    return torch.empty_like(u).index_put_((order,), u[first])


EDGE_EVALUATION = ("threshold", "expected")


class EdgeSampler(nn.Module):
    r"""Score candidate edges and sample them with the Gumbel-sigmoid straight-through estimator.

    The score of a candidate pair is :math:`s_{uv} = \sigma(\mathrm{MLP}([h_u, h_v]))` (paper §3.2),
    symmetrised as the mean of the MLP logits of ``[h_u, h_v]`` and ``[h_v, h_u]`` so that ``u->v`` and
    ``v->u`` get the same score. The first MLP layer is applied per node and gathered per edge
    (``W [h_u, h_v] = W_a h_u + W_b h_v``), so no ``(E, 2 * in_channels)`` tensor is built.

    Training: binary Concrete / Gumbel-sigmoid sample with logistic noise ``g`` shared by the two
    directions of a pair, ``soft = sigmoid((logit + g) / tau)``, ``hard = 1[soft > 0.5]``, and the
    returned weight is ``hard - soft.detach() + soft`` (value ``hard``, gradient of ``soft``).
    ``hard = 1[logit + g > 0]`` does not depend on ``tau``: at any temperature an edge is sampled on with
    probability exactly ``s_uv`` (a Bernoulli draw, as the paper's §3.2 states); ``tau`` only sets how sharp the
    surrogate ``soft`` is, i.e. the straight-through gradient (low ``tau``: large gradients near the decision,
    small elsewhere; high ``tau``: smaller, smoother gradients).

    Evaluation is deterministic: ``evaluation="threshold"`` (default) keeps an edge when ``s_uv > 0.5`` (the
    most likely sample of each edge; when the scorer has not learned, ``s_uv`` is close to 0.5 everywhere and
    which candidates pass is decided by small differences of an untrained network), ``evaluation="expected"``
    weights every candidate by ``s_uv``, the expected value of its training-time sample (an untrained scorer
    then gives every candidate about half weight instead of keeping an arbitrary half).

    Monitoring: after every forward pass in training mode, :attr:`last_stats` holds
    ``{"sampled": fraction of the candidate edges sampled on, "prob": mean s_uv, "candidates": number of
    candidate edges}``; the first two are detached 0-dim float32 tensors on the input's device (reading them
    is the caller's choice of when to synchronise), the last an ``int`` known from the shapes. Without
    candidates both fractions are 0. Evaluation passes leave it unchanged.

    Parameters
    ----------
    in_channels
        Width of the node embeddings ``h``.
    hidden_channels
        Width of the scorer's hidden layer (default ``max(in_channels // 4, 16)``).
    tau
        Temperature ``tau_e`` of the Gumbel-sigmoid (the straight-through gradient only, see above).
    evaluation
        ``"threshold"`` or ``"expected"``: the edge weights of an evaluation pass (see above).

    Shapes
    ------
    - input: node embeddings ``(N, in_channels)``, candidate edges ``(2, E_c)``
    - output: edge weights ``(E_c,)`` in ``{0, 1}`` (forward value)

    Attributes
    ----------
    last_stats
        Edge statistics of the last training-mode forward pass (``None`` before the first one).
    """

    def __init__(
        self, in_channels: int, hidden_channels: int | None = None, *, tau: float = 1.0, evaluation: str = "threshold"
    ):
        super().__init__()
        hidden_channels = hidden_channels or max(in_channels // 4, 16)
        if tau <= 0:
            raise ValueError(f"The edge temperature tau must be positive, got {tau}.")
        if evaluation not in EDGE_EVALUATION:
            raise ValueError(f"`evaluation` must be one of {EDGE_EVALUATION}, got {evaluation!r}.")
        self.tau = float(tau)
        self.evaluation = evaluation
        self.lin_u = nn.Linear(in_channels, hidden_channels)
        self.lin_v = nn.Linear(in_channels, hidden_channels, bias=False)
        self.act = nn.LeakyReLU()
        self.out = nn.Linear(hidden_channels, 1)
        self.last_stats: dict[str, Tensor | int] | None = None

    def reset_parameters(self) -> None:
        """Re-initialise the scorer."""
        for lin in (self.lin_u, self.lin_v, self.out):
            lin.reset_parameters()

    def logits(self, h: Tensor, edge_index: Tensor) -> Tensor:
        """Symmetric edge logits ``(E_c,)`` (``sigmoid`` of them is ``s_uv``)."""
        a, b = self.lin_u(h), self.lin_v(h)
        src, dst = edge_index[0], edge_index[1]
        fwd = self.out(self.act(a[src] + b[dst]))
        bwd = self.out(self.act(a[dst] + b[src]))
        return (0.5 * (fwd + bwd)).squeeze(-1)

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        """Sampled weights of the candidate edges (straight-through in training, thresholded in eval)."""
        logit = self.logits(h, edge_index)
        if not self.training:
            if self.evaluation == "expected":
                return torch.sigmoid(logit)  # the expected value of the training-time sample
            return (logit > 0).to(logit.dtype)  # sigmoid(logit) > 0.5
        if logit.numel() == 0:
            zero = logit.new_zeros((), dtype=torch.float32).detach()
            self.last_stats = {"sampled": zero, "prob": zero.clone(), "candidates": 0}
            return logit
        # the noise and the sample in float32 even under autocast (bf16 would quantise the logistic noise)
        u = _pair_uniform(pair_ids(edge_index, h.shape[0]), torch.float32).clamp_(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((logit.float() + noise) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        self.last_stats = {
            "sampled": hard.mean().detach(),
            "prob": torch.sigmoid(logit.detach().float()).mean(),
            "candidates": int(edge_index.shape[1]),
        }
        return hard - soft.detach() + soft


def _mix31(a: Tensor) -> Tensor:
    """A deterministic integer hash of int64 values into ``[0, 2**31)`` (two rounds of xor-shift-multiply)."""
    a = a & 0xFFFFFFFF
    a = ((a ^ (a >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    a = ((a ^ (a >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (a ^ (a >> 16)) & 0x7FFFFFFF


def tile_local_index(batch: Tensor, num_tiles: int) -> Tensor:
    """Each cell's row inside its own tile (``0 .. n_t - 1``), for cells ordered by tile (as a batch holds them)."""
    n = batch.numel()
    idx = torch.arange(n, device=batch.device)
    first = torch.full((max(num_tiles, 1),), n, dtype=torch.long, device=batch.device)
    first = first.scatter_reduce(0, batch.long(), idx, reduce="amin", include_self=True)
    return idx - first[batch.long()]


def rewire_edges(edge_index: Tensor, segment: Tensor, local: Tensor, *, salt: int = 0) -> Tensor:
    """Degree-preserving random rewiring of directed edges inside segments (the rewired-edges control).

    The targets of the edges of each segment are permuted among those edges, so every node keeps its out-degree
    and its in-degree within each segment, and a rewired edge stays inside the segment's block when every
    original edge of the segment lies in that block (segments are blocks of the edges' sources). The
    permutation is a fixed function of each edge's tile-local end points (``local``, from
    :func:`tile_local_index`) and ``salt``, so a tile gets the same rewired graph in every batch, in training
    and at inference, whatever the other tiles of the batch. Self loops that the permutation creates are
    swapped away with another edge of the segment where possible (degrees still kept); the few that remain (a
    segment whose edges all lead to one node, say) are kept.

    Parameters
    ----------
    edge_index
        ``(2, E)`` edges (messages flow ``edge_index[0] -> edge_index[1]``).
    segment
        ``(E,)`` int64 segment of each edge (e.g. ``(kind, block of the source)``); targets move only within one.
    local
        ``(N,)`` tile-local row of each node.
    salt
        Changes the permutation (one value per edge set, so that two sets are rewired independently).

    Returns
    -------
    ``(2, E)`` rewired edges: the same sources in the same order, permuted targets.
    """
    e = edge_index.shape[1]
    if e < 2:
        return edge_index
    src, dst = edge_index[0], edge_index[1]
    key = _mix31(local[src] * 1_000_003 + local[dst] * 7919 + int(salt) * 104_729 + 12_345)
    seg_order = torch.sort(segment * (2**31) + torch.arange(e, device=src.device), stable=True).indices
    rnd_order = torch.sort(segment * (2**31) + key, stable=True).indices
    new_dst = torch.empty_like(dst)
    new_dst[seg_order] = dst[rnd_order]
    # swap self loops with another edge of the segment (positions in segment order; a few offsets)
    seg_sorted = segment[seg_order]
    start_flag = torch.ones(e, dtype=torch.bool, device=src.device)
    start_flag[1:] = seg_sorted[1:] != seg_sorted[:-1]
    pos = torch.arange(e, device=src.device)
    seg_start = torch.where(start_flag, pos, torch.zeros_like(pos)).cummax(0).values
    seg_size = torch.bincount(torch.cumsum(start_flag.long(), 0) - 1)[torch.cumsum(start_flag.long(), 0) - 1]
    s_sorted = src[seg_order]
    for offset in (1, 2, 3, 5, 8):
        d_sorted = new_dst[seg_order]
        loop = s_sorted == d_sorted
        if not bool(loop.any()):
            break
        p = torch.nonzero(loop & (seg_size > offset)).flatten()
        q = seg_start[p] + (p - seg_start[p] + offset) % seg_size[p]
        ok = ~loop[q] & (d_sorted[q] != s_sorted[p]) & (s_sorted[q] != s_sorted[p])
        p, q = p[ok], q[ok]
        d_sorted[p], d_sorted[q] = d_sorted[q].clone(), d_sorted[p].clone()
        new_dst[seg_order] = d_sorted
    return torch.stack([src, new_dst])
