import pytest
import torch
from torch_geometric.nn import SAGEConv

from sigmma_sc._constants import GRID, SCALES
from sigmma_sc.nn import (
    AttentionalPooling,
    EdgeSampler,
    HierarchicalGraphEncoder,
    WeightedSAGEConv,
    same_block,
)
from sigmma_sc.nn._edges import block_ids
from sigmma_sc.nn._gnn import WeightedSAGEConv as _Conv


def _graph(n=7, e=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, n, (2, e), generator=g)


@pytest.mark.parametrize(("cin", "cout"), [(5, 3), (5, 8)])
def test_weighted_sage_matches_manual(cin, cout):
    x, ei = _graph()
    w = torch.rand(ei.shape[1])
    conv = WeightedSAGEConv(cin, cout)
    out = conv(x, ei, w)
    num = torch.zeros(7, cin).index_add_(0, ei[1], w[:, None] * x[ei[0]])
    den = torch.zeros(7).index_add_(0, ei[1], w).clamp_min(1.0)
    ref = conv.lin_l(num / den[:, None]) + conv.lin_r(x)
    assert out.shape == (7, cout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_weighted_sage_unit_weights_equal_pyg_sage_mean():
    x, ei = _graph()
    conv = WeightedSAGEConv(5, 4)
    ref = SAGEConv(5, 4, aggr="mean")
    with torch.no_grad():
        ref.lin_l.weight.copy_(conv.lin_l.weight)
        ref.lin_l.bias.copy_(conv.lin_l.bias)
        ref.lin_r.weight.copy_(conv.lin_r.weight)
    torch.testing.assert_close(conv(x, ei), ref(x, ei), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(x, ei), conv(x, ei, torch.ones(ei.shape[1])))


def test_weighted_sage_zero_weights_and_gradient():
    x, ei = _graph()
    conv = WeightedSAGEConv(5, 4)
    w0 = torch.zeros(ei.shape[1])
    torch.testing.assert_close(conv(x, ei, w0), conv.lin_l.bias + conv.lin_r(x))
    w = torch.rand(ei.shape[1], requires_grad=True)
    conv(x, ei, w).square().sum().backward()
    assert w.grad is not None
    assert w.grad.abs().sum() > 0
    conv.reset_parameters()


def test_block_ids_and_same_block():
    pos = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.1], [0.9, 0.9], [1.0, 1.0], [0.1, 0.1]])
    batch = torch.tensor([0, 0, 0, 0, 0, 1])
    micro = block_ids(pos, batch, GRID["micro"])
    assert micro[0] == micro[1] != micro[2]
    assert micro[3] == micro[4]  # pos == 1 folds into the last block
    assert micro[0] != micro[5]  # other tile
    ei = torch.tensor([[0, 0, 0, 3], [1, 2, 5, 4]])
    assert same_block(ei, pos, batch, GRID["meso"]).tolist() == [True, True, False, True]
    assert same_block(ei, pos, batch, GRID["macro"]).tolist() == [True, True, False, True]


def test_edge_sampler_symmetric_straight_through():
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 0], [1, 0, 3, 2, 5, 4, 5]])
    sampler = EdgeSampler(8, tau=0.5)
    w = sampler(h, ei)
    assert w.shape == (7,)
    assert set(w.detach().tolist()) <= {0.0, 1.0}
    assert w[0] == w[1]
    assert w[2] == w[3]
    assert w[4] == w[5]
    (w * torch.arange(7.0)).sum().backward()
    assert sampler.lin_u.weight.grad.abs().sum() > 0
    assert h.grad.abs().sum() > 0
    sampler.eval()
    s = torch.sigmoid(sampler.logits(h, ei))
    torch.testing.assert_close(sampler(h, ei), (s > 0.5).float())
    torch.testing.assert_close(sampler.logits(h, ei)[0], sampler.logits(h, ei)[1])


def test_attentional_pooling_empty_tile_is_zero():
    pool = AttentionalPooling(4)
    x = torch.randn(5, 4)
    batch = torch.tensor([0, 0, 2, 2, 2])
    z = pool(x, batch, num_tiles=4)
    assert z.shape == (4, 4)
    assert torch.isfinite(z).all()
    assert (z[1] == 0).all()
    assert (z[3] == 0).all()
    assert (pool(x[:0], batch[:0], num_tiles=2) == 0).all()


