"""Synthetic 10x Xenium output folder with a registered H&E image and a known ground truth."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ._expression import CONTACT_FRACTION, CONTACT_GENES, N_NEG_CONTROLS, ExpressionModel
from ._render import Frame, Renderer
from ._tiff import BLOCK, iter_strips, n_levels, write_blank_pyramid, write_pyramid
from ._tissue import (
    CELL_DOMAINS,
    CELL_TYPES,
    CONTACT_DISTANCE_UM,
    CONTACT_NUCLEUS_SCALE,
    CONTACT_RECEIVER,
    CONTACT_SENDER,
    CONTACT_STAIN_SCALE,
    DOMAINS,
    make_layout,
    place_cells,
)
from ._transcripts import TranscriptWriter, write_placeholder
from ._xenium_files import (
    PIXEL_SIZE,
    MatrixWriter,
    cell_id_strings,
    open_cells_zarr,
    write_boundaries,
    write_cells_parquet,
    write_experiment,
)

logger = logging.getLogger(__name__)

RUN_NAME = "sigmma_synthetic"
TRUTH_FILE = "sigmma_truth.parquet"
MORPHOLOGY_FILE = "morphology_focus/morphology_focus_0000.ome.tif"
HE_IMAGE_FILE = f"{RUN_NAME}_he_image.ome.tif"
HE_ALIGNMENT_FILE = f"{RUN_NAME}_he_imagealignment.csv"
LABELS_AUTO_MAX_CELLS = 100_000
GENERATOR_VERSION = 2  # bump when the output changes, so cached demo folders are rewritten
_CHUNK = 25_000


def synthetic_xenium(
    path: str | Path,
    *,
    n_cells: int = 2000,
    n_genes: int = 200,
    seed: int = 0,
    he: bool = True,
    transcripts: bool = True,
    morphology: bool = True,
    labels: bool | None = None,
    he_pixel_size_um: float = 0.5,
    contact_program: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic 10x Xenium output folder (XOA 3.0 layout) with a registered H&E image.

    The section is a carcinoma-like tissue with structure at three scales, shared by the transcripts and
    the images: a tumour region and stroma (macro); tumour nests, a hypoxic tumour core with necrosis,
    immune aggregates and vessels (meso); seven cell types with type-specific nuclei and expression
    (micro). Tumour cells of the hypoxic nests express a planted chemokine programme (``CXCL2``,
    ``CXCL6``).

    With ``contact_program``, a cell-contact programme is planted at the cell scale: every tumour cell whose centroid
    lies closer than 15 µm to a T cell's centroid expresses ``CXCL10``, ``CD274`` (PD-L1) and ``IDO1`` (an
    interferon-gamma response), each adding on average 3% of the cell's library (0.7-1.3x, per cell and gene;
    about 6-8 counts per gene in a contacted tumour cell, against a background of ~0.01 counts elsewhere). In the H&E and
    DAPI images the contacted cells' nuclei are 1.35x larger along both axes and their haematoxylin and DAPI
    intensities 1.3x higher. Non-contacted tumour cells and every other cell type keep the background level.
    Tumour cells meet T cells mostly in the tumour stroma and at nest borders (T cells are 5% of nest cells,
    15% of tumour-stroma cells), so contact cuts across the niche and region structure. The programme's genes are
    added to the receiving cell's own counts, so a tile's mean expression carries them too (in proportion to its
    contacted tumour cells); what a mean cannot tell is which cells are in contact (for a section where only the
    arrangement differs between tiles, see :func:`~sigmma_sc.datasets.synthetic_arrangement`). The programme draws no
    random number of the layout, so cells, types and domains are the same with and without it. It is off by
    default: switched on, the small 8-epoch model of the downstream tests no longer found the planted
    chemokine niche (the default output is the one of sections written before the programme existed).

    The folder reads with :func:`spatialdata_io.xenium` unchanged, and with
    :func:`sigmma_sc.io.xenium`.

    Files written into ``path``:

    - ``experiment.xenium``: run metadata (``pixel_size`` 0.2125 µm, ``analysis_sw_version``
      ``xenium-3.0.0.15``); the key ``sigmma_synthetic`` records the generator's parameters.
    - ``cells.parquet`` (centroids in µm), ``cell_feature_matrix.h5`` (10x HDF5; genes plus negative
      control probes), ``cell_boundaries.parquet``, ``nucleus_boundaries.parquet``.
    - ``cells.zarr.zip``: cell ids, cell summary and the nucleus (``masks/0``) and cell (``masks/1``) label
      images at 0.2125 µm per pixel (left all-zero when ``labels`` is false).
    - ``transcripts.parquet``: one row per counted transcript plus ~5% unassigned; with ``transcripts=False``
      a one-row placeholder (an unassigned, low-quality transcript), because the reader expects the file.
    - ``morphology_focus/morphology_focus_0000.ome.tif``: tiled pyramidal DAPI image (uint16, 0.2125 µm);
      all-zero (blank, a few kB) when ``morphology`` is false, because the reader expects it.
    - ``sigmma_synthetic_he_image.ome.tif`` (``he=True``): tiled pyramidal RGB H&E (JPEG tiles, sub-resolutions
      as SubIFDs) at ``he_pixel_size_um``, rotated and shifted with respect to the Xenium frame; and
      ``sigmma_synthetic_he_imagealignment.csv``: the 3x3 affine matrix mapping H&E pixel coordinates (x, y)
      to Xenium morphology pixel coordinates, as exported by Xenium Explorer.
    - ``sigmma_truth.parquet``: ground truth per cell (not a Xenium file), in the order of ``cells.parquet``:
      ``cell_id``; ``cell_type`` (tumour, fibroblast, T_cell, B_cell, macrophage, endothelial, pericyte);
      ``domain`` (stroma, tumour_stroma, tumour_nest, tumour_nest_hypoxic, necrosis, immune_aggregate,
      vessel); ``region`` (macro scale: ``tumour`` / ``stroma``); ``chemokine_high`` (tumour cells of hypoxic
      nests, the only cells with the planted ``CXCL2`` / ``CXCL6`` programme); ``contact`` (tumour cells within
      15 µm of a T cell, the only cells with the contact programme; all false without ``contact_program``).
      ``experiment.xenium``'s ``sigmma_synthetic`` record holds the programme under ``contact_program``
      (``genes``, ``receiver``, ``sender``, ``distance_um``, ``library_fraction``, ``nucleus_scale``,
      ``stain_scale``, ``n_contacted``), which :func:`sigmma_sc.io.xenium` copies into the cell table's
      ``.uns['sigmma_synthetic']``.

    Parameters
    ----------
    path
        Output folder; created. Must be absent or empty unless ``overwrite``.
    n_cells
        Number of cells. The section is sized for ~1 cell per 118 µm² of tissue (about 1.5 x 1.5 mm for
        15,000 cells).
    n_genes
        Number of genes (>= 20): real marker names first (always including ``CXCL2`` and ``CXCL6``, and with
        ``contact_program`` ``CXCL10``, ``CD274``, ``IDO1``), then ``GENE_001``, ...
    seed
        Random seed; the same seed gives identical cells, counts and images.
    he
        Whether to write the H&E image and its alignment file.
    transcripts
        Whether to write ``transcripts.parquet`` (large: ~150 rows per cell).
    morphology
        Whether to render the DAPI morphology image (otherwise a blank placeholder).
    labels
        Whether to render the nucleus and cell label images in ``cells.zarr.zip``. ``None``: only for
        ``n_cells <= 100,000``.
    he_pixel_size_um
        Pixel size of the H&E image (µm).
    contact_program
        Whether to plant the cell-contact programme (expression and nuclear morphology of tumour cells that
        touch T cells).
    overwrite
        Whether to delete a non-empty ``path`` first.

    Returns
    -------
    The output folder.
    """
    if n_cells < 10:
        raise ValueError(f"n_cells must be >= 10, got {n_cells}.")
    if not he_pixel_size_um > 0:
        raise ValueError(f"he_pixel_size_um must be positive, got {he_pixel_size_um}.")
    t_start = time.perf_counter()
    path = _prepare_folder(Path(path), overwrite=overwrite)
    labels = n_cells <= LABELS_AUTO_MAX_CELLS if labels is None else labels
    rng_layout, rng_cells, rng_expr, rng_tx, rng_he = np.random.default_rng(seed).spawn(5)

    layout = make_layout(rng_layout, n_cells)
    cells = place_cells(rng_cells, layout, n_cells, contact=contact_program)
    prefix = np.sort(rng_cells.choice(2**31, size=n_cells, replace=False)).astype(np.uint32) + 2**31
    ids = cell_id_strings(prefix)
    logger.info("Section %.0f x %.0f µm with %d cells; writing to %s", layout.width, layout.height, n_cells, path)

    model = ExpressionModel.build(rng_expr, n_genes, contact=contact_program)
    gene_counts, control = _write_counts(path, model, cells, ids, rng_expr, rng_tx, transcripts=transcripts)
    write_cells_parquet(path / "cells.parquet", cells, ids, gene_counts, control)
    write_boundaries(path / "cell_boundaries.parquet", cells, ids, cells.expansion)
    write_boundaries(path / "nucleus_boundaries.parquet", cells, ids, np.zeros(n_cells))

    renderer = Renderer(layout, cells, seed)
    morph = Frame((int(np.ceil(layout.height / PIXEL_SIZE)), int(np.ceil(layout.width / PIXEL_SIZE))), PIXEL_SIZE)
    _write_morphology(path, renderer, morph, cells, prefix, morphology=morphology, labels=labels)
    alignment = None
    if he:
        alignment = _write_he(path, renderer, layout, cells, rng_he, he_pixel_size_um)

    truth = pd.DataFrame(
        {
            "cell_id": ids,
            "cell_type": pd.Categorical.from_codes(cells.cell_type, CELL_TYPES),
            "domain": pd.Categorical(np.asarray(DOMAINS)[cells.domain], categories=CELL_DOMAINS),
            "region": pd.Categorical(
                np.where(cells.in_tumour_region, "tumour", "stroma"), categories=["stroma", "tumour"]
            ),
            "chemokine_high": cells.chemokine_high,
            "contact": cells.contacted,
        }
    )
    truth.to_parquet(path / TRUTH_FILE, index=False)
    extra = {
        "generator": "sigmma_sc.datasets.synthetic_xenium",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "section_um": [layout.width, layout.height],
        "morphology": "rendered" if morphology else "blank",
        "labels": "rendered" if labels else "blank",
        "transcripts": "written" if transcripts else "placeholder",
        "he_image": HE_IMAGE_FILE if he else None,
        "he_alignment": HE_ALIGNMENT_FILE if he else None,
        "he_pixel_size_um": he_pixel_size_um if he else None,
        "he_alignment_matrix": alignment.tolist() if alignment is not None else None,
        "truth": TRUTH_FILE,
        "contact_program": {
            "enabled": bool(contact_program),
            "genes": list(CONTACT_GENES),
            "receiver": CELL_TYPES[CONTACT_RECEIVER],
            "sender": CELL_TYPES[CONTACT_SENDER],
            "distance_um": CONTACT_DISTANCE_UM,
            "library_fraction": CONTACT_FRACTION,
            "nucleus_scale": CONTACT_NUCLEUS_SCALE,
            "stain_scale": CONTACT_STAIN_SCALE,
            "n_contacted": int(cells.contacted.sum()),
            "truth_column": "contact",
        },
    }
    write_experiment(
        path / "experiment.xenium",
        n_cells=n_cells,
        n_genes=n_genes,
        median_counts=float(np.median(gene_counts)),
        extra=extra,
    )
    logger.info("Wrote synthetic Xenium folder %s in %.1f s", path, time.perf_counter() - t_start)
    return path


