"""Edge-addition mechanics: candidate edges per cell and straight-through gradient norms, before vs after issue 9.

Usage::

    python benchmarks/edge_addition.py                 # the demo section and the real bone-marrow section
    python benchmarks/edge_addition.py --sections demo --scale-cells 500000   # + candidate_edges timing at 500k cells

For each section (tiled at 128 µm, 0.5 µm/px, 6-NN cell graphs, as the defaults of ``sg.pp.tile`` and
``sg.pp.cell_graph``):

- Candidates per cell: the meso and macro candidate edges of ``sg.data.build_bundle`` divided by the number of
  tiled cells (both directions counted, so this is the mean number of candidate partners of a cell), for the
  former rule (each cell's k nearest cells of its block, then minus the linked ones) and the current one (the k
  nearest cells of its block that are not linked), before and after the bundle's normalisation (which also turns
  kNN edges that cross a micro / meso block into meso / macro candidates).
- Gradient norms: one training-mode forward and backward of the contrastive loss of ``SigmmaModel`` (hidden and
  out 128, the CPU benchmark setting of ``paper_table.py``) on batches of 64 training tiles, with the former
  aggregation (weighted mean divided by ``max(sum w, 1e-6)``), the current one (``max(sum w, 1)``) and a masked
  reference (the same loss and Gumbel samples with the zero-weight edges removed). The image side uses fixed
  random features (the ST encoder's gradients are what is measured; no backbone is run). Reported: the norm of
  the gradient of the edge scorers and of the micro layers, median over batches, and the ratio to the reference.

Private imports on purpose: it compares the former and the current candidate rule
(``sigmma_sc.data._build.candidate_edges``) on the inputs ``build_bundle`` gives it, rebuilt here and checked to
give ``build_bundle``'s bundle; the former aggregation replaces ``forward`` on the benchmark's own model's layers.
Nothing in the package is replaced at run time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


KEYS = ("scorer", "micro", "all")


def legacy_candidate_edges(xy, group, k, exclude):
    """The former rule: each cell's k nearest cells of its group, then minus the pairs in ``exclude``."""
    from sigmma_sc.pp._cell_graph import knn_within_tiles

    conn, _ = knn_within_tiles(xy, group, k, group=group)
    sym = ((conn + conn.T) > 0).astype(np.int8)
    sym = (sym - sym.multiply((exclude + exclude.T) > 0)).tocoo()
    keep = sym.data > 0
    return np.vstack([sym.row[keep], sym.col[keep]]).astype(np.int64)


def load(name: str):
    import sigmma_sc as sg

    if name == "demo":
        return sg.datasets.demo(), "he"
    from _bonemarrow import load_bonemarrow

    return load_bonemarrow(), "dapi"


def candidate_inputs(sdata) -> dict:
    """What ``sg.data.build_bundle`` hands its candidate rule, computed as it does: cells sorted by tile, their
    positions (µm), meso groups, kNN edges and the edges inside a micro block, and ``k`` (the graph's ``n_neighs``)."""
    from scipy import sparse

    import sigmma_sc as sg
    from sigmma_sc._constants import GRID
    from sigmma_sc._utils._record import tiling_keys
    from sigmma_sc.data._build import checked_graph

    keys = tiling_keys(sg.data.tile_params(sdata, "sigmma_tiles"))
    cells = sdata.tables["table"]
    graph = checked_graph(sdata)
    tile_of = cells.obs[keys["cell_tile"]].to_numpy().astype(np.int64)
    rows = np.flatnonzero(tile_of >= 0)
    rows = rows[np.argsort(tile_of[rows], kind="stable")]
    t = tile_of[rows]
    xy = np.asarray(cells.obsm[keys["cell_spatial"]], dtype=np.float64)[rows]
    conn = cells.obsp[graph["keys"]["connectivities"]].tocsr()[rows][:, rows].tocoo()
    micro, meso = (cells.obs[keys["cell_blocks"][s]].to_numpy().astype(np.int64)[rows] for s in ("micro", "meso"))
    same = micro[conn.row] == micro[conn.col]
    n = rows.size
    micro_edges = sparse.csr_matrix((np.ones(int(same.sum()), np.int8), (conn.row[same], conn.col[same])), shape=(n, n))
    return {"xy": xy, "tile": t, "meso_group": t * GRID["meso"] ** 2 + meso, "k": int(graph["n_neighs"]),
            "micro_edges": micro_edges, "edge_index": np.vstack([conn.row, conn.col]).astype(np.int64)}  # fmt: skip