def _encoder(**kw):
    torch.manual_seed(0)
    return HierarchicalGraphEncoder(6, hidden=16, out=12, dropout=0.0, **kw)


def _run(enc, b, **kw):
    return enc(b.x, b.pos, b.batch, b.edge_index, b.cand_meso, b.cand_macro, num_tiles=b.num_tiles, **kw)


def test_encoder_shapes_and_empty_tile(toy_batch):
    out = _run(_encoder(), toy_batch)
    n, t = toy_batch.x.shape[0], toy_batch.num_tiles
    assert set(out.nodes) == set(out.pooled) == set(SCALES)
    for s in SCALES:
        assert out.nodes[s].shape == (n, 12)
        assert out.pooled[s].shape == (t, 12)
        assert torch.isfinite(out.pooled[s]).all()
        assert (out.pooled[s][-1] == 0).all()  # the toy's last tile has no cells


def test_added_edges_stay_in_their_block(toy_batch):
    enc = _encoder()
    b = toy_batch
    cross = torch.stack([torch.arange(0, 20), torch.arange(20, 40)])  # deliberately crossing candidates
    for mode in (True, False):
        enc.train(mode)
        out = enc(
            b.x, b.pos, b.batch, b.edge_index, torch.cat([b.cand_meso, cross], 1), torch.cat([b.cand_macro, cross], 1)
        )
        for s in ("meso", "macro"):
            cand, w = out.added[s]
            assert cand.shape[1] == w.shape[0] > 0
            assert same_block(cand, b.pos, b.batch, GRID[s]).all()
        ei, _ = out.graphs["micro"]
        assert same_block(ei, b.pos, b.batch, GRID["micro"]).all()
        for s in SCALES:
            ei, _ = out.graphs[s]
            assert same_block(ei, b.pos, b.batch, GRID[s]).all()


