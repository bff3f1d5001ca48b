"""Helpers shared by the readers: the cell table on circles, the physical scale record, folder checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

CELLS_KEY = "cell_circles"


def check_folder(path: str | Path, required: dict[str, str], technology: str) -> Path:
    """Raise one clear error when ``path`` is not a folder or lacks files (``{pattern: description}``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{technology} folder {str(path)!r} does not exist; pass the output folder of the run.")
    missing = [f"{pattern} ({what})" for pattern, what in required.items() if not any(path.glob(pattern))]
    if missing:
        raise FileNotFoundError(
            f"{str(path)!r} is not a {technology} output folder: missing {', '.join(missing)}. Pass the folder that "
            "holds these files."
        )
    return path


def annotate_circles(
    sdata: SpatialData, table: AnnData, xy: np.ndarray, radius: np.ndarray, transformations: dict, key: str = CELLS_KEY
) -> AnnData:
    """Add the cells as circles ``key`` (centres ``xy`` in the units of ``transformations``) and re-annotate ``table``.

    Returns the re-parsed table (annotating ``key``, region key ``'region'``, instance key ``'cell_index'``).
    """
    from spatialdata.models import ShapesModel, TableModel

    table = table.copy()
    table.uns.pop(TableModel.ATTRS_KEY, None)
    ids = np.arange(table.n_obs)
    region_key = "region" if "region" not in table.obs else "sigmma_region"
    table.obs[region_key] = pd.Categorical([key] * table.n_obs)
    table.obs["cell_index"] = ids
    sdata.shapes[key] = ShapesModel.parse(
        np.asarray(xy, dtype=np.float64), geometry=0, radius=np.asarray(radius, dtype=np.float64),
        index=pd.Index(ids), transformations=transformations,
    )  # fmt: skip
    return TableModel.parse(table, region=key, region_key=region_key, instance_key="cell_index")


def record_scale(sdata: SpatialData, um_per_unit: dict[str, float]) -> None:
    """Record µm per coordinate unit in ``sdata.attrs['sigmma']['um_per_unit']`` (read by ``sg.pp.tile``)."""
    record = sdata.attrs.setdefault("sigmma", {}).setdefault("um_per_unit", {})
    record.update({k: float(v) for k, v in um_per_unit.items()})


def element_counts(sdata: SpatialData) -> str:
    """``'images=1, shapes=2, ...'`` for the log."""
    names = ("images", "labels", "shapes", "points", "tables")
    return ", ".join(f"{n}={len(getattr(sdata, n))}" for n in names if len(getattr(sdata, n)))