def candidates(inputs: dict, rule) -> tuple[np.ndarray, np.ndarray]:
    """Meso and macro candidate edges of ``rule`` (``candidate_edges`` or the former one), as build_bundle chains them."""
    from scipy import sparse

    xy, k, micro_edges = inputs["xy"], inputs["k"], inputs["micro_edges"]
    cand_meso = rule(xy, inputs["meso_group"], k, micro_edges)
    linked = micro_edges + sparse.csr_matrix(
        (np.ones(cand_meso.shape[1], dtype=np.int8), (cand_meso[0], cand_meso[1])), shape=micro_edges.shape
    )
    return cand_meso, rule(xy, inputs["tile"], k, linked)


def tile_and_graph(sdata, image_key: str) -> None:
    """Tile at 128 µm and build the 6-NN cell graphs, once."""
    import sigmma_sc as sg

    if "sigmma_tiles" not in sdata.tables:
        sg.pp.tile(sdata, image_key=image_key, tile_size_um=128, pixel_size_um=0.5, seed=0)
        sg.pp.cell_graph(sdata, n_comps=50)


def bundle_of(sdata, image_key: str, *, former: bool = False, image_dim: int = 64):
    """Tile and graph a section (once), build its bundle (``former``: with the former candidate rule); fixed random
    image features (seed 0). Returns the bundle and the seconds of ``build_bundle``."""
    import sigmma_sc as sg
    from sigmma_sc.data._build import candidate_edges
    from sigmma_sc.model import TrainingBundle

    tile_and_graph(sdata, image_key)
    t0 = time.perf_counter()
    bundle, _ = sg.data.build_bundle(sdata, require_image_features=False)
    seconds = time.perf_counter() - t0
    parts = {k: getattr(bundle, k) for k in ("x", "cell_ptr", "pos", "split")}
    inputs = candidate_inputs(sdata)
    current = candidates(inputs, candidate_edges)
    cand_meso, cand_macro = candidates(inputs, legacy_candidate_edges) if former else current
    rng = np.random.default_rng(0)
    feats = {s: rng.standard_normal((bundle.n_tiles, image_dim)).astype(np.float32) for s in ("micro", "meso", "macro")}
    rebuilt = TrainingBundle(**parts, edge_index=inputs["edge_index"], cand_meso=current[0], cand_macro=current[1],
                             image_features=feats, meta=bundle.meta)  # fmt: skip
    for key in ("edge_index", "cand_meso", "cand_macro"):  # the inputs are build_bundle's: same bundle, same rule
        assert np.array_equal(getattr(rebuilt, key).numpy(), getattr(bundle, key).numpy()), key
    out = TrainingBundle(**parts, edge_index=inputs["edge_index"], cand_meso=cand_meso, cand_macro=cand_macro,
                         image_features=feats, meta=bundle.meta)  # fmt: skip
    return out, seconds