def _prepare_folder(path: Path, *, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another path.")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it, or choose another path.")
        shutil.rmtree(path)
    (path / "morphology_focus").mkdir(parents=True, exist_ok=True)
    return path


def _write_counts(path, model, cells, ids, rng_expr, rng_tx, *, transcripts: bool):
    """Sample counts chunk-wise into ``cell_feature_matrix.h5`` (and ``transcripts.parquet``)."""
    negs = [f"NegControlProbe_{i:05d}" for i in range(1, N_NEG_CONTROLS + 1)]
    features = [*model.genes, *negs]
    types = ["Gene Expression"] * len(model.genes) + ["Negative Control Probe"] * len(negs)
    matrix = MatrixWriter(path / "cell_feature_matrix.h5", ids, features, types)
    tx = None
    if transcripts:
        categories = ["predesigned_gene"] * len(model.genes) + ["negative_control_probe"] * len(negs)
        tx = TranscriptWriter(path / "transcripts.parquet", features, categories)
    gene_counts, control = np.zeros(cells.n, np.int64), np.zeros(cells.n, np.int64)
    for start in range(0, cells.n, _CHUNK):
        stop = min(start + _CHUNK, cells.n)
        counts, neg = model.sample(rng_expr, cells, start, stop)
        full = sparse.hstack([counts, sparse.csr_matrix(neg)], format="csr")
        matrix.append(full)
        gene_counts[start:stop] = np.asarray(counts.sum(1)).ravel()
        control[start:stop] = neg.sum(1)
        if tx is not None:
            tx.append(rng_tx, cells, ids, start, full)
    matrix.close()
    if tx is not None:
        tx.close()
    else:
        write_placeholder(path / "transcripts.parquet", model.genes[0])
    return gene_counts, control


