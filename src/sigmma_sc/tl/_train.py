"""``sg.tl.train_sigmma``: featurize, bundle and train SIGMMA on a tiled section."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._constants import Keys
from .._utils._validate import get_table
from ..data._build import build_bundle, checked_graph
from ..data._tiles import tile_params
from ._featurize import featurize
from ._fit import fit_and_record
from ._records import resolve_seed

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel
    from ..train import Callback

logger = logging.getLogger(__name__)


def train_sigmma(
    sdata: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData],
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
    split: Literal["spatial", "section"] = "spatial",
    val_sections: Sequence[str] | str | None = None,
    test_sections: Sequence[str] | str | None = None,
    features: str | None = None,
    n_comps: int | None = None,
    layer: str | None = None,
    callbacks: Sequence[Callback] | None = None,
    candidates: Literal["knn", "all"] = "knn",
    **config: Any,
) -> SigmmaModel:
    """Train the multi-scale graph contrastive model on a tiled section.

    Runs :func:`sigmma_sc.tl.featurize` (cached frozen-backbone features; skipped when already cached),
    collects tiles, cell graphs and features into a :class:`~sigmma_sc.model.TrainingBundle`, and fits a
    :class:`~sigmma_sc.model.SigmmaModel` on the training tiles (AdamW with warm-up and cosine decay over a
    budget of optimiser steps, gradient clipping), validating after each epoch, stopping early when validation
    retrieval stops improving and keeping the weights of the best validation epoch (``select_by``; the
    ``paper`` preset selects on the validation loss). Trains on the GPU when one is available.

    The validation loss is logged next to its chance level (``ln(batch)`` per scale and direction) and the
    validation partner rank next to its chance level (0.5); a warning says when the selection criterion stays
    near chance or the embeddings collapse, naming what to change (``model.diagnostics`` and
    ``.uns['sigmma']['training']['diagnostics']`` record the checks; ``sg.pl.training_curves`` draws them).

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile` and :func:`sigmma_sc.pp.cell_graph`, or a cohort:
        a list of such sections or a mapping name -> section (list items are named ``section_0``, ...). A cohort
        trains one model on all sections (batches mix sections; every tile of a batch is a negative of the
        others): node features are brought into one space first (see ``features``), each tile table gets
        ``.obs['sigmma_section']``, and the per-section bundles are joined with
        :meth:`~sigmma_sc.model.TrainingBundle.concat` (see ``docs/cohorts.md``).
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
        Seed of the initialisation, shuffling, dropout and edge sampling (``None``: unseeded; a fresh seed is
        drawn and recorded in ``model.config.seed``).
    checkpoint_dir
        Directory for the per-epoch checkpoint ``last.pt``.
    resume
        Continue a killed run from ``checkpoint_dir``.
    featurize_batch_size
        Tiles per backbone forward pass.
    split
        Cohort only. ``'spatial'``: the spatial 8:1:1 tile split of :func:`sigmma_sc.pp.tile` inside every section.
        ``'section'``: hold out whole sections, ``val_sections`` for validation and ``test_sections`` for testing
        (written to the tile tables' ``.obs['split']``; the spatial split is kept in ``.obs['split_spatial']``).
    val_sections, test_sections
        Cohort with ``split='section'``: names of the held-out sections.
    features
        Cohort only: the ``.obsm`` key of node features every section holds (e.g. a foundation-model embedding).
        ``None``: the embedding the sections' cell graphs already share, else a PCA of log-normalised counts over
        the genes shared by all sections, fitted on the training cells of all sections (genes that some section
        lacks are dropped and logged; too few shared genes is an error). Written into every cell table.
    n_comps
        Cohort PCA components (default: the largest of the sections' cell graphs).
    layer
        Cohort PCA: layer of raw counts (``None``: ``.X``).
    callbacks
        :class:`~sigmma_sc.train.Callback` hooks that observe training (loss curves, edge-sampler statistics,
        validation retrieval) without changing it.
    candidates
        Candidate rule of stochastic edge addition (see :func:`sigmma_sc.data.build_bundle`): ``"knn"`` (each cell's
        nearest not-yet-linked cells of its block) or ``"all"`` (the paper's rule, §3.2: every not-yet-linked pair
        inside the meso block / tile; several times the candidates, so more memory and time per step). Recorded in
        ``model.meta['candidates']``; :func:`sigmma_sc.tl.embed` uses the same rule. One section only.
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
    from spatialdata import SpatialData

    from .._settings import settings

    seed = resolve_seed(seed)
    budget = {k: v for k, v in (("steps", steps), ("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    # every cheap check before the slow featurization: settings, checkpoint, then (one section) tiling and graph
    _check_config(preset, budget, config)
    resume = _check_resume(checkpoint_dir, resume=resume)
    if candidates not in ("knn", "all"):
        raise ValueError(f"`candidates` must be 'knn' or 'all', got {candidates!r}.")
    if not isinstance(sdata, SpatialData):
        if candidates != "knn":
            raise ValueError("`candidates='all'` is not available for a cohort yet: train with `candidates='knn'`.")
        from ._cohort import train_cohort

        return train_cohort(
            sdata, table_key=table_key, tile_key=tile_key, backbone=backbone, pretrained=pretrained, weights=weights,
            input_size=input_size, preset=preset, steps=steps, epochs=epochs, batch_size=batch_size, device=device,
            seed=seed,
            checkpoint_dir=checkpoint_dir, resume=resume, featurize_batch_size=featurize_batch_size, split=split,
            val_sections=val_sections, test_sections=test_sections, features=features, n_comps=n_comps,
            layer=layer, config=config, callbacks=callbacks,
        )  # fmt: skip
    if split != "spatial" or val_sections or test_sections or features is not None or n_comps or layer:
        raise ValueError(
            "`split`, `val_sections`, `test_sections`, `features`, `n_comps` and `layer` apply to a cohort (a list or "
            "mapping of sections); for one section, choose node features in `sg.pp.cell_graph`."
        )
    tile_params(sdata, tile_key)  # a clear error before anything else if sg.pp.tile has not run
    tiles = get_table(sdata, tile_key)
    checked_graph(sdata, table_key=table_key, tile_key=tile_key)  # missing, other tiling or stale: before featurizing
    _check_training_tiles(int((tiles.obs[Keys.SPLIT].to_numpy() == "train").sum()))
    _check_finetune(tiles, backbone, input_size, device, config)  # blocks, split and cache size: before featurizing
    _warn_spinning_threads(device or settings.device)
    featurize(
        sdata, backbone=backbone, tile_key=tile_key, pretrained=pretrained, weights=weights,
        input_size=input_size, batch_size=featurize_batch_size, device=device,
    )  # fmt: skip
    finetune = int(config.get("finetune_blocks", 0) or 0) > 0
    bundle, _ = build_bundle(
        sdata, table_key=table_key, tile_key=tile_key, include_tiles=finetune, candidates=candidates
    )
    return fit_and_record(
        bundle, [tiles], backbone=backbone, pretrained=pretrained, weights=weights, preset=preset, budget=budget,
        device=device, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, config=config, callbacks=callbacks,
        table_names=[tile_key],
    )  # fmt: skip


def _warn_spinning_threads(device: str | None) -> None:
    """On a busy CPU, warn when torch's threads busy-wait (torch imported before sigmma_sc; see ``_threads``)."""
    import torch

    from .._threads import spinning_under_load
    from ..train._device import resolve_device

    if resolve_device(device).type == "cpu":
        message = spinning_under_load(torch.get_num_threads())
        if message is not None:
            logger.warning(message)


def _check_config(preset: str, budget: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse unknown or invalid model settings now, not after featurization (the sizes come from the bundle)."""
    import difflib
    from dataclasses import fields

    from ..model import SigmmaConfig

    names = [f.name for f in fields(SigmmaConfig)]
    derived = {"n_features", "image_dim"}  # from the bundle, never set by hand
    for key in config:
        if key not in names or key in derived:
            close = difflib.get_close_matches(key, [n for n in names if n not in derived], n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise TypeError(
                f"`sg.tl.train_sigmma` got an unknown setting `{key}`; {hint}valid settings are the fields of "
                "`sg.model.SigmmaConfig` (except n_features and image_dim, which come from the data)."
            )
    SigmmaConfig.preset(preset, n_features=1, image_dim=1, **budget, **config)  # value checks (ValueError)


def _check_resume(checkpoint_dir: str | Path | None, *, resume: bool) -> bool:
    """Whether to resume: needs ``checkpoint_dir``; a missing checkpoint warns once, a corrupt one raises now."""
    from ..train._checkpoint import CHECKPOINT, load_checkpoint

    if not resume:
        return False
    if checkpoint_dir is None:
        raise ValueError("`resume=True` needs `checkpoint_dir`: the directory of the run to continue.")
    path = Path(checkpoint_dir) / CHECKPOINT
    if not path.exists():
        logger.warning("No checkpoint at %s; training from scratch (resume=True had nothing to resume).", path)
        return False
    load_checkpoint(path)  # a clear error for a corrupt file before the featurization, not after
    return True


def _check_training_tiles(n_train: int) -> None:
    if n_train < 2:
        raise ValueError(
            f"Only {n_train} training tile(s); contrastive training needs at least 2 (more in practice). "
            "Use a smaller `tile_size_um` in `sg.pp.tile`, or a larger section."
        )


def _check_finetune(tiles: Any, backbone: str, input_size: int | None, device: str | None, config: dict) -> None:
    """Fine-tuning: a backbone with blocks to split and a cache that fits, checked before the featurization."""
    from .._constants import SCALES
    from ..model._finetune import check_finetune
    from ..train._device import resolve_device

    blocks = int(config.get("finetune_blocks", 0) or 0)
    if blocks < 1:
        return
    scales = config.get("scales") or SCALES
    check_finetune(
        backbone, blocks, n_tiles=int(tiles.obs[Keys.SPLIT].isin(["train", "val"]).sum()),
        scales=(scales,) if isinstance(scales, str) else tuple(scales), input_size=input_size,
        finetune_cache=config.get("finetune_cache", "auto"), cache_dir=config.get("cache_dir"),
        device=resolve_device(device),
    )  # fmt: skip
