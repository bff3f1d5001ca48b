"""Training on a cohort: several tiled, graphed sections, one model (called by ``sg.tl.train_sigmma``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import SPLIT_BUFFER, SPLITS, Keys
from .._utils._validate import counts_matrix, get_table
from .._utils._write import save_outputs
from ..data._build import _hash_names, build_bundle
from ..data._cohort import _graph_record, as_sections, cohort_splits, fit_cohort_pca, shared_genes
from ..pp._cell_graph import cell_graph
from ._featurize import featurize
from ._fit import fit_and_record

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel
    from ..train import Callback

logger = logging.getLogger(__name__)


def train_cohort(
    sections: Sequence[SpatialData] | Mapping[str, SpatialData],
    *,
    table_key: str,
    tile_key: str,
    backbone: str,
    pretrained: bool,
    weights: str | Path | None,
    input_size: int | None,
    preset: str,
    steps: int | None,
    epochs: int | None,
    batch_size: int | None,
    device: str | None,
    seed: int,
    checkpoint_dir: str | Path | None,
    resume: bool,
    featurize_batch_size: int,
    split: str,
    val_sections: Sequence[str] | str | None,
    test_sections: Sequence[str] | str | None,
    features: str | None,
    n_comps: int | None,
    layer: str | None,
    config: dict[str, Any],
    callbacks: Sequence[Callback] | None = None,
) -> SigmmaModel:
    """Implementation of :func:`sigmma_sc.tl.train_sigmma` for several sections (see there).

    Returns
    -------
    The trained model; ``model.meta['sections']`` names the sections, ``model.meta['cohort']`` the split.
    """
    from ..model import TrainingBundle

    named = as_sections(sections)
    info = prepare_cohort(
        named, table_key=table_key, tile_key=tile_key, split=split, val_sections=val_sections,
        test_sections=test_sections, features=features, n_comps=n_comps, layer=layer, seed=seed,
    )  # fmt: skip
    finetune = int(config.get("finetune_blocks", 0) or 0) > 0
    bundles = []
    for name, sdata in named.items():
        featurize(
            sdata, backbone=backbone, tile_key=tile_key, pretrained=pretrained, weights=weights,
            input_size=input_size, batch_size=featurize_batch_size, device=device,
        )  # fmt: skip
        logger.info("Section %r:", name)
        bundles.append(build_bundle(sdata, table_key=table_key, tile_key=tile_key, include_tiles=finetune)[0])
    backbones = {get_table(s, tile_key).uns[Keys.UNS]["backbone"]["name"] for s in named.values()}
    if len(backbones) > 1:
        raise ValueError(f"The sections' cached features come from different backbones {sorted(backbones)}; "
                         f"re-run `sg.tl.featurize(..., backbone={backbone!r}, overwrite=True)` on each.")  # fmt: skip
    bundle = TrainingBundle.concat(bundles, names=list(named))
    del bundles
    if info["genes"] is not None:  # embed checks a section's genes against these
        bundle.meta["var_names_hash"] = _hash_names(info["genes"])
    bundle.meta["cohort"] = {k: info[k] for k in ("split", "val_sections", "test_sections")}
    n_train = int((bundle.split == 0).sum())
    if n_train < 2:
        raise ValueError(
            f"Only {n_train} training tile(s) in the cohort; contrastive training needs at least 2 (more in "
            "practice). Hold out fewer sections or use a smaller `tile_size_um` in `sg.pp.tile`."
        )
    logger.info("Cohort bundle: %r", bundle)
    budget = {k: v for k, v in (("steps", steps), ("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    return fit_and_record(
        bundle, [get_table(s, tile_key) for s in named.values()], backbone=backbone, pretrained=pretrained,
        weights=weights, preset=preset, budget=budget, device=device, seed=seed, checkpoint_dir=checkpoint_dir,
        resume=resume, config=config, callbacks=callbacks,
        record={"cohort": {"sections": info["sections"], **bundle.meta["cohort"]}},
        table_names=[f"{tile_key} of section {name!r}" for name in named],
    )  # fmt: skip


def save_cohort_bundles(
    sections: Mapping[str, SpatialData],
    out_dir: str | Path,
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    backbone: str = "efficientnet_lite0",
    pretrained: bool = True,
    input_size: int | None = None,
    device: str | None = None,
    split: str = "spatial",
    val_sections: Sequence[str] | str | None = None,
    test_sections: Sequence[str] | str | None = None,
    features: str | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Path]:
    """Bring a cohort's node features into one space, then featurize and save one bundle per section.

    Sections are featurized and bundled one at a time; each ``out_dir/<name>.pt`` is written atomically and
    a section whose bundle exists is skipped (a killed run resumes). Train on them with
    ``TrainingBundle.load([...])`` or ``sigmma train-bundle out_dir/*.pt``. With ``shard=(rank, world_size)``
    (``sigmma bundle`` under ``torchrun``) this process featurizes only sections ``rank, rank + world_size, ...``;
    the shared PCA is seeded, so every rank computes the same one.

    Returns
    -------
    The bundle paths, in section order.
    """
    named = as_sections(sections)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; pass a folder for the cohort's bundles.")
    info = prepare_cohort(named, table_key=table_key, tile_key=tile_key, split=split, val_sections=val_sections,
                          test_sections=test_sections, features=features)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = shard or (0, 1)
    paths = []
    for i, (name, sdata) in enumerate(named.items()):
        path = out_dir / f"{name}.pt"
        paths.append(path)
        if i % world != rank:
            continue
        if path.exists():
            logger.info("Section %r: bundle %s exists; skipped.", name, path)
            continue
        featurize(sdata, backbone=backbone, tile_key=tile_key, pretrained=pretrained, input_size=input_size,
                  device=device)  # fmt: skip
        bundle = build_bundle(sdata, table_key=table_key, tile_key=tile_key)[0]
        if info["genes"] is not None:
            bundle.meta["var_names_hash"] = _hash_names(info["genes"])
        bundle.meta["cohort"] = {k: info[k] for k in ("split", "val_sections", "test_sections")}
        bundle.save(path)
        logger.info("Section %r: saved %r to %s.", name, bundle, path)
    return paths


def prepare_cohort(
    sections: Mapping[str, SpatialData],
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    split: Literal["spatial", "section"] = "spatial",
    val_sections: Sequence[str] | str | None = None,
    test_sections: Sequence[str] | str | None = None,
    features: str | None = None,
    n_comps: int | None = None,
    layer: str | None = None,
    min_genes: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Validate a cohort, then write its splits, section names and shared node features into every section.

    Everything is checked before anything is written. Then each tile table gets ``.obs['sigmma_section']`` and
    the cohort's ``.obs['split']`` (``split='section'`` keeps the spatial split in ``.obs['split_spatial']``),
    and each cell table node features in one space: with ``features`` (or when every section's graph already
    uses one ``.obsm`` embedding) that embedding; otherwise a PCA over the shared genes fitted on the training
    cells of all sections (:func:`fit_cohort_pca`), written by :func:`sigmma_sc.pp.cell_graph` with ``pca_from``.

    Returns
    -------
    ``{'sections', 'split', 'val_sections', 'test_sections', 'features_key', 'pca', 'genes'}``.
    """
    graphs = {n: _graph_record(s, n, table_key, tile_key) for n, s in sections.items()}
    splits = cohort_splits(sections, tile_key=tile_key, split=split, val_sections=val_sections,
                           test_sections=test_sections)  # fmt: skip
    if not any((sp == "train").any() for sp in splits.values()):
        raise ValueError("The cohort has no training tiles.")
    keys = {g["features_key"] for g in graphs.values()}
    if features is None and len(keys) == 1 and all(g.get("pca") is None for g in graphs.values()):
        features = keys.pop()  # every section already uses the same precomputed embedding
    tables = {n: get_table(s, table_key) for n, s in sections.items()}
    genes = pca = None
    if features is not None:
        widths = {}
        for n, t in tables.items():
            if features not in t.obsm:
                raise KeyError(f"Section {n!r} has no `.obsm[{features!r}]` in table {table_key!r}; add it to every "
                               "section or pass `features=None` for a shared PCA.")  # fmt: skip
            widths[n] = np.shape(t.obsm[features])[1] if np.ndim(t.obsm[features]) == 2 else None
        if len(set(widths.values())) > 1 or None in widths.values():
            raise ValueError(f"`.obsm[{features!r}]` must be a matrix of one width in every section, got {widths}.")
    else:
        for n, t in tables.items():
            counts_matrix(t, layer, f"{table_key} of section {n!r}")  # raw-count checks before any writing
        genes = shared_genes(tables, min_genes=min_genes)
        comps = n_comps or max(int(g.get("n_comps") or 50) for g in graphs.values())
        pca = fit_cohort_pca(sections, splits, genes, table_key=table_key, layer=layer, n_comps=comps, seed=seed)

    names = list(sections)
    for n, sdata in sections.items():  # writing starts here
        tiles = get_table(sdata, tile_key)
        obs = {}
        if split == "section" and Keys.SPLIT_SPATIAL not in tiles.obs:
            obs[Keys.SPLIT_SPATIAL] = tiles.obs[Keys.SPLIT].copy()
        buffered = [SPLIT_BUFFER] if (np.asarray(splits[n]) == SPLIT_BUFFER).any() else []  # sg.pp.tile(split_buffer)
        obs[Keys.SPLIT] = pd.Categorical(splits[n], categories=[*SPLITS, *buffered])
        obs[Keys.SECTION] = pd.Categorical([n] * tiles.n_obs, categories=names)
        save_outputs(tiles, "obs", obs, table=f"{tile_key} of section {n!r}", what=f"cohort {split} split")
        g = graphs[n]
        if pca is not None:
            cell_graph(sdata, table_key=table_key, tile_key=tile_key, n_neighs=int(g["n_neighs"]), layer=layer,
                       key_added=g.get("key_added", Keys.GRAPH), pca_from=pca)  # fmt: skip
        elif g["features_key"] != features:
            cell_graph(sdata, table_key=table_key, tile_key=tile_key, n_neighs=int(g["n_neighs"]),
                       key_added=g.get("key_added", Keys.GRAPH), features=features)  # fmt: skip
    logger.info(
        "Cohort of %d sections (%s split): %s.",
        len(names), split, ", ".join(f"{n} {dict(zip(*np.unique(splits[n], return_counts=True), strict=True))}"
                                     for n in names),
    )  # fmt: skip
    val = [val_sections] if isinstance(val_sections, str) else list(val_sections or [])
    test = [test_sections] if isinstance(test_sections, str) else list(test_sections or [])
    return {
        "sections": names,
        "split": split,
        "val_sections": val,
        "test_sections": test,
        "features_key": Keys.FEATURES if pca is not None else features,
        "pca": pca,
        "genes": genes,
    }
