"""``sg.pl.training_curves``: losses and validation retrieval against chance, edge addition and gradient norms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import Keys
from ._utils import new_axes, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

    from ..model import SigmmaModel


KINDS = ("loss", "retrieval", "edges", "gradients")
_SCALE_COLORS = {"micro": "#2ca02c", "meso": "#9467bd", "macro": "#8c564b"}


def training_curves(
    model_or_sdata: SigmmaModel | SpatialData | list[dict[str, Any]] | dict[str, list[float]],
    *,
    kind: Literal["loss", "retrieval", "edges", "gradients"] = "loss",
    tile_key: str = Keys.TILE_TABLE,
    log_scale: bool = False,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Training curves per epoch: losses or validation retrieval against chance, edge addition, gradient norms.

    Every kind marks the kept epoch: the best one by the model's validation criterion (``select_by``:
    validation retrieval by default, the validation loss for ``preset="paper"``).

    ``kind="loss"``: training and validation loss, each with its chance level (dashed; the loss of embeddings
    that carry no information, ``ln(batch)`` per scale and direction). A healthy run falls below the validation
    chance line. The training loss is averaged over training batches and the validation loss over the
    validation tiles, so compare each curve with its own chance line. On small sections the validation loss can
    rise while retrieval still improves (confident mismatches cost the loss a lot): look at
    ``kind="retrieval"`` too.

    ``kind="retrieval"``: the mean normalised rank of each validation tile's cross-modal partner
    (0: every image finds its own cells first; 0.5, dashed: chance). A healthy run falls well below 0.5; a
    curve that stays on it means the model has not learned to match images with cells.

    ``kind="edges"``: per coarser scale, the fraction of candidate edges sampled on and the mean edge
    probability of the stochastic edge addition. Healthy: both move away from their start (about 0.5 for an
    untrained scorer) and settle strictly between 0 and 1; a fraction stuck at 0 (no edges added) or at 1 (every
    candidate added) means the scorer stopped learning which edges help.

    ``kind="gradients"``: the global gradient norm before clipping (the clipping threshold dotted) and the
    gradient norm of each edge scorer (log scale). Healthy: smooth, of the order of the clipping threshold or
    below; norms orders of magnitude above it are exploding gradients.

    Parameters
    ----------
    model_or_sdata
        A trained :class:`~sigmma_sc.model.SigmmaModel` (its ``history``), a SpatialData object trained by
        :func:`sigmma_sc.tl.train_sigmma` (tile table ``.uns['sigmma']['training']['history']``), or the
        history itself (list of per-epoch dicts, or dict of lists).
    kind
        What to draw (see above).
    tile_key
        Tile table (with a SpatialData object).
    log_scale
        Logarithmic y axis (always on for ``kind="gradients"``).
    ax
        Axes to draw into.
    figsize
        Figure size in inches.
    save
        Path to save the figure to.

    Returns
    -------
    The axes.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    hist = _history(model_or_sdata, tile_key)
    epochs = np.asarray(hist.get("epoch", np.arange(1, len(hist["train_loss"]) + 1)), dtype=float)
    fig, (a,) = new_axes(1, ax=ax, figsize=figsize, panel=(5.0, 3.5))
    kept = _kept_epoch(model_or_sdata, tile_key, hist)
    if kind == "loss":
        _draw_loss(a, hist, epochs)
    elif kind == "retrieval":
        _draw_rank(a, hist, epochs)
    elif kind == "edges":
        _draw_edges(a, hist, epochs)
    else:
        _draw_gradients(a, hist, epochs, _clip(model_or_sdata, tile_key))
        log_scale = True
    if kept is not None and 1 <= kept <= len(epochs):
        a.axvline(epochs[kept - 1], color="0.5", ls=":", lw=1, label=f"kept: epoch {epochs[kept - 1]:g}")
    a.set_xlabel("epoch")
    if log_scale:
        a.set_yscale("log")
    if len(epochs) <= 12:
        a.set_xticks(epochs)
    for side in ("top", "right"):
        a.spines[side].set_visible(False)
    a.legend(frameon=False, fontsize="small")
    a.set_title(
        {"loss": "SIGMMA training", "retrieval": "Validation retrieval", "edges": "Edge addition",
         "gradients": "Gradient norms"}[kind]
    )  # fmt: skip
    save_figure(fig, save)
    return a


def _draw_loss(a: Axes, hist: dict[str, list], epochs: np.ndarray) -> None:
    a.plot(epochs, _floats(hist["train_loss"]), "-o", ms=3, color="#1f77b4", label="train")
    chance = _floats(hist.get("train_chance", []))
    if chance.size and np.isfinite(chance).any():
        a.plot(epochs, chance, "--", lw=1, color="#1f77b4", alpha=0.6, label="train chance")
    val = _floats(hist.get("val_loss", []))
    if val.size and np.isfinite(val).any():
        a.plot(epochs, val, "-o", ms=3, color="#ff7f0e", label="validation")
        vchance = _floats(hist.get("val_chance", []))
        if vchance.size and np.isfinite(vchance).any():
            a.plot(epochs, vchance, "--", lw=1, color="#ff7f0e", alpha=0.6, label="validation chance")
    a.set_ylabel("loss (sum of per-scale InfoNCE)")


def _draw_rank(a: Axes, hist: dict[str, list], epochs: np.ndarray) -> None:
    rank = _floats(hist.get("val_rank", []))
    if not rank.size or not np.isfinite(rank).any():
        raise ValueError(
            "The history has no validation retrieval (`val_rank`): the section had fewer than 2 validation tiles, "
            "or the model was trained by an older version."
        )
    a.plot(epochs, rank, "-o", ms=3, color="#ff7f0e", label="validation partner rank")
    a.axhline(0.5, color="#ff7f0e", ls="--", lw=1, alpha=0.6, label="chance")
    a.set_ylim(-0.02, max(0.6, float(np.nanmax(rank)) + 0.02))
    a.set_ylabel("mean normalised partner rank")


def _kept_epoch(obj, tile_key: str, hist: dict[str, list]) -> int | None:
    """The epoch whose weights were kept (1-based): from the model's diagnostics, else the best by the criterion."""
    diag = getattr(obj, "diagnostics", None)
    if diag is None and hasattr(obj, "tables") and tile_key in obj.tables:
        diag = obj.tables[tile_key].uns.get(Keys.UNS, {}).get("training", {}).get("diagnostics")
    if diag and diag.get("best_epoch") is not None:
        return int(diag["best_epoch"])
    for key in ("val_rank", "val_loss"):  # a bare history: the default criterion first
        v = _floats(hist.get(key, []))
        if v.size and np.isfinite(v).any():
            return int(np.nanargmin(v)) + 1
    return None