def test_gradients_reach_edge_scorer(toy_batch):
    enc = _encoder()
    enc.train()
    out = _run(enc, toy_batch)
    sum(z.square().sum() for z in out.pooled.values()).backward()
    for s in ("meso", "macro"):
        grads = [p.grad for p in enc.samplers[s].parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_eval_is_deterministic_training_is_stochastic(toy_batch):
    enc = _encoder().eval()
    a, b = _run(enc, toy_batch), _run(enc, toy_batch)
    for s in SCALES:
        torch.testing.assert_close(a.pooled[s], b.pooled[s], rtol=0, atol=0)
    enc.train()
    torch.manual_seed(1)
    w1 = _run(enc, toy_batch).added["meso"][1]
    torch.manual_seed(2)
    w2 = _run(enc, toy_batch).added["meso"][1]
    assert not torch.equal(w1, w2)


def test_no_edge_addition_uses_fixed_block_graphs(toy_batch):
    enc = _encoder(edge_addition=False)
    assert len(enc.samplers) == 0
    assert not any("sampler" in name for name, _ in enc.named_parameters())
    b = toy_batch
    out = _run(enc, b)
    assert out.added == {}
    for s in SCALES:
        ei, w = out.graphs[s]
        ref = b.edge_index[:, same_block(b.edge_index, b.pos, b.batch, GRID[s])]
        assert torch.equal(ei, ref)
        assert (w == 1).all()
    # candidates are ignored
    out2 = enc(b.x, b.pos, b.batch, b.edge_index, None, None, num_tiles=b.num_tiles)
    torch.testing.assert_close(out.pooled["macro"], out2.pooled["macro"])


def test_use_graph_false_ignores_graph(toy_batch, monkeypatch):
    enc = _encoder(use_graph=False)
    assert not hasattr(enc, "convs")

    def boom(*args, **kwargs):
        raise AssertionError("the GNN must not run")

    monkeypatch.setattr(_Conv, "forward", boom)
    b = toy_batch
    out = _run(enc, b)
    empty = torch.empty(2, 0, dtype=torch.long)
    out2 = enc(b.x, b.pos, b.batch, empty, None, None, num_tiles=b.num_tiles)
    for s in SCALES:
        assert out.pooled[s].shape == (b.num_tiles, 12)
        torch.testing.assert_close(out.pooled[s], out2.pooled[s])
        assert out.pooled[s] is out.pooled["micro"]
    assert out.graphs == {}


def test_single_scale_returns_only_that_scale(toy_batch):
    enc = _encoder(scales=("macro",))
    out = _run(enc, toy_batch)
    assert set(out.nodes) == set(out.pooled) == {"macro"}
    assert set(enc.pools) == {"macro"}
    enc_micro = _encoder(scales=["micro"])
    assert len(enc_micro.samplers) == 0
    assert set(enc_micro.convs) == {"micro"}
    with pytest.raises(ValueError, match="subset"):
        _encoder(scales=("nano",))


def test_weighted_sage_node_without_sampled_edge_has_bounded_gradient():
    """A node whose incoming weights are all 0, or that has no incoming edge, aggregates 0; the gradient of its
    output with respect to an incoming weight is the neighbour's message (the effect of switching it on), not 1/eps."""
    x = torch.randn(5, 3)
    ei = torch.tensor([[1, 2, 3, 4], [0, 0, 1, 1]])  # node 0: two zero-weight edges; node 2: no incoming edge
    conv = WeightedSAGEConv(3, 4)
    w = torch.tensor([0.0, 0.0, 1.0, 0.0], requires_grad=True)
    x.requires_grad_(True)
    out = conv(x, ei, w)
    torch.testing.assert_close(out[[0, 2]], conv.lin_l.bias + conv.lin_r(x[[0, 2]]))
    torch.testing.assert_close(out[1], conv.lin_l(x[3]) + conv.lin_r(x[1]))  # mean over the sampled edge only
    v = torch.randn(4)
    (out[0] @ v).backward()
    ref = torch.stack([x[1], x[2], x[3], x[4]]).detach() @ conv.lin_l.weight.T @ v
    torch.testing.assert_close(w.grad[:2], ref[:2])  # d out_0 / d w_j0 = W_l x_j
    assert (w.grad[2:] == 0).all()
    assert (x.grad[[1, 2]] == 0).all()  # no gradient into the features of unsampled neighbours


def _grads(toy_batch, hard, *, masked, monkeypatch):
    """Gradients of a pooled loss with straight-through edge weights of value ``hard(n_edges)``; ``masked``: the
    reference that drops the zero-weight edges (same samples). Cells 0-5 are isolated (no edge, no candidate)."""

    def forward(self, h, edge_index):
        soft = torch.sigmoid(self.logits(h, edge_index))
        return hard(soft.numel()) - soft.detach() + soft

    conv_forward = _Conv.forward

    def dropped(self, x, edge_index, edge_weight=None):
        if edge_weight is not None:
            nz = edge_weight.detach() != 0
            edge_index, edge_weight = edge_index[:, nz], edge_weight[nz]
        return conv_forward(self, x, edge_index, edge_weight)

    b = toy_batch
    isolated = torch.arange(6)
    keep = lambda e: e[:, ~(torch.isin(e[0], isolated) | torch.isin(e[1], isolated))]
    with monkeypatch.context() as m:
        m.setattr(EdgeSampler, "forward", forward)
        if masked:
            m.setattr(_Conv, "forward", dropped)
        enc = _encoder().train()
        out = enc(b.x, b.pos, b.batch, keep(b.edge_index), keep(b.cand_meso), keep(b.cand_macro), num_tiles=b.num_tiles)
        sum(z.square().sum() for z in out.pooled.values()).backward()
    return {n: p.grad for n, p in enc.named_parameters()}


@pytest.mark.parametrize("samples", ["random", "all_zero"])
def test_gradients_match_masked_reference(toy_batch, monkeypatch, samples):
    """Isolated cells and unsampled candidates: every gradient is finite and within a small factor of the same loss
    computed with the zero-weight edges removed (the former 1 / 1e-6 normalisation was 1e3-1e7x off here)."""
    gen = torch.Generator()
    if samples == "all_zero":
        hard = lambda n: torch.zeros(n)
    else:
        hard = lambda n: (torch.rand(n, generator=gen) < 0.3).float()
    gen.manual_seed(0)
    ours = _grads(toy_batch, hard, masked=False, monkeypatch=monkeypatch)
    gen.manual_seed(0)
    ref = _grads(toy_batch, hard, masked=True, monkeypatch=monkeypatch)
    scale = max(g.norm() for g in ref.values() if g is not None)
    for name, g in ours.items():
        assert g is not None, name
        assert torch.isfinite(g).all(), name
        r = ref[name] if ref[name] is not None else torch.zeros_like(g)
        if "samplers" in name:  # the estimator also scores the unsampled candidates, which the reference lacks
            assert g.norm() <= 20 * max(r.norm(), 1e-3 * scale), name
            if samples == "random":
                assert g.norm() >= r.norm() / 20, name
        else:
            assert r.norm() / 1.5 <= g.norm() <= 1.5 * r.norm() + 1e-6 * scale, name


def test_edge_sampler_last_stats(toy_batch):
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 0], [1, 0, 3, 2, 5, 4, 5]])
    sampler = EdgeSampler(8)
    assert sampler.last_stats is None
    w = sampler(h, ei)
    stats = sampler.last_stats
    assert set(stats) == {"sampled", "prob", "candidates"}
    assert stats["candidates"] == 7
    assert isinstance(stats["candidates"], int)
    for key in ("sampled", "prob"):
        assert isinstance(stats[key], torch.Tensor)
        assert stats[key].shape == ()
        assert stats[key].dtype == torch.float32
        assert not stats[key].requires_grad
    torch.testing.assert_close(stats["sampled"], w.detach().mean())
    torch.testing.assert_close(stats["prob"], torch.sigmoid(sampler.logits(h, ei)).mean().detach())
    sampler.eval()
    sampler(h, ei[:, :2])
    assert sampler.last_stats is stats  # evaluation passes do not overwrite the training statistics
    sampler.train()
    sampler(h, ei[:, :0])
    assert sampler.last_stats["candidates"] == 0
    assert float(sampler.last_stats["sampled"]) == float(sampler.last_stats["prob"]) == 0.0
    # inside the encoder: one record per scale with edge addition, on the candidates after the block mask
    enc = _encoder().train()
    out = _run(enc, toy_batch)
    for s in ("meso", "macro"):
        cand, w = out.added[s]
        assert enc.samplers[s].last_stats["candidates"] == cand.shape[1]
        torch.testing.assert_close(enc.samplers[s].last_stats["sampled"], w.detach().mean())


