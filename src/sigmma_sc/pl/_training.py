"""``sg.pl.training_curves``: training and validation loss per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from ._utils import new_axes, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

    from ..model import SigmmaModel


def training_curves(
    model_or_sdata: SigmmaModel | SpatialData | list[dict[str, Any]] | dict[str, list[float]],
    *,
    tile_key: str = Keys.TILE_TABLE,
    log_scale: bool = False,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Training and validation loss per epoch; the kept (lowest validation loss) epoch is marked.

    The training loss is averaged over training batches and the validation loss over the validation
    tiles, so their absolute levels differ when the batch sizes do (InfoNCE grows with the log of the
    number of negatives): compare each curve's trend, not the two levels.

    Parameters
    ----------
    model_or_sdata
        A trained :class:`~sigmma_sc.model.SigmmaModel` (its ``history``), a SpatialData object trained by
        :func:`sigmma_sc.tl.train_sigmma` (tile table ``.uns['sigmma']['training']['history']``), or the
        history itself (list of per-epoch dicts, or dict of lists).
    tile_key
        Tile table (with a SpatialData object).
    log_scale
        Logarithmic loss axis.
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
    hist = _history(model_or_sdata, tile_key)
    epochs = np.asarray(hist.get("epoch", np.arange(1, len(hist["train_loss"]) + 1)), dtype=float)
    fig, (a,) = new_axes(1, ax=ax, figsize=figsize, panel=(5.0, 3.5))
    a.plot(epochs, _floats(hist["train_loss"]), "-o", ms=3, color="#1f77b4", label="train")
    val = _floats(hist.get("val_loss", []))
    if val.size and np.isfinite(val).any():
        a.plot(epochs, val, "-o", ms=3, color="#ff7f0e", label="validation")
        best = int(np.nanargmin(val))
        a.axvline(epochs[best], color="0.5", ls=":", lw=1)
        a.plot(
            epochs[best], val[best], marker="*", ms=12, color="#d62728", ls="", label=f"kept: epoch {epochs[best]:g}"
        )
    a.set_xlabel("epoch")
    a.set_ylabel("loss (sum of per-scale InfoNCE)")
    if log_scale:
        a.set_yscale("log")
    if len(epochs) <= 12:
        a.set_xticks(epochs)
    for side in ("top", "right"):
        a.spines[side].set_visible(False)
    a.legend(frameon=False)
    a.set_title("SIGMMA training")
    save_figure(fig, save)
    return a


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