def _draw_edges(a: Axes, hist: dict[str, list], epochs: np.ndarray) -> None:
    scales = [s for s in _SCALE_COLORS if f"edge_sampled_{s}" in hist or f"edge_prob_{s}" in hist]
    if not scales:
        raise ValueError(
            "The history has no edge-addition statistics: the model was trained without stochastic edge addition "
            "(`edge_addition=False`, `use_graph=False` or a single scale)."
        )
    for s in scales:
        c = _SCALE_COLORS[s]
        if f"edge_sampled_{s}" in hist:
            a.plot(epochs, _floats(hist[f"edge_sampled_{s}"]), "-", color=c, label=f"{s}: fraction sampled")
        if f"edge_prob_{s}" in hist:
            a.plot(epochs, _floats(hist[f"edge_prob_{s}"]), "--", color=c, label=f"{s}: mean probability")
    a.set_ylim(-0.02, 1.02)
    a.set_ylabel("candidate edges")


def _draw_gradients(a: Axes, hist: dict[str, list], epochs: np.ndarray, clip: float | None) -> None:
    if "grad_norm" not in hist:
        raise ValueError("The history has no gradient norms (a model trained by an older version); train it again.")
    a.plot(epochs, _floats(hist["grad_norm"]), "-", color="k", label="all parameters (before clipping)")
    for s, c in _SCALE_COLORS.items():
        if f"edge_grad_{s}" in hist:
            a.plot(epochs, _floats(hist[f"edge_grad_{s}"]), "-", color=c, label=f"{s} edge scorer")
    if clip is not None:
        a.axhline(clip, color="0.5", ls=":", lw=1, label=f"clipping at {clip:g}")
    a.set_ylabel("gradient norm (mean per step)")


def _clip(obj, tile_key: str) -> float | None:
    cfg = getattr(obj, "config", None)
    if cfg is not None:
        return cfg.max_grad_norm
    if hasattr(obj, "tables") and tile_key in obj.tables:
        value = obj.tables[tile_key].uns.get(Keys.UNS, {}).get("training", {}).get("config", {}).get("max_grad_norm")
        return None if value is None or not np.isfinite(float(value)) else float(value)
    return None


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _history(obj, tile_key: str) -> dict[str, list]:
    if isinstance(obj, dict):
        hist = obj
    elif isinstance(obj, list):
        hist = {k: [h.get(k) for h in obj] for k in (obj[0] if obj else {})}
    elif hasattr(obj, "history") and not hasattr(obj, "tables"):
        hist = {k: [h.get(k) for h in obj.history] for k in (obj.history[0] if obj.history else {})}
    elif hasattr(obj, "tables"):
        if tile_key not in obj.tables:
            raise KeyError(f"No tile table {tile_key!r}; run `sg.pp.tile` and `sg.tl.train_sigmma` first.")
        hist = obj.tables[tile_key].uns.get(Keys.UNS, {}).get("training", {}).get("history")
        if hist is None:
            raise KeyError(f"Tile table {tile_key!r} has no training history; run `sg.tl.train_sigmma` first.")
    else:
        raise TypeError(f"Expected a SigmmaModel, a SpatialData object or a history, got {type(obj).__name__}.")
    if not hist or "train_loss" not in hist or not len(hist["train_loss"]):
        raise ValueError("The training history is empty; train the model first (`sg.tl.train_sigmma`).")
    return dict(hist)
