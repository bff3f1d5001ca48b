"""Build, fit and record a model: the path that ``sg.tl.train_sigmma`` takes for one section and for a cohort."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import Keys
from .._utils._version import package_version
from .._utils._write import save_record
from ..train._diagnostics import kept_summary
from ._records import history_columns

if TYPE_CHECKING:
    from anndata import AnnData

    from ..model import SigmmaModel, TrainingBundle
    from ..train import Callback

logger = logging.getLogger(__name__)

#: the fields of the featurization record (``.uns['sigmma']['backbone']``) that a model keeps
BACKBONE_INFO = ("name", "num_features", "input_size", "mean", "std", "is_vit")


def fit_and_record(
    bundle: TrainingBundle,
    tiles: Sequence[AnnData],
    *,
    backbone: str,
    pretrained: bool,
    weights: str | Path | None,
    preset: str,
    budget: dict[str, Any],
    device: str | None,
    seed: int,
    checkpoint_dir: str | Path | None,
    resume: bool,
    config: dict[str, Any],
    callbacks: Sequence[Callback] | None = None,
    record: dict[str, Any] | None = None,
    table_names: Sequence[str] | None = None,
) -> SigmmaModel:
    """A :class:`~sigmma_sc.model.SigmmaModel` built from the bundle, fitted, and recorded in every tile table.

    The backbone's description comes from the first tile table's featurization record. Writes
    ``.uns['sigmma']['training']`` (configuration, history, diagnostics, package version and the ``record``
    extras) into each of ``tiles`` (named ``table_names`` in the log line).
    """
    from .._settings import settings
    from ..model import SigmmaModel

    info = tiles[0].uns[Keys.UNS]["backbone"]
    if weights is not None:  # the architecture is `backbone`, its weights a local file
        config.setdefault("backbone_weights", str(weights))
    model = SigmmaModel.from_bundle(
        bundle,
        preset=preset,
        **budget,
        backbone=backbone,
        backbone_pretrained=bool(pretrained),
        backbone_info={k: info[k] for k in BACKBONE_INFO},
        seed=seed,
        **config,
    )
    history = model.fit(
        bundle, device=device or settings.device, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
        callbacks=callbacks,
    )  # fmt: skip
    training = {
        "config": model.config.to_dict(),
        "history": history_columns(history),
        "diagnostics": model.diagnostics,
        "version": package_version(),
        **(record or {}),
    }
    names = list(table_names) if table_names is not None else [None] * len(tiles)
    for table, name in zip(tiles, names, strict=True):
        save_record(table, Keys.UNS, "training", training, table=name)
    summary = kept_summary(history, model.diagnostics or {})
    if summary is not None:
        logger.info(summary)
    return model