def test_tile_graph_is_one_gnn_over_the_plain_knn_graph(toy_batch):
    enc = _encoder(graph="tile", scales=("macro",), edge_addition=False)
    b = toy_batch
    assert set(enc.convs) == set(enc.pools) == {"macro"}
    assert len(enc.samplers) == 0
    assert len(enc.convs["macro"]) == 2
    assert enc.convs["macro"][0].in_channels == 6  # straight from the node features
    # the toy's kNN graph crosses micro and meso blocks: the tile graph keeps all of it
    assert not same_block(b.edge_index, b.pos, b.batch, GRID["meso"]).all()
    for out in (_run(enc, b), enc(b.x, b.pos, b.batch, b.edge_index, None, None, num_tiles=b.num_tiles)):
        assert set(out.nodes) == set(out.pooled) == set(out.graphs) == {"macro"}
        assert out.added == {}
        assert out.nodes["macro"].shape == (b.x.shape[0], 12)
        assert out.pooled["macro"].shape == (b.num_tiles, 12)
        ei, w = out.graphs["macro"]
        assert torch.equal(ei, b.edge_index)
        assert (w == 1).all()
    # the same as two plain SAGE layers over the kNN graph, then attention pooling
    enc.eval()
    h = b.x
    for conv in enc.convs["macro"]:
        h = enc.act(conv(h, b.edge_index))
    ref = enc.pools["macro"](h, b.batch, b.num_tiles)
    torch.testing.assert_close(_run(enc, b).pooled["macro"], ref)
    # the sliced path of TrainingBundle.select gives the same graph as the masked one
    sliced = _run(enc, b, edge_sections=b.edge_sections, candidates_in_blocks=True)
    torch.testing.assert_close(sliced.pooled["macro"], ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"graph": "knn"}, "one of"),
        ({"graph": "tile"}, "scales=\\('macro',\\)"),
        ({"graph": "tile", "scales": ("macro",)}, "edge_addition=False"),
        ({"graph": "tile", "scales": ("macro",), "edge_addition": False, "use_graph": False}, "use_graph"),
    ],
)
def test_graph_switch_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _encoder(**kwargs)


