"""Cohorts of sections: names, splits, shared genes and node features in one space, joined tile tables."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import SPLIT_BUFFER, SPLITS, Keys
from .._utils._record import graph_record
from .._utils._validate import counts_matrix, get_table
from ._records import Tiling

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def as_sections(sections: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData]) -> dict[str, SpatialData]:
    """Name -> section: a mapping as given, a list as ``section_0``, ``section_1``, ... (one object: ``section_0``)."""
    from spatialdata import SpatialData

    if isinstance(sections, SpatialData):
        sections = [sections]
    if isinstance(sections, Mapping):
        named = {str(k): v for k, v in sections.items()}
        if len(named) < len(sections):
            raise ValueError("Section names must be unique as strings.")
    elif isinstance(sections, Sequence) and not isinstance(sections, str):
        named = {f"section_{i}": s for i, s in enumerate(sections)}
    else:
        raise TypeError(
            f"Expected a SpatialData object, a list of them or a mapping name -> SpatialData, got {type(sections)}."
        )
    if not named:
        raise ValueError("No sections given.")
    bad = [k for k, v in named.items() if not isinstance(v, SpatialData)]
    if bad:
        raise TypeError(f"Sections {bad} are not SpatialData objects.")
    if len({id(v) for v in named.values()}) < len(named):
        raise ValueError("The same SpatialData object is given twice; pass each section once.")
    return named


def _graph_record(sdata: SpatialData, name: str, table_key: str, tile_key: str) -> dict[str, Any]:
    try:
        Tiling.resolve(sdata, tile_key)
        cells = get_table(sdata, table_key)
        return graph_record(cells, Keys.PREFIX, table_key)
    except KeyError as e:
        raise KeyError(f"Section {name!r}: {e.args[0]}") from e


def cohort_splits(
    sections: Mapping[str, SpatialData],
    *,
    tile_key: str = Keys.TILE_TABLE,
    split: Literal["spatial", "section"] = "spatial",
    val_sections: Sequence[str] | str | None = None,
    test_sections: Sequence[str] | str | None = None,
) -> dict[str, np.ndarray]:
    """Each section's tile split (``'train'``/``'val'``/``'test'`` strings), computed and not written.

    ``'spatial'``: the spatial 8:1:1 split of :func:`sigmma_sc.pp.tile` inside every section (the copy in
    ``.obs['split_spatial']`` when an earlier ``split='section'`` run overwrote it). ``'section'``: every tile of
    a section in ``val_sections`` is a validation tile, of one in ``test_sections`` a test tile, the others train.
    """
    val = [val_sections] if isinstance(val_sections, str) else list(val_sections or [])
    test = [test_sections] if isinstance(test_sections, str) else list(test_sections or [])
    if split not in ("spatial", "section"):
        raise ValueError(f"`split` must be 'spatial' or 'section', got {split!r}.")
    if split == "spatial":
        if val or test:
            raise ValueError("`val_sections`/`test_sections` hold out whole sections: pass them with split='section'.")
        out = {}
        for name, sdata in sections.items():
            obs = get_table(sdata, tile_key).obs
            col = Keys.SPLIT_SPATIAL if Keys.SPLIT_SPATIAL in obs else Keys.SPLIT
            out[name] = obs[col].astype(str).to_numpy()
        return out
    unknown = sorted(set(val + test) - set(sections))
    if unknown:
        raise ValueError(
            f"Unknown sections {unknown} in `val_sections`/`test_sections`; the cohort has {list(sections)}."
        )
    if set(val) & set(test):
        raise ValueError(f"Sections {sorted(set(val) & set(test))} are both validation and test sections.")
    if not test and not val:
        raise ValueError("split='section' needs the held-out sections: pass `test_sections=` (and `val_sections=`).")
    train = [n for n in sections if n not in val and n not in test]
    if not train:
        raise ValueError("Every section is held out; keep at least one training section.")
    role = dict.fromkeys(val, "val") | dict.fromkeys(test, "test")
    return {n: np.full(get_table(s, tile_key).n_obs, role.get(n, "train"), dtype=object) for n, s in sections.items()}


def shared_genes(tables: Mapping[str, AnnData], *, min_genes: int = 10) -> list[str]:
    """Genes present in every table, in the first table's order; logs what each section drops."""
    names = list(tables)
    first = tables[names[0]].var_names.astype(str)
    common = set(first)
    for t in tables.values():
        common &= set(t.var_names.astype(str))
    genes = [g for g in first if g in common]
    for name, t in tables.items():
        dropped = t.n_vars - len(genes)
        if dropped:
            extra = [g for g in t.var_names.astype(str) if g not in common]
            logger.info(
                "Section %r: %d of its %d genes are not shared by every section and are dropped (e.g. %s).",
                name, dropped, t.n_vars, extra[:5],
            )  # fmt: skip
    if len(genes) < min_genes:
        raise ValueError(
            f"The sections share only {len(genes)} genes (fewer than {min_genes}), too few for node features in one "
            "space. Train on sections measured with the same panel, or pass `features=` naming a shared `.obsm` "
            "embedding (e.g. from a single-cell foundation model) that every section holds."
        )
    return genes


