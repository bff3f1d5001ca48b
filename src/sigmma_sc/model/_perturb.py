"""Perturbed copies of a bundle's cell graphs, to test at inference time what a trained ST encoder relies on.

Pure torch + numpy. Each perturbation returns a new :class:`~sigmma_sc.model.TrainingBundle` (the input is
left unchanged) that :meth:`~sigmma_sc.model.SigmmaModel.encode_st` embeds like any other:

``"permute_features"``
    The node features are permuted among the cells of each tile: every tile keeps exactly its multiset of
    feature rows (its composition), positions and edges stay, so which cell sits next to which is scrambled.
``"no_edges"``
    Every edge is removed: the kNN edges and the candidate edges of edge addition.
``"rewire"``
    Edges are rewired at random by degree-preserving swaps, inside the region where the model allows them, so
    that every cell keeps its degree in each graph the model builds: kNN edges within one micro block are swapped
    with kNN edges of the same micro block, kNN edges between micro blocks of one meso block with those of the
    same meso block (and stay between micro blocks), the other kNN edges within the tile (staying between meso
    blocks); one-way kNN edges ``a->b, c->d`` become ``a->d, c->b`` and mutual pairs (``a->b`` and ``b->a``) are
    swapped as pairs with other mutual pairs, so in- and out-degrees and the number of neighbours are kept. The candidate
    edges of edge addition are swapped the same way as undirected pairs, within their meso block (``cand_meso``)
    or tile (``cand_macro``). A swap that would create a self loop or a pair already present anywhere is
    rejected. In small dense blocks few swaps are possible; :func:`perturb_bundle` reports the fraction of
    edges that changed.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from .._constants import GRID
from ..nn._edges import block_ids
from ._bundle import TrainingBundle

PERTURBATIONS: tuple[str, ...] = ("permute_features", "no_edges", "rewire")


def subset_bundle(bundle: TrainingBundle, tile_idx) -> TrainingBundle:
    """A bundle of the tiles ``tile_idx`` only (in that order), e.g. the test tiles, on the CPU.

    Parameters
    ----------
    bundle
        The full bundle.
    tile_idx
        ``(B,)`` tile indices without repeats.

    Returns
    -------
    The bundle of those tiles (edges, candidates, image features, split and meta kept).
    """
    idx = torch.as_tensor(np.asarray(tile_idx), dtype=torch.long).reshape(-1)
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("`tile_idx` must not repeat tiles.")
    b = bundle.to("cpu", tiles=False).select(idx)
    counts = torch.bincount(b.batch, minlength=b.num_tiles)
    return TrainingBundle(
        x=b.x,
        cell_ptr=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        pos=b.pos,
        edge_index=b.edge_index,
        cand_meso=b.cand_meso,
        cand_macro=b.cand_macro,
        image_features=b.image_features,
        split=bundle.split.cpu()[idx],
        meta=dict(bundle.meta),
    )


def _swap(
    edges: np.ndarray,
    region: np.ndarray,
    *,
    directed: bool,
    allowed,
    taken: Counter,
    rng: np.random.Generator,
    rounds: int,
) -> np.ndarray:
    """Degree-preserving double-edge swaps of ``edges`` (``(E, 2)``), only between edges of the same ``region``."""
    out = edges.copy()
    groups = defaultdict(list)
    for i, r in enumerate(region.tolist()):
        groups[r].append(i)
    for members in groups.values():
        m = len(members)
        if m < 2:
            continue
        members = np.asarray(members)
        for _ in range(rounds * m):
            i, j = members[rng.integers(m)], members[rng.integers(m)]
            if i == j:
                continue
            a, b = out[i]
            c, d = out[j]
            if not directed and rng.random() < 0.5:  # undirected: either of the two re-pairings
                c, d = d, c
            new1, new2 = (a, d), (c, b)
            if a == d or c == b or new1 == new2 or (not directed and new1 == new2[::-1]):
                continue
            k1, k2 = (min(new1), max(new1)), (min(new2), max(new2))
            if k1 in taken or k2 in taken or not (allowed(*new1) and allowed(*new2)):
                continue
            for old in ((min(a, b), max(a, b)), (min(c, d), max(c, d))):  # a count: a->b and b->a share a pair
                taken[old] -= 1
                if taken[old] <= 0:
                    del taken[old]
            taken.update((k1, k2))
            out[i], out[j] = new1, new2
    return out


def _undirected(ei: torch.Tensor) -> np.ndarray:
    e = ei.numpy().T
    return e[e[:, 0] < e[:, 1]]


def perturb_bundle(
    bundle: TrainingBundle, kind: str, *, seed: int = 0, rounds: int = 10
) -> tuple[TrainingBundle, float]:
    """A copy of ``bundle`` with its cell graphs perturbed (see the module documentation for each ``kind``).

    Parameters
    ----------
    bundle
        The bundle (usually :func:`subset_bundle` of the evaluation tiles).
    kind
        ``'permute_features'``, ``'no_edges'`` or ``'rewire'``.
    seed
        Seed of the permutation or of the swaps.
    rounds
        ``'rewire'``: swap attempts per edge.

    Returns
    -------
    The perturbed bundle (on the CPU) and the fraction of what changed: cells whose feature row changed,
    edges removed, or edges (kNN and candidates) that are not in the original graph.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"`kind` must be one of {PERTURBATIONS}, got {kind!r}.")
    b = bundle.to("cpu", tiles=False)
    rng = np.random.default_rng(seed)
    fields = {
        "x": b.x, "cell_ptr": b.cell_ptr, "pos": b.pos, "edge_index": b.edge_index, "cand_meso": b.cand_meso,
        "cand_macro": b.cand_macro, "image_features": b.image_features, "split": b.split, "meta": dict(b.meta),
        "section": b.section,
    }  # fmt: skip
    if kind == "permute_features":
        ptr = b.cell_ptr.numpy()
        perm = np.arange(b.n_cells)
        for t in range(b.n_tiles):
            perm[ptr[t] : ptr[t + 1]] = ptr[t] + rng.permutation(ptr[t + 1] - ptr[t])
        fields["x"] = b.x[torch.from_numpy(perm)]
        changed = float((fields["x"] != b.x).any(1).float().mean()) if b.n_cells else 0.0
        return TrainingBundle(**fields), changed
    empty = torch.empty(2, 0, dtype=torch.long)
    n_edges = b.edge_index.shape[1] + b.cand_meso.shape[1] + b.cand_macro.shape[1]
    if kind == "no_edges":
        fields |= {"edge_index": empty, "cand_meso": empty, "cand_macro": empty.clone()}
        return TrainingBundle(**fields), 1.0 if n_edges else 0.0

    tile = b._cell_tile.numpy()
    ids = {s: block_ids(b.pos, b._cell_tile, GRID[s]).numpy() for s in ("micro", "meso")}
    knn = b.edge_index.numpy().T
    # the candidate sets without the kNN pairs the bundle folds into them (re-added from the rewired kNN edges)
    knn_keys = {(min(u, v), max(u, v)) for u, v in knn.tolist()}
    cands = {}
    for name in ("cand_meso", "cand_macro"):
        pairs = _undirected(getattr(b, name))
        keep = np.array([(u, v) not in knn_keys for u, v in pairs.tolist()], dtype=bool)
        cands[name] = pairs[keep] if pairs.size else pairs.reshape(0, 2)
    taken = Counter(knn_keys)  # each undirected pair once (a mutual pair is swapped as one pair)
    taken.update((u, v) for p in cands.values() for u, v in p.tolist())
    micro, meso = ids["micro"], ids["meso"]
    group = 2 - (meso[knn[:, 0]] == meso[knn[:, 1]]).astype(int) - (micro[knn[:, 0]] == micro[knn[:, 1]]).astype(int)
    key = knn[:, 0].astype(np.int64) * b.n_cells + knn[:, 1]
    mutual = np.isin(knn[:, 1].astype(np.int64) * b.n_cells + knn[:, 0], key)
    rules = {  # kNN group -> (region of an edge, is a new edge allowed in that group)
        0: (micro, lambda u, v: True),
        1: (meso, lambda u, v: micro[u] != micro[v]),
        2: (tile, lambda u, v: meso[u] != meso[v]),
    }
    parts = []
    for g, (region, allowed) in rules.items():
        # mutual pairs (a->b and b->a) are swapped as undirected pairs, one-way edges as directed edges, so
        # every cell keeps its in- and out-degree and its number of distinct neighbours in each group
        one_way = knn[(group == g) & ~mutual]
        parts.append(
            _swap(one_way, region[one_way[:, 0]], directed=True, allowed=allowed, taken=taken, rng=rng, rounds=rounds)
        )
        pairs = knn[(group == g) & mutual & (knn[:, 0] < knn[:, 1])]
        pairs = _swap(pairs, region[pairs[:, 0]], directed=False, allowed=allowed, taken=taken, rng=rng, rounds=rounds)
        parts += [pairs, pairs[:, ::-1]]
    new_knn = np.concatenate(parts).reshape(-1, 2)
    new_cands = {}
    for name, region_of in (("cand_meso", meso), ("cand_macro", tile)):
        pairs = cands[name]
        new = _swap(
            pairs, region_of[pairs[:, 0]], directed=False, allowed=lambda u, v: True, taken=taken, rng=rng,
            rounds=rounds,
        )  # fmt: skip
        new_cands[name] = torch.from_numpy(np.ascontiguousarray(new.T)).long()
    fields |= {"edge_index": torch.from_numpy(np.ascontiguousarray(new_knn.T)).long(), **new_cands}
    before = {tuple(e) for e in knn.tolist()} | {(u, v) for p in cands.values() for u, v in p.tolist()}
    after = [tuple(e) for e in new_knn.tolist()] + [tuple(e) for p in new_cands.values() for e in p.numpy().T.tolist()]
    changed = float(np.mean([e not in before for e in after])) if after else 0.0
    return TrainingBundle(**fields), changed
