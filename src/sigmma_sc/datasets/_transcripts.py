"""``transcripts.parquet``: one row per decoded transcript, consistent with the count matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from ._tissue import Cells

_FOV_UM = 400.0  # Xenium field-of-view side (approximately)


class TranscriptWriter:
    """Streams transcripts chunk by chunk of cells.

    Every count in the cell feature matrix is one transcript inside its cell's boundary ellipse (qv >= 20);
    about 5% extra low-quality or extracellular transcripts are ``UNASSIGNED``.
    """

    def __init__(self, path: Path, features: list[str], categories: list[str]) -> None:
        self.path = path
        self.features = np.array(features)
        self.categories = np.array(categories)
        self.writer: pq.ParquetWriter | None = None
        self.next_id = 281474976710656  # Xenium transcript ids start at 2**48

    def append(
        self, rng: np.random.Generator, cells: Cells, ids: np.ndarray, start: int, counts: sparse.csr_matrix
    ) -> None:
        """Write the transcripts of cells ``start:start + counts.shape[0]``."""
        counts = counts.tocsr()
        per_row = np.diff(counts.indptr)
        rows = np.repeat(np.arange(counts.shape[0]), per_row)
        reps = counts.data.astype(np.int64)
        cell = start + np.repeat(rows, reps)
        feat = np.repeat(counts.indices, reps)
        n = len(cell)
        # uniform in the cell ellipse, in its own frame
        rad, ang = np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
        a, b = cells.a[cell], cells.b[cell]
        e = cells.expansion[cell]
        pu, pv = rad * np.cos(ang) * (a + e), rad * np.sin(ang) * (b + e)
        rho = np.sqrt((pu / a) ** 2 + (pv / b) ** 2)
        assigned = ids[cell]
        qv = rng.uniform(20.0, 40.0, n)
        # unassigned: around cells but outside them, or low quality
        m = max(1, n // 20)
        host = start + rng.integers(0, counts.shape[0], m)
        r_out = rng.uniform(1.05, 1.6, m)
        ang_o = rng.uniform(0, 2 * np.pi, m)
        pu_o = r_out * np.cos(ang_o) * (cells.a[host] + cells.expansion[host])
        pv_o = r_out * np.sin(ang_o) * (cells.b[host] + cells.expansion[host])
        feat_o = feat[rng.integers(0, max(n, 1), m)] if n else rng.integers(0, len(self.features), m)

        cell_all = np.concatenate([cell, host])
        pu, pv = np.concatenate([pu, pu_o]), np.concatenate([pv, pv_o])
        th = cells.theta[cell_all]
        x = cells.x[cell_all] + pu * np.cos(th) - pv * np.sin(th)
        y = cells.y[cell_all] + pu * np.sin(th) + pv * np.cos(th)
        rho = np.concatenate([rho, np.full(m, 2.0)])
        feat = np.concatenate([feat, feat_o])
        total = n + m
        fov_row = np.clip(y // _FOV_UM, 0, 25).astype(np.int64)
        fov = np.char.add(
            np.array(list("abcdefghijklmnopqrstuvwxyz"))[fov_row], (x // _FOV_UM).astype(np.int64).astype("U")
        )
        table = pa.table(
            {
                "transcript_id": pa.array(np.arange(self.next_id, self.next_id + total, dtype=np.uint64)),
                "cell_id": pa.array(np.concatenate([assigned, np.full(m, "UNASSIGNED")])),
                "overlaps_nucleus": pa.array((rho <= 1.0).astype(np.uint8)),
                "feature_name": pa.array(self.features[feat]),
                "x_location": pa.array(x.astype(np.float32)),
                "y_location": pa.array(y.astype(np.float32)),
                "z_location": pa.array(rng.normal(12.0, 1.5, total).astype(np.float32)),
                "qv": pa.array(np.concatenate([qv, rng.uniform(5.0, 40.0, m)]).astype(np.float32)),
                "fov_name": pa.array(fov),
                "nucleus_distance": pa.array(
                    (np.maximum(rho - 1.0, 0.0) * np.sqrt(cells.a[cell_all] * cells.b[cell_all])).astype(np.float32)
                ),
                "codeword_index": pa.array(feat.astype(np.int32)),
                "codeword_category": pa.array(self.categories[feat]),
                "is_gene": pa.array(self.categories[feat] == "predesigned_gene"),
            }
        )
        self.next_id += total
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table)

    def close(self) -> None:
        """Close the parquet file."""
        if self.writer is not None:
            self.writer.close()


def write_placeholder(path: Path, feature: str) -> None:
    """A one-row ``transcripts.parquet`` (one unassigned, low-quality transcript) for readers that require the file."""
    table = pa.table(
        {
            "transcript_id": pa.array([281474976710656], pa.uint64()),
            "cell_id": ["UNASSIGNED"],
            "overlaps_nucleus": pa.array([0], pa.uint8()),
            "feature_name": [feature],
            "x_location": pa.array([0.0], pa.float32()),
            "y_location": pa.array([0.0], pa.float32()),
            "z_location": pa.array([0.0], pa.float32()),
            "qv": pa.array([0.0], pa.float32()),
            "fov_name": ["a0"],
            "nucleus_distance": pa.array([0.0], pa.float32()),
            "codeword_index": pa.array([0], pa.int32()),
            "codeword_category": ["predesigned_gene"],
            "is_gene": [True],
        }
    )
    pq.write_table(table, path)