def _train_cells(sdata: SpatialData, table_key: str, split: np.ndarray, tile_key: str = Keys.TILE_TABLE) -> np.ndarray:
    tile_of = Tiling.resolve(sdata, tile_key).cell_tiles(get_table(sdata, table_key), table_key)
    ok = tile_of >= 0
    train = np.zeros(tile_of.size, dtype=bool)
    train[ok] = split[tile_of[ok]] == "train"
    return np.flatnonzero(train)


def fit_cohort_pca(
    sections: Mapping[str, SpatialData],
    splits: Mapping[str, np.ndarray],
    genes: Sequence[str],
    *,
    table_key: str = "table",
    layer: str | None = None,
    n_comps: int = 50,
    max_cells: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    """One PCA of log-normalised counts over ``genes``, fitted on the training cells of all sections.

    At most ``max_cells`` training cells enter the fit, drawn from each section in proportion to its training
    cells (seeded), so memory stays bounded by one section's counts at a time plus the sample.

    Returns
    -------
    The PCA record of :func:`sigmma_sc.pp.cell_graph` (``target_sum``, ``mean``, ``components``, ``var_names``),
    for ``sg.pp.cell_graph(..., pca_from=...)``.
    """
    from scipy import sparse

    from ._pca import fit_log_pca

    rows = {n: _train_cells(s, table_key, splits[n]) for n, s in sections.items()}
    total = sum(r.size for r in rows.values())
    if total < 2:
        raise ValueError("Fewer than 2 cells lie in training tiles of the cohort; cannot fit the node-feature PCA.")
    rng = np.random.default_rng(seed)
    parts = []
    for n, s in sections.items():
        r = rows[n]
        quota = r.size if total <= max_cells else round(max_cells * r.size / total)
        if quota < r.size:
            r = np.sort(rng.choice(r, quota, replace=False))
        table = get_table(s, table_key)
        col = pd.Index(table.var_names.astype(str)).get_indexer(list(genes))
        parts.append(counts_matrix(table, layer, table_key)[r][:, col])
    sub = sparse.vstack(parts, format="csr")
    pca = fit_log_pca(sub, np.ones(sub.shape[0], dtype=bool), n_comps, max_cells=max_cells, seed=seed)
    pca["var_names"] = np.asarray(list(genes), dtype=str)
    logger.info(
        "Fitted the cohort's node-feature PCA (%d components, %d shared genes) on %d training cells of %d sections.",
        pca["components"].shape[1], len(genes), sub.shape[0], len(sections),
    )  # fmt: skip
    return pca


def cohort_tile_table(
    sections: Sequence[SpatialData] | Mapping[str, SpatialData], tile_key: str = Keys.TILE_TABLE
) -> AnnData:
    """The tile tables of several sections as one AnnData (shared genes; ``.obs['sigmma_section']``; splits kept).

    Only the ``.obsm`` keys present in every section are kept. Use it to score held-out sections with
    :func:`sigmma_sc.metrics.evaluate`, whose probes are then fitted on the training tiles of all sections.
    """
    import anndata as ad

    named = as_sections(sections)
    tables = {}
    for n, s in named.items():
        t = get_table(s, tile_key)
        if Keys.SPLIT not in t.obs:
            raise KeyError(f"Section {n!r}: the tile table has no `.obs[{Keys.SPLIT!r}]`; run `sg.pp.tile` first.")
        tables[n] = ad.AnnData(X=t.X, obs=t.obs.copy(), var=pd.DataFrame(index=t.var_names.astype(str)),
                               obsm=dict(t.obsm))  # fmt: skip
    joined = ad.concat(tables, join="inner", label="_section_label", index_unique="-")
    joined.obs[Keys.SECTION] = pd.Categorical(joined.obs.pop("_section_label").astype(str), categories=list(named))
    categories = list(SPLITS) + ([SPLIT_BUFFER] if (joined.obs[Keys.SPLIT].astype(str) == SPLIT_BUFFER).any() else [])
    joined.obs[Keys.SPLIT] = pd.Categorical(joined.obs[Keys.SPLIT].astype(str), categories=categories)
    return joined