def _write_morphology(path, renderer, frame, cells, prefix, *, morphology: bool, labels: bool) -> None:
    """DAPI pyramid and label masks, rendered in one pass over the morphology pixel grid."""
    store, nuc_mask, cell_mask = open_cells_zarr(path / "cells.zarr.zip", cells, prefix, frame.shape, BLOCK)
    uv = frame.to_px(cells.x, cells.y)
    levels = n_levels(frame.shape)
    out = path / MORPHOLOGY_FILE
    try:
        if morphology or labels:

            def render(r0, c0, h, w):
                return renderer.morphology_block(frame, uv, r0, c0, h, w, dapi=morphology, labels=labels)

            def strips():
                for r0, (dapi, nuc, cel) in iter_strips(frame.shape, render):
                    if labels:
                        nuc_mask[r0 : r0 + nuc.shape[0]] = nuc
                        cell_mask[r0 : r0 + cel.shape[0]] = cel
                    yield r0, dapi

            if morphology:
                write_pyramid(
                    out,
                    strips(),
                    frame.shape,
                    np.uint16,
                    pixel_size=frame.pixel_size,
                    levels=levels,
                    compression="zlib",
                    compressionargs={"level": 1},
                    channel="DAPI",
                )
            else:
                for _ in strips():
                    pass
        if not morphology:
            write_blank_pyramid(out, frame.shape, np.uint16, pixel_size=frame.pixel_size, levels=levels, channel="DAPI")
    finally:
        store.close()


