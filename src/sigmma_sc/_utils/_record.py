"""The ``.uns[prefix]`` records through which readers find what writers wrote.

Every writer records, in ``.uns[key_added][step]`` of each table it writes, its parameters and the keys it
wrote (``'keys'``). Readers take the prefix (``tile_key`` / ``graph_key`` / ``use_rep``) and look the keys up
here, so two tilings, graphs or models can live in one SpatialData. Objects written before the records
carried ``'keys'`` fall back on the default names of :class:`~sigmma_sc._constants.Keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._constants import SCALES, Keys

if TYPE_CHECKING:
    from anndata import AnnData


def write_record(adata: AnnData, prefix: str, step: str, record: Mapping[str, Any]) -> None:
    """Set ``adata.uns[prefix][step] = record``, keeping the prefix's other records."""
    uns = dict(adata.uns.get(prefix, {}) or {})
    uns[step] = dict(record)
    adata.uns[prefix] = uns


def read_record(adata: AnnData, prefix: str, step: str) -> dict[str, Any] | None:
    """``adata.uns[prefix][step]`` or ``None``."""
    entry = adata.uns.get(prefix)
    if not isinstance(entry, Mapping):
        return None
    record = entry.get(step)
    return dict(record) if isinstance(record, Mapping) else None


def tiling_record(tiles: AnnData) -> dict[str, Any] | None:
    """The :func:`sigmma_sc.pp.tile` record of a tile table (``.uns[prefix]['tile']``), whatever its prefix."""
    found = [
        (name, dict(entry["tile"]))
        for name, entry in tiles.uns.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("tile"), Mapping) and "tile_size" in entry["tile"]
    ]
    if not found:
        return None
    if len(found) > 1:  # the record whose prefix is its own (a table copied from another tiling keeps both)
        own = [r for name, r in found if r.get("key_added", Keys.PREFIX) == name]
        found = [(None, own[0])] if own else found
    return found[0][1]


def tiling_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a tiling wrote (its record's ``'keys'``; the default names for older records)."""
    keys = params.get("keys")
    if keys:
        return dict(keys)
    return Keys.tiling(params.get("key_added", Keys.PREFIX), params.get("image_key", "{image_key}"))


def graph_record(cells: AnnData, graph_key: str, table_key: str) -> dict[str, Any]:
    """The :func:`sigmma_sc.pp.cell_graph` record ``.uns[graph_key]['cell_graph']``, or an error naming the fix."""
    record = read_record(cells, graph_key, "cell_graph")
    if record is None or record.get("keys", Keys.graph(graph_key))["connectivities"] not in cells.obsp:
        known = sorted(n for n, e in cells.uns.items() if isinstance(e, Mapping) and "cell_graph" in e)
        raise KeyError(
            f"Table {table_key!r} has no SIGMMA cell graph {graph_key!r}; run `sg.pp.cell_graph` first"
            + (f" (graphs here: {known}; pass `graph_key=`)." if known else ".")
        )
    record.setdefault("keys", Keys.graph(graph_key) | {"features": record.get("features_key")})
    return record


def embedding_keys(adata: AnnData, use_rep: str, kind: str, scales: tuple[str, ...] = SCALES) -> dict[str, str]:
    """Scale -> ``.obsm`` key of the embeddings :func:`sigmma_sc.tl.embed` wrote with ``key_added=use_rep``.

    ``kind``: ``'image'`` / ``'st'`` (tile table) or ``'cell'`` (cell table). Only scales present in ``.obsm``.
    """
    record = read_record(adata, use_rep, "embed") or {}
    keys = (record.get("keys") or Keys.embedding(use_rep, scales)).get(kind, {})
    return {s: keys[s] for s in scales if s in keys and keys[s] in adata.obsm}


def embedding_prefixes(adata: AnnData) -> list[str]:
    """Prefixes of the :func:`sigmma_sc.tl.embed` runs recorded in ``adata.uns``."""
    return [n for n, e in adata.uns.items() if isinstance(e, Mapping) and isinstance(e.get("embed"), Mapping)]


def missing_embedding(table: str, use_rep: str, adata: AnnData, what: str) -> KeyError:
    """The error for an embedding prefix with nothing written: run ``sg.tl.embed`` or pick a recorded prefix."""
    known = embedding_prefixes(adata)
    hint = f" Embeddings recorded here: {known} (pass `use_rep=`)." if known else ""
    return KeyError(
        f"Table {table!r} holds no {what} of `sg.tl.embed(..., key_added={use_rep!r})`; run `sg.tl.embed` first.{hint}"
    )


def rekey(keys: list[str] | tuple[str, ...], use_rep: str) -> list[str]:
    """Embedding keys of one ``sg.tl.embed`` run (e.g. a probe's features) as written under prefix ``use_rep``."""
    import re

    pattern = re.compile(rf"^X_(.+)_({'|'.join(SCALES)})_(image|st)$")
    out = []
    for k in keys:
        m = pattern.match(k)
        if m is None:
            raise ValueError(f"{k!r} is not an embedding key of `sg.tl.embed`; pass `use_rep=None` to read it as is.")
        out.append(Keys.embedding(use_rep)[m.group(3)][m.group(2)])
    return out
