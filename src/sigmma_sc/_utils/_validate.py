"""Input validation shared by the ``pp``/``tl`` functions: one clear error per bad input."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Keys

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def check_positive(value: float, name: str) -> float:
    """Raise unless ``value`` is a finite number > 0."""
    if not isinstance(value, int | float | np.integer | np.floating) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return float(value)


def get_table(sdata: SpatialData, table_key: str) -> AnnData:
    """Return ``sdata.tables[table_key]`` or raise a KeyError listing the tables."""
    if table_key not in sdata.tables:
        raise KeyError(
            f"No table {table_key!r} in the SpatialData object; available tables: {sorted(sdata.tables)}. "
            "Pass `table_key=` with one of them."
        )
    return sdata.tables[table_key]


def get_image(sdata: SpatialData, image_key: str | None) -> tuple[str, Any]:
    """Return ``(key, element)`` for ``image_key`` (or the only image when ``None``)."""
    if image_key is None:
        if len(sdata.images) != 1:
            raise KeyError(
                f"`image_key` is required when the SpatialData object holds {len(sdata.images)} images "
                f"({sorted(sdata.images)}); pass e.g. `image_key='he'`."
            )
        image_key = next(iter(sdata.images))
    if image_key not in sdata.images:
        raise KeyError(
            f"No image {image_key!r} in the SpatialData object; available images: {sorted(sdata.images)}. "
            "Pass `image_key=` with one of them (for Xenium + H&E read with `sg.io.xenium`, the H&E is 'he')."
        )
    return image_key, sdata.images[image_key]


def annotated_element(sdata: SpatialData, table: AnnData, table_key: str) -> tuple[str, Any, str, str]:
    """Return ``(element_key, element, region_key, instance_key)`` of the element a table annotates."""
    from spatialdata.models import get_table_keys

    try:
        region, region_key, instance_key = get_table_keys(table)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"Table {table_key!r} annotates no SpatialData element (it has no 'spatialdata_attrs'). "
            "Parse it with `spatialdata.models.TableModel.parse(table, region=..., region_key=..., instance_key=...)` "
            "so that it annotates the cell shapes or points."
        ) from e
    regions = [region] if isinstance(region, str) else list(region)
    if len(regions) != 1:
        raise ValueError(
            f"Table {table_key!r} annotates {len(regions)} elements ({regions}); sigmma_sc needs one cell element. "
            "Subset the table to one region first."
        )
    key = regions[0]
    if instance_key not in table.obs:
        raise KeyError(
            f"Table {table_key!r} lacks its instance-key column `.obs[{instance_key!r}]`, which links each row to a cell "
            f"of element {key!r}. Restore it (for each row, the id of its cell in the index of {key!r}), or re-parse the table with `spatialdata.models.TableModel.parse(table, region=..., region_key=..., "
            "instance_key=...)` naming a column that holds them."
        )
    for container in (sdata.shapes, sdata.points, sdata.labels):
        if key in container:
            return key, container[key], region_key, instance_key
    raise ValueError(
        f"Table {table_key!r} annotates the element {key!r}, which is not in the SpatialData object. "
        "Add the cell shapes/points element or re-parse the table with the right `region`."
    )


def cell_coordinates(sdata: SpatialData, table: AnnData, table_key: str, coordinate_system: str) -> np.ndarray:
    """Centroids ``(n_obs, 2)`` (x, y) of the table's cells in ``coordinate_system``, in table row order."""
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    key, element, region_key, instance_key = annotated_element(sdata, table, table_key)
    systems = get_transformation(element, get_all=True)
    if coordinate_system not in systems:
        raise ValueError(
            f"The cell element {key!r} is not in coordinate system {coordinate_system!r} "
            f"(it is in {sorted(systems)}). Pass `coordinate_system=` with one the image shares."
        )
    ids = table.obs[instance_key].to_numpy()
    if hasattr(element, "geometry"):  # shapes: centroids of circles/polygons, mapped by the element's affine
        import shapely

        geom = element.geometry.to_numpy()
        kinds = shapely.get_type_id(geom)
        pts = shapely.centroid(geom) if np.any(kinds != 0) else geom
        local = np.c_[shapely.get_x(pts), shapely.get_y(pts)]
        affine = systems[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        centroids = pd.DataFrame(local @ affine[:2, :2].T + affine[:2, 2], index=element.index, columns=["x", "y"])
    else:  # points / labels
        centroids = sd.get_centroids(element, coordinate_system=coordinate_system)
        centroids = centroids.compute() if hasattr(centroids, "compute") else centroids
    try:
        xy = (
            centroids.loc[ids, ["x", "y"]].to_numpy(dtype=np.float64)
            if not centroids.index.equals(pd.Index(ids))
            else centroids[["x", "y"]].to_numpy(dtype=np.float64)
        )
    except KeyError as e:
        raise ValueError(
            f"Some `{instance_key}` values of table {table_key!r} are not in the index of element {key!r}; "
            "the table and its element do not match."
        ) from e
    return xy


def counts_matrix(
    table: AnnData, layer: str | None, table_key: str, *, check_integer: bool = True
) -> sparse.csr_matrix:
    """Return the count matrix as CSR float32 after checking it is finite, non-negative and (``check_integer``) raw.

    ``layer='raw'`` (when the table has no layer of that name) reads ``table.raw`` for the table's genes. With
    ``layer=None``, non-integer values in ``.X`` (log-normalised, scanpy's convention) are replaced by the integer
    counts of ``table.raw`` when it holds them for the same genes (see :func:`resolve_counts_layer`). Otherwise
    non-integer values raise an error naming a layer of integer counts when the table has one, and log a warning.
    """
    layer = resolve_counts_layer(table, layer, table_key)
    X = _layer_matrix(table, layer, table_key)
    if X is None:
        raise ValueError(f"Table {table_key!r} has no counts in `.X`; pass `layer=` naming the counts layer.")
    if hasattr(X, "compute"):
        X = X.compute()
    X = sparse.csr_matrix(X, dtype=np.float32)
    data = X.data
    if not np.all(np.isfinite(data)):
        raise ValueError(
            f"The counts of table {table_key!r} contain NaN or infinite values; sigmma_sc needs raw counts. "
            "Fill or drop those cells, or pass `layer=` naming the raw counts layer."
        )
    if data.size and data.min() < 0:
        raise ValueError(
            f"The counts of table {table_key!r} contain negative values (are they log-normalised or scaled?); "
            "sigmma_sc needs raw counts. Pass `layer=` naming the raw counts layer" + _raw_hint(table) + "."
        )
    if check_integer:
        _check_integer_counts(data, table, layer, table_key)
    return X


RAW = "raw"  # `layer=` value that reads `table.raw` (when the table has no layer of that name)


def _uses_raw(table: AnnData, layer: str | None) -> bool:
    return layer == RAW and RAW not in table.layers


def _layer_matrix(table: AnnData, layer: str | None, table_key: str) -> Any:
    """``.X``, ``.layers[layer]`` or (``layer='raw'``) ``.raw.X`` restricted to the table's genes, in their order."""
    if _uses_raw(table, layer):
        if table.raw is None:
            raise KeyError(
                f"Table {table_key!r} has no `.raw` and no layer 'raw'; available layers: {sorted(table.layers)}. "
                "Pass `layer=` naming a layer of raw counts, or `layer=None` for `.X`."
            )
        col = table.raw.var_names.get_indexer(table.var_names)
        if (col < 0).any() or table.raw.var_names.has_duplicates:
            missing = table.var_names[col < 0]
            raise ValueError(
                f"`.raw` of table {table_key!r} lacks {int((col < 0).sum())} of the table's {table.n_vars} genes "
                f"(e.g. {list(missing[:3])}), so it cannot give their counts. Put the counts in a layer of the same "
                "genes (e.g. table.layers['counts'] = ...) and pass `layer='counts'`."
            )
        X = table.raw.X
        return X[:, col] if not np.array_equal(col, np.arange(X.shape[1])) else X
    if layer is not None and layer not in table.layers:
        raise KeyError(
            f"No layer {layer!r} in table {table_key!r}; available layers: {sorted(table.layers)}"
            + ("; `layer='raw'` reads `.raw`" if table.raw is not None else "")
            + "."
        )
    return table.X if layer is None else table.layers[layer]


def _raw_hint(table: AnnData) -> str:
    return " (or `layer='raw'` for `.raw`)" if getattr(table, "raw", None) is not None else ""


def _integer_values(M: Any) -> bool:
    """Whether a matrix holds finite, non-negative integers (checked on a sample)."""
    if M is None:
        return False
    if hasattr(M, "compute"):
        M = M.compute()
    values = M.data if sparse.issparse(M) else np.asarray(M).ravel()
    values = values[:: max(1, values.size // 1_000_000)]
    return bool(values.size) and bool(np.all(np.isfinite(values))) and values.min() >= 0 and _is_integer(values)


def resolve_counts_layer(table: AnnData, layer: str | None, table_key: str) -> str | None:
    """The layer that holds the raw counts: ``layer``, or ``'raw'`` (``table.raw``) when scanpy's convention applies.

    That is when ``layer`` is ``None``, ``.X`` is not integer (log-normalised) and ``table.raw`` holds integer
    counts for all the table's genes. Using ``.raw`` is logged at INFO; pass ``layer=`` to choose explicitly.
    """
    if layer is not None or getattr(table, "raw", None) is None or table.X is None or RAW in table.layers:
        return layer
    X = table.X.compute() if hasattr(table.X, "compute") else table.X
    values = X.data if sparse.issparse(X) else np.asarray(X).ravel()
    values = values[:: max(1, values.size // 1_000_000)]  # a sample, as _is_integer takes
    if not values.size or _is_integer(values[np.isfinite(values)]):
        return layer
    if not _raw_counts_for_genes(table):
        return layer
    logger.info(
        "Table %r: `.X` is not integer (log-normalised?) and `.raw` holds integer counts for its %d genes; using "
        "`.raw` (layer='raw'). Pass `layer=` to use another layer.",
        table_key, table.n_vars,
    )  # fmt: skip
    return RAW


def _is_integer(values: np.ndarray, n: int = 1_000_000) -> bool:
    sample = values[:: max(1, values.size // n)]
    return bool(np.all(sample == np.round(sample)))


def _check_integer_counts(data: np.ndarray, table: AnnData, layer: str | None, table_key: str) -> None:
    if _is_integer(data):
        return
    where = "`.X`" if layer is None else f"layer {layer!r}"
    example = float(data[np.flatnonzero(data != np.round(data))[0]])
    raw = [RAW] if layer != RAW and RAW not in table.layers and _raw_counts_for_genes(table) else []
    for name in table.layers:
        if name == layer:
            continue
        M = table.layers[name]
        values = M.data if sparse.issparse(M) else np.asarray(M).ravel()
        if values.size and np.all(np.isfinite(values[:1000])) and values.min() >= 0 and _is_integer(values):
            raw.append(name)
    if raw:
        raise ValueError(
            f"The counts in {where} of table {table_key!r} are not integers (e.g. {example:.4g}: log-normalised?), "
            f"and sigmma_sc sums and log-normalises raw counts itself. Pass `layer={raw[0]!r}` (integer counts in: "
            f"{raw}; 'raw' is `.raw`)."
        )
    logger.warning(
        "The counts in %s of table %r are not integers (e.g. %.4g: log-normalised or scaled?); sigmma_sc sums "
        "and log-normalises them as raw counts. Pass `layer=` naming the raw counts if the table has them%s.",
        where, table_key, example, _raw_status(table),
    )  # fmt: skip


def _raw_counts_for_genes(table: AnnData) -> bool:
    if getattr(table, "raw", None) is None:
        return False
    col = table.raw.var_names.get_indexer(table.var_names)
    return not (col < 0).any() and not table.raw.var_names.has_duplicates and _integer_values(table.raw.X[:, col])


def _raw_status(table: AnnData) -> str:
    if getattr(table, "raw", None) is None:
        return " (no layer and no `.raw` holds them here)"
    col = table.raw.var_names.get_indexer(table.var_names)
    if (col < 0).any():
        return f" (`.raw` lacks {int((col < 0).sum())} of the genes, so it cannot be used)"
    return " (`.raw` is not integer counts either)"


_UM_NAMES = ("um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres")


def is_um_name(coordinate_system: str) -> bool:
    """Whether a coordinate system's name says that its unit is the micrometre (``'microns'``, ``'global_um'``, ...)."""
    name = str(coordinate_system).lower()
    return name in _UM_NAMES or any(name.endswith(sep + u) for u in _UM_NAMES for sep in ("_", "-", " "))


def um_per_unit(sdata: SpatialData, coordinate_system: str, value: float | None) -> float:
    """Micrometres per unit of ``coordinate_system``.

    In order: ``value``; what ``sg.io`` recorded in ``sdata.attrs['sigmma']['um_per_unit']``; 1 when the
    coordinate system's name says it is in micrometres (e.g. ``'microns'``, ``'global_um'``).
    """
    if value is not None:
        return check_positive(value, "um_per_unit")
    recorded = (getattr(sdata, "attrs", None) or {}).get(Keys.UNS, {}).get("um_per_unit", {})
    if coordinate_system in recorded:
        return check_positive(recorded[coordinate_system], "um_per_unit")
    if is_um_name(coordinate_system):
        logger.info(
            "Coordinate system %r is taken to be in micrometres (um_per_unit=1) from its name.", coordinate_system
        )
        return 1.0
    known = f" (recorded: {sorted(recorded)})" if recorded else ""
    raise ValueError(
        f"The physical scale of coordinate system {coordinate_system!r} is unknown{known}. Pass `um_per_unit=` "
        "(micrometres per coordinate unit; for a Xenium run read with spatialdata-io, 'global' is in morphology "
        "pixels: um_per_unit=0.2125), or read the section with a `sg.io` reader (`sg.io.xenium`, `sg.io.cosmx`, "
        "`sg.io.merscope`, `sg.io.visium_hd`, `sg.io.from_anndata`), which records it."
    )


def shared_coordinate_system(sdata: SpatialData, image: Any, table: AnnData | None, table_key: str | None) -> str:
    """The coordinate system that places both the image and the table's cells (``'global'`` when it does).

    Raises with the systems of each when they share none, or when several are shared and none is ``'global'``.
    """
    from spatialdata.transformations import get_transformation

    image_cs = set(get_transformation(image, get_all=True))
    if table is None:
        shared, what = image_cs, "the image"
    else:
        key, element, _, _ = annotated_element(sdata, table, table_key)
        cell_cs = set(get_transformation(element, get_all=True))
        shared, what = image_cs & cell_cs, f"the image and the cell element {key!r}"
        if not shared:
            raise ValueError(
                f"The image (coordinate systems {sorted(image_cs)}) and the cell element {key!r} (coordinate systems "
                f"{sorted(cell_cs)}) share no coordinate system. Register the image to the cells with "
                "`spatialdata.transformations.set_transformation`, or read the section with a `sg.io` reader."
            )
    if "global" in shared or len(shared) == 1:
        return "global" if "global" in shared else next(iter(shared))
    recorded = (getattr(sdata, "attrs", None) or {}).get(Keys.UNS, {}).get("um_per_unit", {})
    known = sorted(shared & set(recorded))
    if len(known) == 1:
        return known[0]
    raise ValueError(
        f"{what.capitalize()} share several coordinate systems ({sorted(shared)}); pass `coordinate_system=` "
        "with one of them."
    )


def require_obs(table: AnnData, keys: list[str], table_key: str, step: str) -> None:
    """Raise a KeyError naming ``step`` when a column is missing from ``table.obs``."""
    missing = [k for k in keys if k not in table.obs]
    if missing:
        raise KeyError(f"Table {table_key!r} lacks {missing} in `.obs`; run `{step}` first.")


def categorical(values: Any, categories: list[str] | tuple[str, ...]) -> pd.Categorical:
    """A pandas Categorical with fixed categories."""
    return pd.Categorical(values, categories=list(categories))


def check_prefix(value: str, name: str = "key_added") -> str:
    """A ``key_added`` prefix: a non-empty string without ``'/'`` (zarr refuses it in keys) or ``'{'``."""
    if not isinstance(value, str) or not value or "/" in value or "{" in value:
        raise ValueError(f"`{name}` must be a non-empty name without '/' or '{{', got {value!r}.")
    return value


def tiling_fingerprint(tile_of_cell: np.ndarray) -> str:
    """A short hash of the cells' tile ids: the tiling a cell graph was built on (recorded by ``sg.pp.cell_graph``)."""
    import hashlib

    ids = np.ascontiguousarray(np.asarray(tile_of_cell, dtype=np.int64))
    return hashlib.sha1(ids.tobytes(), usedforsecurity=False).hexdigest()[:16]


def check_graph_tiling(
    table: AnnData, table_key: str, graph: dict[str, Any], tile_col: str = Keys.CELL_TILE, connectivities: str | None = None
) -> None:
    """A clear error when a cell graph was built on an earlier tiling (``sg.pp.tile`` ran again after it).

    Compares the tiling recorded by ``sg.pp.cell_graph`` (``graph['tiling']``) with the cells' current tile ids
    ``.obs[tile_col]``, and (also for graphs written before the tiling was recorded) checks that no edge of
    ``.obsp[connectivities]`` links cells of different tiles.
    """
    stale = (
        f"The cell graph of table {table_key!r} was built on an earlier tiling (`sg.pp.tile` ran again after "
        "`sg.pp.cell_graph`); run `sg.pp.cell_graph` again after `sg.pp.tile`."
    )
    require_obs(table, [tile_col], table_key, "sg.pp.tile")
    tile_of = table.obs[tile_col].to_numpy().astype(np.int64)
    recorded = graph.get("tiling")
    if recorded is not None and str(recorded) != tiling_fingerprint(tile_of):
        raise ValueError(stale)
    key = connectivities or (graph.get("keys") or {}).get("connectivities") or Keys.graph(Keys.GRAPH)["connectivities"]
    conn = table.obsp[key].tocoo()
    if (tile_of[conn.row] != tile_of[conn.col]).any() or (tile_of[conn.row] < 0).any():
        raise ValueError(stale)