def he_frame(layout, rng: np.random.Generator, pixel_size: float) -> Frame:
    """H&E pixel grid: rotated by 2-5 degrees and shifted with respect to the Xenium frame, with margins."""
    rotation = np.deg2rad(rng.uniform(2.0, 5.0) * rng.choice([-1.0, 1.0]))
    corners = np.array([[0, 0], [layout.width, 0], [0, layout.height], [layout.width, layout.height]], float)
    c, s = np.cos(rotation), np.sin(rotation)
    q = corners @ np.array([[c, -s], [s, c]])  # R(-rotation) applied to each corner
    lead = np.array([rng.uniform(30, 60), rng.uniform(60, 90)])  # left / top margins (µm)
    trail = np.array([rng.uniform(30, 60), rng.uniform(30, 60)])
    shifted = q.min(0) - lead
    origin = np.array([c * shifted[0] - s * shifted[1], s * shifted[0] + c * shifted[1]])
    size = (q.max(0) - q.min(0) + lead + trail) / pixel_size
    return Frame((int(np.ceil(size[1])), int(np.ceil(size[0]))), pixel_size, float(rotation), (origin[0], origin[1]))


def alignment_matrix(frame: Frame) -> np.ndarray:
    """3x3 affine mapping H&E pixel (x, y, 1) to Xenium morphology pixel coordinates (Xenium Explorer convention)."""
    c, s = np.cos(frame.rotation), np.sin(frame.rotation)
    k = frame.pixel_size / PIXEL_SIZE
    return np.array(
        [
            [k * c, -k * s, frame.origin[0] / PIXEL_SIZE],
            [k * s, k * c, frame.origin[1] / PIXEL_SIZE],
            [0.0, 0.0, 1.0],
        ]
    )


def _write_he(path, renderer, layout, cells, rng, pixel_size) -> np.ndarray:
    frame = he_frame(layout, rng, pixel_size)
    uv = frame.to_px(cells.x, cells.y)

    def render(r0, c0, h, w):
        return (renderer.he_block(frame, uv, r0, c0, h, w),)

    strips = ((r0, rgb) for r0, (rgb,) in iter_strips(frame.shape, render))
    write_pyramid(
        path / HE_IMAGE_FILE,
        strips,
        (*frame.shape, 3),
        np.uint8,
        pixel_size=pixel_size,
        levels=n_levels(frame.shape),
        compression="jpeg",
        compressionargs={"level": 90},
    )
    matrix = alignment_matrix(frame)
    np.savetxt(path / HE_ALIGNMENT_FILE, matrix, delimiter=",", fmt="%.12g")
    return matrix
