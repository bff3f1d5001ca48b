"""Plain JSON types for values read back from zarr (where lists become numpy arrays)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays, numpy scalars and tuples turned into lists and Python scalars, recursively.

    SpatialData's zarr round trip turns lists in ``.uns`` into numpy arrays and ints into numpy integers;
    configs and model metadata built from them must hold plain types so that ``json.dumps`` and
    ``torch.load(weights_only=True)`` accept them.

    Parameters
    ----------
    value
        A mapping, sequence, numpy array or scalar.

    Returns
    -------
    The same structure made of ``dict`` (string keys), ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.str_ | bytes):
        return value.decode() if isinstance(value, bytes) else str(value)
    return value