# ---------------------------------------------------------------------- edge controls (issue 26)
@pytest.mark.parametrize("edge_addition", [True, False])
def test_no_edges_control_has_no_message_passing(toy_batch, edge_addition):
    """``edges="none"``: the output is the spatial network's on an empty graph (same weights), so no message passes."""
    b = toy_batch
    none = _encoder(edges="none", edge_addition=edge_addition).eval()
    spatial = _encoder(edge_addition=edge_addition).eval()
    spatial.load_state_dict(none.state_dict())  # the same parameters: the control changes only the edges
    empty = torch.empty(2, 0, dtype=torch.long)
    ref = spatial(b.x, b.pos, b.batch, empty, empty, empty, num_tiles=b.num_tiles)
    with_graph = _run(spatial, b)
    for kw in ({}, {"edge_sections": b.edge_sections, "candidates_in_blocks": True}):
        out = _run(none, b, **kw)
        for s in SCALES:
            torch.testing.assert_close(out.pooled[s], ref.pooled[s], rtol=0, atol=0)
            assert out.graphs[s][0].shape[1] == 0
        assert not torch.allclose(out.pooled["macro"], with_graph.pooled["macro"])  # the graph did matter
    # a cell's embedding depends on its own features only
    x2 = b.x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    out2 = none(x2, b.pos, b.batch, b.edge_index, b.cand_meso, b.cand_macro, num_tiles=b.num_tiles)
    torch.testing.assert_close(out2.nodes["macro"][0], _run(none, b).nodes["macro"][0])


def _degrees(ei, n):
    return torch.bincount(ei[0], minlength=n), torch.bincount(ei[1], minlength=n)


def test_rewire_edges_keeps_degrees_and_segments():
    from sigmma_sc.nn._edges import rewire_edges

    g = torch.Generator().manual_seed(0)
    n = 60
    seg_of_node = torch.randint(0, 4, (n,), generator=g)
    src, dst = torch.randint(0, n, (2, 400), generator=g)
    keep = (seg_of_node[src] == seg_of_node[dst]) & (src != dst)
    ei = torch.stack([src[keep], dst[keep]])
    out = rewire_edges(ei, seg_of_node[ei[0]], torch.arange(n))
    assert torch.equal(out[0], ei[0])  # same sources, same order
    for a, b in zip(_degrees(out, n), _degrees(ei, n), strict=True):
        assert torch.equal(a, b)
    assert (seg_of_node[out[0]] == seg_of_node[out[1]]).all()  # targets stay in the segment
    assert (out[0] == out[1]).float().mean() < 0.02  # self loops swapped away
    overlap = torch.isin(out[0] * n + out[1], ei[0] * n + ei[1]).float().mean()
    assert overlap < 0.5  # rewired, not the same graph
    assert torch.equal(rewire_edges(ei, seg_of_node[ei[0]], torch.arange(n)), out)  # deterministic
    assert not torch.equal(rewire_edges(ei, seg_of_node[ei[0]], torch.arange(n), salt=3), out)


