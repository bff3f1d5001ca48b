"""Issue 28 input checks on real and realistic inputs: does sg.io.from_anndata tell a wrong unit from the right one
(and from a region of interest), and does a saturated artefact leave the intensity range and the tiles unchanged?

Placement: the real Xenium bone-marrow crop (12,063 cells, DAPI 3000 x 3000 px at 0.2125 µm/px, ../shared/data)
built from the cell-feature matrix, the centroids and the image, as a user would, under five readings; and the
synthetic H&E section (0.5 µm/px). For each: the WARNING that names a unit (if any), the extent fit of the given
reading (share of cells on tissue, share of tissue covered), the nuclear contrast as given and in the other unit,
and the time of the call.

Intensity: a DAPI-like uint16 pyramid (4 levels of 2x2 means) with and without a saturated corner (2.0-2.3% of the
area, soft rim), as in tests/pp/test_tile.py: the intensity range of each, and the kept tiles' tissue fractions.

Private import on purpose: it measures the placement check itself (``sigmma_sc.io._placement.TissueMatch``).

    python benchmarks/input_checks.py [--out benchmarks/results/input_checks.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import sigmma_sc as sg

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "xenium-bonemarrow"
DAPI_PX = 0.2125


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _run(adata, image, **kwargs) -> dict:
    from sigmma_sc.data import ImageReader
    from sigmma_sc.io._placement import TissueMatch

    cap = _Capture()
    logger = logging.getLogger("sigmma_sc")
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    t = time.perf_counter()
    try:
        sdata = sg.io.from_anndata(adata, image, **kwargs)
    finally:
        logger.removeHandler(cap)
    seconds = time.perf_counter() - t
    warnings = [r.getMessage() for r in cap.records if r.levelno >= logging.WARNING and r.name.endswith("_anndata")]
    roi = [r.getMessage() for r in cap.records if "taken as a region of interest" in r.getMessage()]
    # the diagnostics the check used, recomputed on the built section
    ps = kwargs["pixel_size_um"]
    px = sdata.tables["table"].obsm["spatial"] / ps
    if kwargs.get("coordinates", "pixels") == "pixels":
        px = np.asarray(adata.obsm["spatial"], dtype=float)
    m = TissueMatch(ImageReader(sdata.images[next(iter(sdata.images))], "global", 1.0), px)
    other = 1 / ps if kwargs.get("coordinates", "pixels") == "pixels" else ps
    fit = m.fit(1.0)
    return {
        "warning": warnings[0] if warnings else None,
        "roi_note": bool(roi),
        "on_tissue": round(fit.on_tissue, 3),
        "coverage": round(fit.coverage, 3),
        "contrast_given": None if (c := m.contrast(1.0)) is None else round(c, 3),
        "contrast_other_unit": None if (c := m.contrast(other)) is None else round(c, 3),
        "seconds": round(seconds, 2),
    }


def placement() -> dict:
    import scanpy as sc
    from skimage.io import imread

    out = {}
    if DATA.exists():
        cells = pd.read_parquet(DATA / "roi" / "cells_roi.parquet").set_index("cell_id")
        matrix = sc.read_10x_h5(DATA / "cell_feature_matrix.h5")
        adata = matrix[matrix.obs_names.isin(cells.index)].copy()
        px = cells.loc[adata.obs_names, ["x_px", "y_px"]].to_numpy(float) - [10_000.0, 1_000.0]
        dapi = imread(DATA / "roi" / "dapi_roi_x10000-13000_y1000-4000.png")
        left, quarter = px[:, 0] < 1500, (px[:, 0] < 1500) & (px[:, 1] < 1500)
        cases = {
            "pixels, right": (px, "pixels", slice(None)),
            "um passed as pixels": (px * DAPI_PX, "pixels", slice(None)),
            "um, right": (px * DAPI_PX, "um", slice(None)),
            "left-half ROI, pixels": (px[left], "pixels", left),
            "top-left-quarter ROI, pixels": (px[quarter], "pixels", quarter),
            "top-left-quarter ROI, um passed as pixels": (px[quarter] * DAPI_PX, "pixels", quarter),
        }
        for name, (xy, unit, rows) in cases.items():
            sub = adata[rows].copy()
            sub.obsm["spatial"] = xy
            out[f"bone marrow DAPI: {name}"] = _run(sub, dapi, pixel_size_um=DAPI_PX, coordinates=unit) | {
                "n_cells": int(sub.n_obs)
            }
    else:
        print(f"no real data in {DATA}; bone-marrow cases skipped", file=sys.stderr)
    return out


def saturation() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "pp"))
    from test_tile import _dapi_pyramid

    from sigmma_sc.data import ImageReader

    out = {}
    clean = ImageReader(_dapi_pyramid(), "global", 1.0).intensity_range()
    for side in (72, 75, 77):
        dirty = ImageReader(_dapi_pyramid(side), "global", 1.0).intensity_range()
        out[f"corner {side} px"] = {"clean": [round(v, 1) for v in clean], "artefact": [round(v, 1) for v in dirty]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "input_checks.json"))
    args = parser.parse_args()
    result = {"placement": placement(), "saturation_range": saturation()}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
