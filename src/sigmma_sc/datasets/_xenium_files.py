"""Writers for the files of a 10x Xenium (XOA 3.x) output folder."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from scipy import sparse

from ._tissue import Cells

PIXEL_SIZE = 0.2125  # µm per Xenium morphology pixel
XOA_VERSION = "xenium-3.0.0.15"
CELL_SUMMARY_COLUMNS = [
    "cell_centroid_x",
    "cell_centroid_y",
    "cell_area",
    "nucleus_centroid_x",
    "nucleus_centroid_y",
    "nucleus_area",
    "z_level",
    "nucleus_count",
]


def cell_id_strings(prefix: np.ndarray, suffix: int = 1) -> np.ndarray:
    """Xenium cell ids (``'aaaaficg-1'``): 8 hex nibbles of the uint32 prefix shifted to ``a``-``p``."""
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint32)
    nibbles = (prefix.astype(np.uint32)[:, None] >> shifts) & 0xF
    chars = (nibbles + ord("a")).astype(np.uint8)
    return np.char.add(chars.view("S8").ravel().astype("U8"), f"-{suffix}")


def ellipse_polygons(cells: Cells, grow: np.ndarray, n_vertices: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Closed polygon vertices (µm) of each cell's (grown) nucleus ellipse: ``(n, n_vertices + 1)`` x and y."""
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    t = np.append(t, 0.0)
    a, b = (cells.a + grow)[:, None], (cells.b + grow)[:, None]
    c, s = np.cos(cells.theta)[:, None], np.sin(cells.theta)[:, None]
    pu, pv = a * np.cos(t), b * np.sin(t)
    return cells.x[:, None] + pu * c - pv * s, cells.y[:, None] + pu * s + pv * c