def test_rewired_control_keeps_degrees_blocks_and_is_batch_independent(toy_batch):
    b = toy_batch
    n = b.x.shape[0]
    enc = _encoder(edges="rewired").eval()
    spatial = _encoder().eval()
    ref = _run(spatial, b)
    for kw in ({}, {"edge_sections": b.edge_sections, "candidates_in_blocks": True}):
        out = _run(enc, b, **kw)
        for s in SCALES:
            ei, _ = out.graphs[s]
            ref_ei, _ = ref.graphs[s]
            assert same_block(ei, b.pos, b.batch, GRID[s]).all()
            if s == "micro":  # fixed edges: exactly the same degrees, other partners
                for a, c in zip(_degrees(ei, n), _degrees(ref_ei, n), strict=True):
                    assert torch.equal(a, c)
                # the toy's micro blocks hold 2-4 cells, so many rewired edges coincide with original ones
                assert not torch.isin(ei[0] * n + ei[1], ref_ei[0] * n + ref_ei[1]).all()
        for s in ("meso", "macro"):  # the candidates: same degrees, same blocks
            cand, _ = out.added[s]
            ref_cand, _ = ref.added[s]
            for a, c in zip(_degrees(cand, n), _degrees(ref_cand, n), strict=True):
                assert torch.equal(a, c)
    sliced = _run(enc, b, edge_sections=b.edge_sections, candidates_in_blocks=True)
    torch.testing.assert_close(_run(enc, b).pooled["macro"], sliced.pooled["macro"])
    # a tile's rewired graph does not depend on the other tiles of the batch
    from _toy import toy_bundle

    bundle = toy_bundle(n_tiles=12, n_features=6, image_dim=10, n_empty=1, seed=1)
    full = bundle.select(torch.arange(bundle.n_tiles))
    part = bundle.select(torch.tensor([5, 2]))
    a = enc(*tuple(full)[:6], num_tiles=full.num_tiles, edge_sections=full.edge_sections, candidates_in_blocks=True)
    c = enc(*tuple(part)[:6], num_tiles=part.num_tiles, edge_sections=part.edge_sections, candidates_in_blocks=True)
    torch.testing.assert_close(c.pooled["macro"], a.pooled["macro"][[5, 2]], rtol=1e-5, atol=1e-6)


def _segregated_tiles(n_tiles=3, side=12, k=6):
    """Tiles of ``side x side`` cells on a jittered grid, type 0 on the left half and type 1 on the right; 6-NN edges
    (both directions) and the candidates of the bundle's rule (k nearest in the meso block / tile)."""
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    pos, batch, types, edges, cands = [], [], [], [], {"meso": [], "macro": []}
    for t in range(n_tiles):
        p = ((grid + 0.5 + 0.3 * (torch.rand(grid.shape, generator=g) - 0.5)) / side).clamp(0, 0.999)
        off = t * p.shape[0]
        d = torch.cdist(p, p) + torch.eye(p.shape[0]) * 10
        nn_ = d.topk(k, largest=False).indices
        src = torch.arange(p.shape[0]).repeat_interleave(k)
        edges.append(torch.stack([src, nn_.flatten()]) + off)
        for s, gsize in (("meso", GRID["meso"]), ("macro", 1)):
            blk = torch.floor(p * gsize).long().clamp(0, gsize - 1)
            same = (blk[:, None] == blk[None]).all(-1)
            dc = torch.where(same, d, torch.full_like(d, 100.0))
            far = dc.topk(2 * k, largest=False).indices[:, k:]  # beyond the kNN, inside the block
            cands[s].append(torch.stack([src, far.flatten()]) + off)
        pos.append(p)
        batch.append(torch.full((p.shape[0],), t))
        types.append((p[:, 0] >= 0.5).long())
    return (torch.cat(pos), torch.cat(batch), torch.cat(types), torch.cat(edges, 1),
            torch.cat(cands["meso"], 1), torch.cat(cands["macro"], 1))  # fmt: skip


