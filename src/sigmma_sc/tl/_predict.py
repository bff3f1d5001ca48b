"""``sg.tl.predict_expression``: tile expression of an image-only section from a fitted linear probe."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Keys
from .._utils._record import rekey, tiling_record
from .._utils._write import save_output

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..metrics import ProbeResult

logger = logging.getLogger(__name__)

_UNITS = {
    "paper": "log1p of counts normalised to the training tiles' median total count",
    "hest": "log1p of summed raw counts",
}


def predict_expression(
    sdata: SpatialData | AnnData,
    probe: ProbeResult,
    *,
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str | None = None,
    key_added: str = Keys.PREDICTED_EXPRESSION,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Predict each tile's expression from its image embedding with a probe fitted on another section.

    The typical use is a section with an image and no transcriptomics (e.g. an H&E slide): tile it with
    :func:`sigmma_sc.pp.tile`, embed it with :func:`sigmma_sc.tl.embed` and the model trained on a Xenium
    section, and apply the linear probe fitted on that Xenium section's *training* tiles
    (:func:`sigmma_sc.metrics.linear_probe`). Both sections must be embedded by the same model: the probe
    reads the same tile-table ``.obsm`` keys it was fitted on.

    Parameters
    ----------
    sdata
        Section whose tiles are predicted, processed by :func:`sigmma_sc.tl.embed` (or its tile table).
    probe
        Probe from :func:`sigmma_sc.metrics.linear_probe`, fitted with ``.obsm`` key(s) (not an array).
    tile_key
        Tile table of ``sdata``.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run of this section whose image embeddings feed the
        probe (the probe's scales, under that prefix); ``None``: the ``.obsm`` keys the probe was fitted on.
    key_added
        Key of the predictions in the tile table's ``.obsm`` and of their record in its ``.uns``.
    inplace
        Write into ``sdata`` and return ``None``; ``False`` returns the predictions and writes nothing.

    Returns
    -------
    With ``inplace=True``, writes

    - ``tiles.obsm['sigmma_expression_pred' | key_added]``: :class:`~pandas.DataFrame`, tiles x the probe's
      genes, on the probe's target scale (paper protocol: ``log1p`` of counts normalised to the training
      tiles' median total; HEST: ``log1p`` of summed raw counts);
    - ``tiles.uns['sigmma_expression_pred' | key_added]``: ``protocol``, ``embedding``, ``genes``, ``units``,
      ``alpha``, ``n_train_tiles``, ``target_sum`` (paper protocol: the total count tiles were normalised to)
      and the tile and pixel size the probe was fitted on (``fitted_tile_size_um``, ``fitted_pixel_size_um``).

    A section tiled at another tile or pixel size than the probe's is predicted with a warning.

    With ``inplace=False``, the same table is returned instead.
    """
    from ..metrics._probe import ProbeResult

    if not isinstance(probe, ProbeResult):
        raise TypeError(f"`probe` must be a ProbeResult from `sg.metrics.linear_probe`, got {type(probe).__name__}.")
    if not probe.embedding_keys:
        raise ValueError(
            "This probe was fitted on an array, so its features cannot be read from another section. Fit it "
            "with `.obsm` key(s), e.g. `sg.metrics.linear_probe(sdata, 'X_sigmma_macro_image')`."
        )
    from ..metrics._probe import embedding_matrix
    from ..metrics._retrieval import tile_table

    tiles = tile_table(sdata, tile_key)
    feature_keys = list(probe.embedding_keys) if use_rep is None else rekey(probe.embedding_keys, use_rep)
    missing = [k for k in feature_keys if k not in tiles.obsm]
    if missing:
        raise KeyError(
            f"Tile table {tile_key!r} has no `.obsm` {missing} (available: {sorted(tiles.obsm)}). Embed this "
            "section with the model the probe was fitted on: `sg.tl.embed(sdata, model, table_key=None)` for an "
            "image-only section."
        )
    here = tiling_record(tiles) or {}
    for k, fitted in probe.tiling.items():
        if k in here and not np.isclose(float(here[k]), fitted, rtol=0.01):
            logger.warning(
                "The probe was fitted on tiles with %s = %g, this section was tiled with %g: the embeddings and "
                "the expression scale (summed counts grow with tile area) differ; tile both sections alike.",
                k, fitted, float(here[k]),
            )  # fmt: skip
    x, _ = embedding_matrix(tiles, feature_keys)
    ok = np.isfinite(x).all(1)
    pred = np.full((tiles.n_obs, len(probe.genes)), np.nan)
    if ok.any():
        pred[ok] = probe.predict(x[ok])
    if not ok.all():
        logger.warning("%d tile(s) without a finite embedding get NaN predictions.", int((~ok).sum()))
    df = pd.DataFrame(pred, index=tiles.obs_names.copy(), columns=pd.Index(probe.genes, dtype=str))
    if not inplace:
        return df
    what = f"{len(probe.genes)} predicted genes for {int(ok.sum())} tiles"
    save_output(tiles, "obsm", key_added, df, table=tile_key, what=what)
    save_output(tiles, "uns", key_added, {
        "protocol": probe.protocol,
        "embedding": list(feature_keys),
        "genes": list(probe.genes),
        "units": _UNITS[probe.protocol],
        "alpha": float(probe.alpha),
        "n_train_tiles": len(probe.tiles["train"]),
        **({"target_sum": float(probe.target_sum)} if probe.target_sum is not None else {}),
        **{f"fitted_{k}": v for k, v in probe.tiling.items()},
    }, table=tile_key, what="probe record")  # fmt: skip
    return None