def candidate_counts(sdata, image_key: str) -> dict[str, dict[str, float]]:
    """Candidates per tiled cell, former vs current rule, from the rules' outputs and from the normalised bundles."""
    from sigmma_sc.data._build import candidate_edges

    tile_and_graph(sdata, image_key)
    inputs = candidate_inputs(sdata)
    out = {}
    for legacy in (True, False):
        t0 = time.perf_counter()
        meso, macro = candidates(inputs, legacy_candidate_edges if legacy else candidate_edges)
        seconds = time.perf_counter() - t0
        bundle, _ = bundle_of(sdata, image_key, former=legacy)
        n = bundle.n_cells
        out["former" if legacy else "current"] = {
            "meso": meso.shape[1] / n,
            "macro": macro.shape[1] / n,
            "meso_bundle": bundle.cand_meso.shape[1] / n,
            "macro_bundle": bundle.cand_macro.shape[1] / n,
            "knn": bundle.edge_index.shape[1] / n,
            "cells": n,
            "tiles": bundle.n_tiles,
            "rule_seconds": seconds,
        }
    return out


def gradient_norms(bundle, *, n_batches: int = 5, batch: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median gradient norms (edge scorers, micro layers) over batches, for the three aggregations."""
    import torch
    from torch_geometric.utils import scatter

    from sigmma_sc.model import SigmmaModel
    from sigmma_sc.nn import WeightedSAGEConv

    current = WeightedSAGEConv.forward

    def legacy(self, x, edge_index, edge_weight=None):
        n = x.shape[0]
        if edge_weight is None:
            edge_weight = x.new_ones(edge_index.shape[1])
        src = torch.nn.functional.linear(x, self.lin_l.weight) if self.in_channels > self.out_channels else x
        num = self.propagate(edge_index, x=src, edge_weight=edge_weight, size=(n, n))
        den = scatter(edge_weight, edge_index[1], dim=0, dim_size=n, reduce="sum")
        agg = num / den.clamp_min(1e-6).unsqueeze(-1)
        if self.in_channels > self.out_channels:
            out = agg if self.lin_l.bias is None else agg + self.lin_l.bias
        else:
            out = self.lin_l(agg)
        return out + self.lin_r(x)

    def masked(self, x, edge_index, edge_weight=None):
        if edge_weight is not None:
            keep = edge_weight.detach() != 0
            edge_index, edge_weight = edge_index[:, keep], edge_weight[keep]
        return current(self, x, edge_index, edge_weight)

    train = bundle.tiles_in("train")
    gen = torch.Generator().manual_seed(seed)
    batches = [train[torch.randperm(train.numel(), generator=gen)[:batch]] for _ in range(n_batches)]
    norms: dict[str, dict[str, list[float]]] = {}
    for name, forward in (("former", legacy), ("current", current), ("masked", masked)):
        model = SigmmaModel.from_bundle(bundle, hidden=128, out_dim=128, temperature=0.07, seed=seed).train()
        for conv in model.modules():  # this model's layers aggregate the variant's way (the package is untouched)
            if isinstance(conv, WeightedSAGEConv):
                conv.forward = types.MethodType(forward, conv)
        rec = norms.setdefault(name, {"scorer": [], "micro": [], "all": []})
        for i, idx in enumerate(batches):
            model.zero_grad()
            torch.manual_seed(1000 + i)  # same Gumbel noise and dropout for the three variants
            model(bundle.select(idx)).backward()
            g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            norm = lambda keys, g=g: float(torch.sqrt(sum(v.square().sum() for k, v in g.items() if keys(k))))
            rec["scorer"].append(norm(lambda k: "samplers" in k))
            rec["micro"].append(norm(lambda k: "convs.micro" in k))
            rec["all"].append(norm(lambda k: True))
    return {name: {k: float(np.median(v)) for k, v in rec.items()} for name, rec in norms.items()}


def scale_timing(n_cells: int, k: int = 6) -> dict[str, float]:
    """Seconds of the meso and macro candidate_edges calls on a uniform layout of ``n_cells`` (bone-marrow density)."""
    from scipy import sparse

    from sigmma_sc.data._build import candidate_edges
    from sigmma_sc.pp._cell_graph import knn_within_tiles

    rng = np.random.default_rng(0)
    side = np.sqrt(n_cells / 279) * 128.0  # about 279 cells per 128 µm tile, as on the bone-marrow section
    xy = rng.uniform(0, side, (n_cells, 2))
    tile = np.floor(xy / 128).astype(np.int64)
    tile_id = tile[:, 0] * 10_000 + tile[:, 1]
    conn, _ = knn_within_tiles(xy, tile_id, k)
    micro = tile_id * 16 + (np.floor(xy / 32).astype(np.int64) % 4 @ [4, 1])
    meso = tile_id * 4 + (np.floor(xy / 64).astype(np.int64) % 2 @ [2, 1])
    c = conn.tocoo()
    same = micro[c.row] == micro[c.col]
    micro_edges = sparse.csr_matrix((np.ones(same.sum(), np.int8), (c.row[same], c.col[same])), shape=conn.shape)
    t0 = time.perf_counter()
    cm = candidate_edges(xy, meso, k, micro_edges)
    t1 = time.perf_counter()
    linked = micro_edges + sparse.csr_matrix((np.ones(cm.shape[1], np.int8), (cm[0], cm[1])), shape=conn.shape)
    t2 = time.perf_counter()
    cM = candidate_edges(xy, tile_id, k, linked)
    t3 = time.perf_counter()
    return {"cells": n_cells, "meso_s": t1 - t0, "macro_s": t3 - t2, "meso": cm.shape[1] / n_cells,
            "macro": cM.shape[1] / n_cells}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=["demo", "bonemarrow"], choices=("demo", "bonemarrow"))
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--scale-cells", type=int, default=None, help="also time candidate_edges on this many cells")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    lines = [
        f"- Command: `python benchmarks/edge_addition.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; machine: {platform.platform()}, "
        f"{os.cpu_count()} cores (2-core CPU, shared/loaded), torch threads {args.threads}",
        "",
    ]
    print("\n".join(lines), flush=True)
    for name in args.sections:
        start = len(lines)
        sdata, image_key = load(name)
        counts = candidate_counts(sdata, image_key)
        c = counts["current"]
        lines += [
            f"### {name}: {c['tiles']} tiles of 128 µm, {c['cells']:,} tiled cells, {c['knn']:.2f} kNN edges per cell",
            "",
            "| candidates per cell | meso (build_bundle) | macro (build_bundle) | meso (bundle) | macro (bundle) "
            "| candidate rule s |",
            "|---|---|---|---|---|---|",
        ]
        for rule, v in counts.items():
            lines.append(
                f"| {rule} | {v['meso']:.2f} | {v['macro']:.2f} | {v['meso_bundle']:.2f} | {v['macro_bundle']:.2f} "
                f"| {v['rule_seconds']:.1f} |"
            )
        lines += [
            "",
            f"Gradient norms (median over {args.batches} batches of 64 training tiles), ratio to the masked reference:",
            "",
            "| candidates | aggregation | edge scorers | micro layers | all parameters |",
            "|---|---|---|---|---|",
        ]
        for rule in ("former", "current"):
            bundle, _ = bundle_of(sdata, image_key, former=rule == "former")
            g = gradient_norms(bundle, n_batches=args.batches)
            ref = g["masked"]
            for agg, v in g.items():
                cells = [f"{v[k]:.3g} ({v[k] / ref[k]:.3g}x)" if ref[k] > 0 else f"{v[k]:.3g}" for k in KEYS]
                lines.append(f"| {rule} | {agg} | {' | '.join(cells)} |")
        lines.append("")
        print("\n".join(lines[start:]), flush=True)
    if args.scale_cells:
        t = scale_timing(args.scale_cells)
        lines += [
            f"candidate_edges on a uniform layout of {t['cells']:,} cells: meso {t['meso_s']:.1f} s "
            f"({t['meso']:.2f} per cell), macro {t['macro_s']:.1f} s ({t['macro']:.2f} per cell)",
            "",
        ]
        print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