def write_boundaries(path: Path, cells: Cells, ids: np.ndarray, grow: np.ndarray, chunk: int = 100_000) -> None:
    """``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet``: one closed polygon per cell."""
    writer = None
    for s in range(0, cells.n, chunk):
        sl = slice(s, min(s + chunk, cells.n))
        sub = Cells(**{k: getattr(cells, k)[sl] for k in cells.__dataclass_fields__})
        vx, vy = ellipse_polygons(sub, grow[sl])
        k = vx.shape[1]
        table = pa.table(
            {
                "cell_id": pa.array(np.repeat(ids[sl], k)),
                "vertex_x": pa.array(vx.ravel().astype(np.float32)),
                "vertex_y": pa.array(vy.ravel().astype(np.float32)),
                "label_id": pa.array(np.repeat(np.arange(sl.start, sl.stop, dtype=np.uint32) + 1, k)),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()


class MatrixWriter:
    """Streams a cell x feature count matrix into ``cell_feature_matrix.h5`` (10x HDF5 v3 layout)."""

    def __init__(self, path: Path, barcodes: np.ndarray, features: list[str], feature_types: list[str]) -> None:
        self.f = h5py.File(path, "w")
        self.f.attrs.update(
            {
                "filetype": "matrix",
                "version": 2,
                "library_ids": np.array([b"sigmma_synthetic"]),
                "chemistry_description": "Xenium",
                "software_version": XOA_VERSION,
                "original_gem_groups": np.array([1]),
            }
        )
        m = self.f.create_group("matrix")
        m.create_dataset("barcodes", data=barcodes.astype("S"), compression="gzip")
        m.create_dataset("shape", data=np.array([len(features), len(barcodes)], np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("name", data=np.array(features, "S"))
        feat.create_dataset("id", data=np.array([f"SYN{i:08d}" for i in range(len(features))], "S"))
        feat.create_dataset("feature_type", data=np.array(feature_types, "S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * len(features), "S"))
        opts = {"maxshape": (None,), "chunks": (1 << 16,), "compression": "gzip", "compression_opts": 4}
        self.data = m.create_dataset("data", shape=(0,), dtype=np.int32, **opts)
        self.indices = m.create_dataset("indices", shape=(0,), dtype=np.int64, **opts)
        self.indptr = [np.zeros(1, np.int64)]
        self.nnz = 0

    def append(self, counts: sparse.csr_matrix) -> None:
        """Append the rows (cells) of a CSR chunk."""
        counts.sort_indices()
        n = counts.nnz
        for ds, values in ((self.data, counts.data), (self.indices, counts.indices)):
            ds.resize((self.nnz + n,))
            ds[self.nnz :] = values
        self.indptr.append(counts.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += n

    def close(self) -> None:
        """Write ``indptr`` and close the file."""
        self.f["matrix"].create_dataset("indptr", data=np.concatenate(self.indptr), compression="gzip")
        self.f.close()


def write_cells_parquet(
    path: Path, cells: Cells, ids: np.ndarray, gene_counts: np.ndarray, control: np.ndarray
) -> None:
    """``cells.parquet`` (XOA 3 columns; centroids in µm)."""
    zeros = np.zeros(cells.n, np.int64)
    table = pa.table(
        {
            "cell_id": pa.array(ids),
            "x_centroid": cells.x,
            "y_centroid": cells.y,
            "transcript_counts": gene_counts.astype(np.int64),
            "control_probe_counts": control.astype(np.int64),
            "genomic_control_counts": zeros,
            "control_codeword_counts": zeros,
            "unassigned_codeword_counts": zeros,
            "deprecated_codeword_counts": zeros,
            "total_counts": (gene_counts + control).astype(np.int64),
            "cell_area": cell_areas(cells),
            "nucleus_area": np.pi * cells.a * cells.b,
            "nucleus_count": np.ones(cells.n, np.int64),
            "segmentation_method": pa.array(["Segmented by nucleus expansion of 5.0µm"] * cells.n).dictionary_encode(),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=200_000)


def cell_areas(cells: Cells) -> np.ndarray:
    """Area (µm²) of the cell boundary ellipse."""
    return np.pi * (cells.a + cells.expansion) * (cells.b + cells.expansion)


def open_cells_zarr(path: Path, cells: Cells, prefix: np.ndarray, mask_shape: tuple[int, int], chunk: int):
    """Create ``cells.zarr.zip`` (zarr v2 layout of XOA >= 2.0); return ``(store, nucleus_mask, cell_mask)``.

    The masks are written later, strip by strip; chunks never written read as 0 (background).
    """
    store = zarr.storage.ZipStore(path, mode="w")
    n = cells.n
    root = zarr.open_group(
        store,
        mode="w",
        zarr_format=2,
        attributes={
            "major_version": 6,
            "minor_version": 0,
            "number_cells": n,
            "polygon_set_names": ["nucleus", "cell"],
            "polygon_set_display_names": ["Nucleus boundaries", "Cell boundaries"],
            "segmentation_methods": ["Segmented by nucleus expansion of 5.0µm"],
            "spatial_units": "microns",
        },
    )

    def put(name: str, data: np.ndarray, **attrs) -> None:
        arr = root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape, attributes=attrs or None)
        arr[...] = data

    put("cell_id", np.column_stack([prefix.astype(np.uint32), np.ones(n, np.uint32)]))
    summary = np.column_stack(
        [cells.x, cells.y, cell_areas(cells), cells.x, cells.y, np.pi * cells.a * cells.b, np.zeros(n), np.ones(n)]
    )
    put("cell_summary", summary, column_names=CELL_SUMMARY_COLUMNS)
    for i in (0, 1):
        put(f"polygon_sets/{i}/cell_index", np.arange(n, dtype=np.uint32))
        put(f"polygon_sets/{i}/num_vertices", np.full(n, 14, np.int32))
    scale = np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1.0, 1.0])
    put("masks/homogeneous_transform", scale)
    masks = [
        root.create_array(f"masks/{i}", shape=mask_shape, dtype=np.uint32, chunks=(chunk, chunk), fill_value=0)
        for i in (0, 1)
    ]
    return store, masks[0], masks[1]


def write_experiment(path: Path, *, n_cells: int, n_genes: int, median_counts: float, extra: dict) -> None:
    """``experiment.xenium`` (JSON) with ``pixel_size`` and ``analysis_sw_version``."""
    specs = {
        "major_version": 5,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "sigmma_synthetic",
        "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": "synthetic_section",
        "preservation_method": "ffpe",
        "num_cells": n_cells,
        "transcripts_per_cell": int(median_counts),
        "cassette_name": "synthetic",
        "slide_id": "0000000",
        "panel_design_id": "sigmma_synthetic_panel",
        "panel_name": "sigmma synthetic panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": n_genes,
        "panel_num_targets_custom": 0,
        "pixel_size": PIXEL_SIZE,
        "instrument_sn": "SYNTHETIC",
        "instrument_sw_version": "3.0.0.0",
        "analysis_sw_version": XOA_VERSION,
        "z_step_size": 3.0,
        "images": {"morphology_focus_filepath": "morphology_focus/"},
        "sigmma_synthetic": extra,
    }
    path.write_text(json.dumps(specs, indent=4))
