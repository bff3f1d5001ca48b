"""Health checks of a trained SIGMMA model: loss and retrieval against their chance levels, and embedding collapse."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: The best validation loss counts as "at chance" above this fraction of the chance level.
NEAR_CHANCE = 0.97
#: The best validation partner rank counts as "at chance" above this fraction of its chance level (0.5).
NEAR_CHANCE_RANK = 0.9
#: Chance level of :func:`partner_rank` (embeddings that carry no information rank the partner in the middle).
RANK_CHANCE = 0.5
#: Embeddings count as collapsed above this mean pairwise cosine similarity ...
COLLAPSE_COSINE = 0.95
#: ... or below this participation ratio (effective number of dimensions).
COLLAPSE_PR = 2.0


def chance_loss(sizes: Sequence[int], n_scales: int) -> float:
    """Mean symmetric InfoNCE (summed over scales) of uninformative embeddings, over batches of ``sizes`` tiles.

    With embeddings that carry no information every partner is as likely as any other of the ``n`` tiles of its
    batch, so each direction of each scale's InfoNCE is ``ln(n)``; batches are weighted by their tile counts, as
    the training and validation losses are.
    """
    total = sum(sizes)
    if total == 0:
        return float("nan")
    return n_scales * sum(n * math.log(n) for n in sizes) / total


def partner_rank(emb: Mapping[str, Tensor], scales: Sequence[str]) -> float:
    """Mean normalised rank of each tile's cross-modal partner among the tiles of ``emb``: 0 = always first, 0.5 = chance.

    For every scale, the cosine similarities of the image embeddings to the ST embeddings of the same tiles
    rank, for each tile, its own partner among all ``N`` tiles (image -> ST and ST -> image); the rank counts the
    tiles that are more similar than the partner (ties count half, so collapsed embeddings score 0.5, not 0) and
    is divided by ``N - 1``. The mean over tiles, both directions and the scales is returned. Unlike the
    InfoNCE loss it does not depend on the temperature or on how confident the similarities are, only on their
    order, which is what retrieval and the microenvironments use; it is the validation criterion of
    ``select_by="retrieval"``.

    Parameters
    ----------
    emb
        ``"image/{scale}"`` / ``"st/{scale}"`` -> ``(N, D)`` embeddings of the same ``N`` tiles, in tile order.
    scales
        The scales to average over.

    Returns
    -------
    The mean normalised partner rank (``nan`` with fewer than 2 tiles).
    """
    ranks = []
    for s in scales:
        img = torch.nn.functional.normalize(emb[f"image/{s}"].double(), dim=1)
        st = torch.nn.functional.normalize(emb[f"st/{s}"].double(), dim=1)
        n = img.shape[0]
        if n < 2:
            return float("nan")
        sim = img @ st.T
        own = sim.diagonal()
        for better, tied in (
            ((sim > own[:, None]).sum(1), (sim == own[:, None]).sum(1) - 1),  # image -> ST: row i
            ((sim > own[None, :]).sum(0), (sim == own[None, :]).sum(0) - 1),  # ST -> image: column j
        ):
            ranks.append(((better + 0.5 * tied).double() / (n - 1)).mean())
    return float(torch.stack(ranks).mean())


def mean_pairwise_cosine(z: Tensor) -> float:
    """Mean cosine similarity of all pairs of distinct rows of ``z`` (1: all rows point the same way)."""
    n = z.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(z.double(), dim=1)
    s = u.sum(0)
    return float(((s @ s) - n) / (n * (n - 1)))


def participation_ratio(z: Tensor) -> float:
    """Effective number of dimensions of ``z``: ``(sum l)^2 / sum l^2`` over the eigenvalues ``l`` of its covariance."""
    if z.shape[0] < 2:
        return float("nan")
    x = z.double() - z.double().mean(0)
    lam = torch.linalg.svdvals(x) ** 2
    denom = float((lam**2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def embedding_health(emb: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """``{"mean_cosine": {key: c}, "participation_ratio": {key: pr}}`` per embedding.

    ``emb`` is keyed like ``"st/macro"``; the returned keys are ``"st_macro"`` (zarr forbids ``/`` in keys of
    ``.uns``, where these are saved).
    """
    return {
        "mean_cosine": {_key(k): mean_pairwise_cosine(v) for k, v in emb.items()},
        "participation_ratio": {_key(k): participation_ratio(v) for k, v in emb.items()},
    }


def _key(key: str) -> str:
    return key.replace("/", "_")


def training_diagnostics(
    history: Sequence[Mapping[str, Any]],
    emb: Mapping[str, Tensor] | None,
    *,
    tiles: str,
    stopped: str,
    select_by: str = "loss",
) -> dict[str, Any]:
    """Diagnose a finished training run and warn about what users must fix.

    Parameters
    ----------
    history
        Per-epoch records of the run (``val_loss``, ``val_chance``, ``val_rank``, ...).
    emb
        Embeddings of held-out tiles by the kept weights (``"image/{scale}"`` / ``"st/{scale}"`` -> ``(B, D)``), or
        ``None``.
    tiles
        Which tiles ``emb`` holds (``"val"`` or ``"train"``), recorded.
    stopped
        Why training stopped (``"budget"``, ``"early stopping"``, ...), recorded.
    select_by
        The validation criterion that chose the kept weights (``"loss"`` or ``"retrieval"``): its best value
        decides ``best_epoch`` and which near-chance warning applies.

    Returns
    -------
    JSON-able dict: ``select_by``, ``best_epoch`` (the kept weights), ``best_val_loss`` and ``val_chance``,
    ``best_val_rank`` and ``val_rank_chance`` (when recorded), ``stopped``, ``tiles``, ``mean_cosine``,
    ``participation_ratio`` (per embedding) and ``warnings`` (the messages logged).
    """
    out: dict[str, Any] = {"stopped": stopped, "tiles": tiles, "select_by": select_by, "warnings": []}
    vals = [(h["val_loss"], h) for h in history if h.get("val_loss") is not None]
    ranks = [(h["val_rank"], h) for h in history if h.get("val_rank") is not None and math.isfinite(h["val_rank"])]
    if vals:
        best, rec = min(vals, key=lambda v: v[0])
        chance = float(rec.get("val_chance", float("nan")))
        out |= {"best_val_loss": float(best), "val_chance": chance, "best_epoch": int(rec["epoch"])}
        if select_by == "loss" and math.isfinite(chance) and best >= NEAR_CHANCE * chance:
            out["warnings"].append(
                f"The best validation loss ({best:.3f}) is within {100 * (1 - NEAR_CHANCE):.0f}% of its chance level "
                f"({chance:.3f}: ln(batch) per scale and direction): the model has barely learned to match images "
                "with cells. Train longer (`steps`), raise `lr`, lower `batch_size` (more steps per epoch), or "
                "check that the image and the cells are registered (`sg.pl.microenvironments` draws both)."
            )
    if ranks:
        best_rank, rec = min(ranks, key=lambda v: v[0])
        out |= {"best_val_rank": float(best_rank), "val_rank_chance": RANK_CHANCE}
        if select_by == "retrieval":
            out["best_epoch"] = int(rec["epoch"])
            if best_rank >= NEAR_CHANCE_RANK * RANK_CHANCE:
                out["warnings"].append(
                    f"The best validation partner rank ({best_rank:.3f}; 0 = every tile's image finds its own cells "
                    f"first, {RANK_CHANCE} = chance) is within {100 * (1 - NEAR_CHANCE_RANK):.0f}% of chance: the "
                    "model has barely learned to match images with cells. Train longer (`steps`), raise `lr`, "
                    "lower `batch_size` (more steps per epoch), or check that the image and the cells are "
                    "registered (`sg.pl.microenvironments` draws both)."
                )
    if emb:
        health = embedding_health(emb)
        out |= health
        collapsed = []
        for name, z in emb.items():
            key = _key(name)
            c, pr, dim = health["mean_cosine"][key], health["participation_ratio"][key], z.shape[1]
            if c > COLLAPSE_COSINE or pr < COLLAPSE_PR:
                collapsed.append(f"{name.replace('/', ' ')} (mean pairwise cosine {c:.3f}, participation ratio {pr:.1f} of {dim})")
        if collapsed:  # one message for all of them, not one per scale and modality
            out["warnings"].append(
                f"Embeddings of the {tiles} tiles have collapsed, so tiles are hard to tell apart: "
                + "; ".join(collapsed)
                + ". Train more steps, use a smaller `batch_size` or a larger `lr`, or a higher `temperature`."
            )
    for msg in out["warnings"]:
        logger.warning(msg)
    return out


def kept_summary(history: Sequence[Mapping[str, Any]], diagnostics: Mapping[str, Any]) -> str | None:
    """One line on the kept weights: their epoch, validation partner rank and loss against chance (or ``None``)."""
    epoch = diagnostics.get("best_epoch")
    if epoch is None or not history or not 1 <= int(epoch) <= len(history):
        return None
    rec = history[int(epoch) - 1]
    parts = []
    if rec.get("val_rank") is not None:
        parts.append(f"val partner rank {rec['val_rank']:.3f}, chance {RANK_CHANCE}")
    if rec.get("val_loss") is not None:
        parts.append(f"val loss {rec['val_loss']:.3f}, chance {rec.get('val_chance', float('nan')):.3f}")
    by = diagnostics.get("select_by", "loss")
    return (
        f"Kept the weights of epoch {int(epoch)} of {len(history)} (best validation "
        f"{'retrieval' if by == 'retrieval' else 'loss'}): " + "; ".join(parts) + "."
    )