def test_rewired_tile_removes_arrangement_the_in_block_rewiring_keeps():
    """On segregated tiles (left half one type, right half the other), the in-block rewiring keeps the micro graph
    homotypic (arrangement kept); the tile-wide rewiring makes about half of every edge set heterotypic, as
    random partners in the tile would, with every degree and the section sizes kept and every edge in its tile."""
    pos, batch, types, ei, cm, cM = _segregated_tiles()
    n = pos.shape[0]
    x = torch.nn.functional.one_hot(types, 6).float()
    hetero = {}
    for edges in ("spatial", "rewired", "rewired_tile"):
        enc = _encoder(edges=edges).eval()
        out = enc(x, pos, batch, ei, cm, cM, num_tiles=3)
        ref = _encoder().eval()(x, pos, batch, ei, cm, cM, num_tiles=3)
        for s in SCALES:
            g_ei, _ = out.graphs[s]
            r_ei, _ = ref.graphs[s]
            assert g_ei.shape == r_ei.shape
            assert (batch[g_ei[0]] == batch[g_ei[1]]).all()  # never leaves the tile
            hetero[edges, s] = float((types[g_ei[0]] != types[g_ei[1]]).float().mean())
        micro, ref_micro = out.graphs["micro"][0], ref.graphs["micro"][0]
        for a, c in zip(_degrees(micro, n), _degrees(ref_micro, n), strict=True):
            assert torch.equal(a, c)
        for s in ("meso", "macro"):
            for a, c in zip(_degrees(out.added[s][0], n), _degrees(ref.added[s][0], n), strict=True):
                assert torch.equal(a, c)
        if edges == "rewired_tile":
            assert not same_block(micro, pos, batch, GRID["micro"]).all()  # out of the blocks
            assert (micro[0] != micro[1]).float().mean() > 0.98
    for s in SCALES:
        assert hetero["spatial", s] < 0.1
        assert hetero["rewired", "micro"] < 0.1  # inside a micro block the partners keep their type
        assert 0.35 < hetero["rewired_tile", s] < 0.65  # random partners in the tile: about half heterotypic
    # a fixed draw per tile: the same graph in every pass
    enc_tile = _encoder(edges="rewired_tile").eval()
    out = enc_tile(x, pos, batch, ei, cm, cM, num_tiles=3)
    again = enc_tile(x, pos, batch, ei, cm, cM, num_tiles=3)
    torch.testing.assert_close(out.pooled["macro"], again.pooled["macro"])  # a fixed draw


def test_edges_switch_errors():
    with pytest.raises(ValueError, match="one of"):
        _encoder(edges="random")
    with pytest.raises(ValueError, match="use_graph"):
        _encoder(edges="none", use_graph=False)
    with pytest.raises(ValueError, match="use_graph"):
        _encoder(edges="rewired_tile", use_graph=False)


def test_tau_changes_the_gradient_not_the_sampled_edges():
    """``tau_e`` shapes the straight-through gradient only: the same noise samples the same edges at any tau."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 8, generator=g)
    ei = torch.randint(0, 30, (2, 200), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    weights, grads = [], []
    for tau in (0.1, 1.0, 10.0):
        torch.manual_seed(0)
        s = EdgeSampler(8, tau=tau)
        s.train()
        hh = h.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same Gumbel noise
        w = s(hh, ei)
        w.sum().backward()
        weights.append(w.detach())
        grads.append(hh.grad.clone())
    assert torch.equal(weights[0], weights[1])
    assert torch.equal(weights[1], weights[2])
    assert not torch.allclose(grads[0], grads[1])
    assert not torch.allclose(grads[1], grads[2])
    # the sampled fraction follows the edge probability s_uv (a Bernoulli draw), whatever tau
    s = EdgeSampler(8, tau=0.05).train()
    prob = torch.sigmoid(s.logits(h, ei)).detach()
    draws = torch.stack([s(h, ei).detach() for _ in range(400)])
    assert (draws.mean(0) - prob).abs().max() < 0.1


def test_evaluation_threshold_or_expected_weights():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 8, generator=g)
    ei = torch.randint(0, 30, (2, 300), generator=g)
    torch.manual_seed(0)
    thr = EdgeSampler(8).eval()
    torch.manual_seed(0)
    exp = EdgeSampler(8, evaluation="expected").eval()
    prob = torch.sigmoid(thr.logits(h, ei)).detach()
    # an untrained scorer: probabilities near 0.5, the threshold keeps an arbitrary subset, "expected" weighs all
    assert ((prob - 0.5).abs() < 0.1).float().mean() > 0.9
    kept = thr(h, ei)
    assert 0.05 < kept.mean() < 0.95
    torch.testing.assert_close(kept, (prob > 0.5).float())
    torch.testing.assert_close(exp(h, ei), prob)
    with pytest.raises(ValueError, match="evaluation"):
        EdgeSampler(8, evaluation="mean")
    enc = _encoder(edge_evaluation="expected")
    assert all(s.evaluation == "expected" for s in enc.samplers.values())
