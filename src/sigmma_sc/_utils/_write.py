"""Write an output into a SpatialData object or a table and log it, in the same words at every write site.

Every function that writes into ``sdata`` goes through :func:`save_output` (one key), :func:`save_outputs`
(several keys of one field, logged on one line) or :func:`save_record` (a ``.uns[prefix][step]`` record), as
squidpy's ``_save_data`` does. Each logs one INFO line::

    Added `.obsm['X_sigmma_micro', 'X_sigmma_meso']` to table 'table' (cell embeddings).
    Added `sdata.shapes['he_sigmma_tiles']` (tiles).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ._record import write_record

logger = logging.getLogger(__name__)

#: SpatialData element fields (``sdata.<attr>[key] = value``)
ELEMENTS = ("images", "labels", "points", "shapes", "tables")
#: AnnData fields (``adata.<attr>[key] = value``)
FIELDS = ("obs", "obsm", "obsp", "var", "varm", "varp", "layers", "uns")


def save_output(
    container: Any, attr: str, key: str, value: Any, *, table: str | None = None, what: str | None = None
) -> None:
    """Set ``container.<attr>[key] = value`` and log it.

    Parameters
    ----------
    container
        A :class:`~spatialdata.SpatialData` (``attr`` one of :data:`ELEMENTS`) or an :class:`~anndata.AnnData`
        (``attr`` one of :data:`FIELDS`).
    attr
        The field written, e.g. ``'obsm'`` or ``'shapes'``.
    key
        Key written in that field.
    value
        What is written.
    table
        Name of the table ``container`` is in ``sdata.tables`` (AnnData only), for the log line.
    what
        A few words saying what the output is, for the log line.
    """
    save_outputs(container, attr, {key: value}, table=table, what=what)


def save_outputs(
    container: Any, attr: str, values: Mapping[str, Any], *, table: str | None = None, what: str | None = None
) -> None:
    """Set ``container.<attr>[key] = value`` for every item of ``values`` and log them on one line."""
    _check(container, attr)
    field = getattr(container, attr)
    for key, value in values.items():
        field[key] = value
    _log(attr, list(values), table, what)


def save_record(adata: Any, prefix: str, step: str, record: Mapping[str, Any], *, table: str | None = None) -> None:
    """Write the ``.uns[prefix][step]`` record of a step (keeping the prefix's other records) and log it."""
    write_record(adata, prefix, step, record)
    _log("uns", [prefix], table, f"{step} record", sub=step)


def added_message(
    attr: str, keys: list[str], table: str | None = None, what: str | None = None, sub: str | None = None
) -> str:
    """The log line of a write: ``Added `.obsm['X_a', 'X_b']` to table 'table' (what).``."""
    names = ", ".join(repr(str(k)) for k in keys)
    field = f"{attr}[{names}]" + (f"[{sub!r}]" if sub is not None else "")
    if attr in ELEMENTS:
        where = f"`sdata.{field}`"
    else:
        where = f"`.{field}` to " + (f"table {table!r}" if table is not None else "the AnnData")
    return f"Added {where}" + (f" ({what})" if what else "") + "."


def _log(attr: str, keys: list[str], table: str | None, what: str | None, sub: str | None = None) -> None:
    logger.info(added_message(attr, keys, table, what, sub))


def _check(container: Any, attr: str) -> None:
    if attr not in ELEMENTS + FIELDS:
        raise ValueError(f"Cannot write into {attr!r}: not a SpatialData element type {ELEMENTS} nor a field {FIELDS}.")
    if not hasattr(container, attr):
        raise TypeError(f"{type(container).__name__} has no {attr!r} to write into.")
