"""What the edge scorers of a trained model learned: the probability of every candidate edge (issue 26).

Pure torch + numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ._bundle import TrainingBundle
    from ._sigmma import SigmmaModel


def edge_scores(
    model: SigmmaModel,
    bundle: TrainingBundle,
    *,
    tiles: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 64,
) -> dict[str, dict[str, np.ndarray]]:
    r"""The edge probability :math:`s_{uv}` the model gives every candidate edge it scores (deterministic).

    Runs the ST encoder in eval mode on the tiles and records, per coarser scale, the candidates the edge sampler
    scored (after the neighbour-patch constraint), their probability ``sigmoid(logit)`` and whether the
    evaluation graph keeps them (weight of the evaluation pass). Use it to see what the scorers learned: the
    probability against the distance of the two cells, against their types, or on a planted contact.

    Parameters
    ----------
    model
        A model with edge addition (``config.edge_addition=True`` and a graph).
    bundle
        The bundle of the section (the model's node-feature space).
    tiles
        Tile indices (default: every tile).
    batch_size
        Tiles per forward pass.

    Returns
    -------
    Scale (``"meso"``, ``"macro"``) -> ``{"src", "dst"}`` (bundle cell rows, both directions of every pair),
    ``"prob"`` (float32), ``"kept"`` (the evaluation weight, float32), ``"distance"`` (between the two cells'
    positions, in tile sides; times ``bundle.meta['tile_size_um']`` for µm) and ``"tile"``.
    """
    enc = model.st_encoder
    if not getattr(enc, "use_graph", False) or not len(getattr(enc, "samplers", {})):
        raise ValueError("The model has no edge scorer: train it with `edge_addition=True` and a cell graph.")
    idx = torch.arange(bundle.n_tiles) if tiles is None else torch.as_tensor(np.asarray(tiles), dtype=torch.long)
    device = model.device
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in enc.samplers}
    hooks = []
    for s, sampler in enc.samplers.items():

        def hook(mod, args, _out, s=s):
            h, cand = args
            records[s].append((cand.detach(), torch.sigmoid(mod.logits(h, cand)).detach()))

        hooks.append(sampler.register_forward_hook(hook))
    out: dict[str, dict[str, list[np.ndarray]]] = {s: {} for s in enc.samplers}
    ptr = bundle.cell_ptr.cpu()
    bundle = bundle.to(device, tiles=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, idx.numel(), batch_size):
                chunk = idx[start : start + batch_size]
                batch = bundle.select(chunk)
                for r in records.values():
                    r.clear()
                res = model._graph(batch)
                # batch-local row -> bundle row: the selected tiles' cells, in order
                counts = ptr[chunk + 1] - ptr[chunk]
                rows = torch.cat([torch.arange(int(ptr[t]), int(ptr[t + 1])) for t in chunk.tolist()])
                local_tile = torch.repeat_interleave(chunk, counts)
                pos = batch.pos.cpu()
                for s, rec in records.items():
                    if not rec:
                        continue
                    cand, prob = rec[-1]
                    cand = cand.cpu()
                    kept = res.added[s][1].detach().float().cpu() if s in res.added else torch.zeros(cand.shape[1])
                    d = (pos[cand[0]] - pos[cand[1]]).norm(dim=1)
                    for key, val in (
                        ("src", rows[cand[0]]), ("dst", rows[cand[1]]), ("prob", prob.float().cpu()),
                        ("kept", kept), ("distance", d), ("tile", local_tile[cand[0]]),
                    ):  # fmt: skip
                        out[s].setdefault(key, []).append(val.numpy())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {s: {k: np.concatenate(v) for k, v in d.items()} for s, d in out.items() if d}
