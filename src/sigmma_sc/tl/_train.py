"""``sg.tl.train_sigmma``: featurize, bundle and train SIGMMA on a tiled section."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import Keys
from .._utils._validate import get_table
from ..data._bundle import build_bundle
from ..data._tiles import tile_params
from ._featurize import featurize

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)


def train_sigmma(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    backbone: str = "efficientnet_lite0",
    pretrained: bool = True,
    weights: str | Path | None = None,
    input_size: int | None = None,
    preset: str = "default",
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int | None = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    featurize_batch_size: int = 32,
    **config: Any,
) -> SigmmaModel:
    """Train the multi-scale graph contrastive model on a tiled section.

    Runs :func:`sigmma_sc.tl.featurize` (cached frozen-backbone features; skipped when already cached),
    collects tiles, cell graphs and features into a :class:`~sigmma_sc.model.TrainingBundle`, and fits a
    :class:`~sigmma_sc.model.SigmmaModel` on the training tiles (AdamW with warm-up and cosine decay over a
    budget of optimiser steps, gradient clipping), validating after each epoch, stopping early when the
    validation loss stops improving and keeping the weights of the best validation epoch. Trains on the GPU
    when one is available.

    The validation loss is logged next to its chance level (``ln(batch)`` per scale and direction); a warning
    says when the best validation loss stays near chance or the embeddings collapse, naming what to change
    (``model.diagnostics`` and ``.uns['sigmma']['training']['diagnostics']`` record the checks).

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile` and :func:`sigmma_sc.pp.cell_graph`.
    table_key
        Cell table.
    tile_key
        Tile table.
    backbone
        Image backbone (see :func:`sigmma_sc.tl.featurize`).
    pretrained
        Use the backbone's pretrained weights.
    weights
        Local weights file for the backbone.
    input_size
        Side crops are resized to for the backbone (default: the backbone's; see :func:`sigmma_sc.tl.featurize`).
    preset
        Starting values of the training settings: ``"default"`` (1000 optimiser steps, batches of at most 256
        tiles and a quarter of the training tiles, lr 1e-3 with warm-up and cosine decay, early stopping,
        clipping; see :class:`~sigmma_sc.model.SigmmaConfig`) or ``"paper"`` (Table 3: 100 epochs of full
        batches of 1280 tiles, lr 1e-4, StepLR). Explicit arguments override the preset.
    steps
        Budget of optimiser steps (default: the preset's; training also stops after ``epochs``).
    epochs
        Budget of epochs (default: the preset's). Giving only ``epochs`` with the default preset trains for
        that many epochs (no step budget).
    batch_size
        Tiles per optimisation step, all negatives of each other (default: the preset's; capped by
        ``max_batch_fraction`` of the training tiles).
    device
        Torch device (default: :attr:`sigmma_sc.settings.device`, else CUDA when available, else CPU).
    seed
        Seed of the initialisation, shuffling, dropout and edge sampling (``None``: 0).
    checkpoint_dir
        Directory for the per-epoch checkpoint ``last.pt``.
    resume
        Continue a killed run from ``checkpoint_dir``.
    featurize_batch_size
        Tiles per backbone forward pass.
    **config
        Further :class:`~sigmma_sc.model.SigmmaConfig` fields, e.g. ``hidden``, ``temperature``, ``lr``,
        ``scales=('macro',)``, ``use_graph=False``, ``edge_addition=False`` (Table 5 ablations), or
        ``finetune_blocks=N`` to fine-tune the backbone's last ``N`` blocks (tile images are then read into
        the bundle and encoded at every step; ``backbone_lr`` sets their learning rate).

    Returns
    -------
    The trained model. Also writes ``tile_table.uns['sigmma']['training']``: configuration, history, package
    version.
    """
    from .._settings import settings
    from ..model import SigmmaModel

    seed = 0 if seed is None else int(seed)
    tile_params(sdata, tile_key)  # a clear error before anything else if sg.pp.tile has not run
    tiles = get_table(sdata, tile_key)
    featurize(
        sdata, backbone=backbone, tile_key=tile_key, pretrained=pretrained, weights=weights,
        input_size=input_size, batch_size=featurize_batch_size, device=device,
    )  # fmt: skip
    finetune = int(config.get("finetune_blocks", 0) or 0) > 0
    bundle, _ = build_bundle(sdata, table_key=table_key, tile_key=tile_key, include_tiles=finetune)
    n_train = int((bundle.split == 0).sum()) if bundle.split is not None else bundle.n_tiles
    if n_train < 2:
        raise ValueError(
            f"Only {n_train} training tile(s); contrastive training needs at least 2 (more in practice). "
            "Use a smaller `tile_size_um` in `sg.pp.tile`, or a larger section."
        )
    info = tiles.uns[Keys.UNS]["backbone"]
    if weights is not None:  # the architecture is `backbone`, its weights a local file
        config.setdefault("backbone_weights", str(weights))
    budget = {k: v for k, v in (("steps", steps), ("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    model = SigmmaModel.from_bundle(
        bundle,
        preset=preset,
        **budget,
        backbone=backbone,
        backbone_pretrained=bool(pretrained),
        backbone_info={k: info[k] for k in ("name", "num_features", "input_size", "mean", "std", "is_vit")},
        seed=seed,
        **config,
    )
    history = model.fit(
        bundle, device=device or settings.device, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume
    )
    uns = dict(tiles.uns.get(Keys.UNS, {}))
    uns["training"] = {
        "config": model.config.to_dict(),
        "history": _columns(history),
        "diagnostics": model.diagnostics,
        "version": _version(),
    }
    tiles.uns[Keys.UNS] = uns
    best = min((h for h in history if h.get("val_loss") is not None), key=lambda h: h["val_loss"], default=None)
    if best is not None:
        logger.info("Best validation loss %.4f at epoch %d of %d.", best["val_loss"], best["epoch"], len(history))
    return model


def _columns(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch records as columns of floats (NaN where an epoch lacks a value), for ``.uns``."""
    keys = list(dict.fromkeys(k for h in history for k in h))
    return {k: [float(h[k]) if h.get(k) is not None else float("nan") for h in history] for k in keys}


def _version() -> str:
    from .. import __version__

    return __version__
