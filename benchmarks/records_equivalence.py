"""Before/after check of the records refactor (issue 24 item 2): tile tables, graphs, bundles and embeddings.

Runs tile -> cell_graph -> build_bundle (knn and all candidates) -> train (tiny, seeded) -> embed (shifted grids)
on the small test section and on the demo section, and stores every array written into an ``.npz``;
``compare A.npz B.npz`` says whether two snapshots are bit-identical.

    python benchmarks/records_equivalence.py snapshot bench_out/before.npz
    python benchmarks/records_equivalence.py compare bench_out/before.npz bench_out/after.npz
"""

# Private imports on purpose: sigmma_sc._utils._json.jsonable (records compared as the package serialises them).

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}


def _dense(a):
    from scipy import sparse

    return a.toarray() if sparse.issparse(a) else np.asarray(a)


def _table(prefix: str, adata, out: dict) -> None:
    if adata.X is not None:
        out[f"{prefix}/X"] = _dense(adata.X)
    for k in adata.obs:
        out[f"{prefix}/obs/{k}"] = (
            adata.obs[k].astype(str).to_numpy() if adata.obs[k].dtype == "category" else adata.obs[k].to_numpy()
        )
    out[f"{prefix}/obs_names"] = adata.obs_names.to_numpy().astype(str)
    for k in adata.obsm:
        out[f"{prefix}/obsm/{k}"] = np.asarray(adata.obsm[k])
    for k in adata.obsp:
        out[f"{prefix}/obsp/{k}"] = _dense(adata.obsp[k])
    uns = {k: v for k, v in adata.uns.items() if k != "spatialdata_attrs"}
    out[f"{prefix}/uns"] = np.array(json.dumps(_plain(uns), sort_keys=True, default=str))


def _plain(v):
    from sigmma_sc._utils._json import jsonable

    v = jsonable(v)
    if isinstance(v, dict):  # drop wall-clock fields
        return {
            k: _plain(x) for k, x in v.items() if k not in ("time_s", "seconds", "elapsed_s", "history", "diagnostics")
        }
    return v


def _bundle(prefix: str, bundle, out: dict) -> None:
    state = bundle.state_dict()
    for k, v in state.items():
        if hasattr(v, "numpy"):
            out[f"{prefix}/{k}"] = v.numpy()
        elif isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{prefix}/{k}/{kk}"] = (
                    vv.numpy() if hasattr(vv, "numpy") else np.array(json.dumps(_plain(vv), default=str))
                )
        else:
            out[f"{prefix}/{k}"] = np.array(json.dumps(_plain(v), sort_keys=True, default=str))


def _run(name: str, sdata, tile_kw: dict, graph_kw: dict, train_kw: dict, out: dict) -> None:
    import torch

    import sigmma_sc as sg

    torch.manual_seed(0)
    sg.pp.tile(sdata, **tile_kw)
    sg.pp.cell_graph(sdata, **graph_kw)
    sg.tl.featurize(sdata, backbone=TINY["backbone"], pretrained=False)
    for cand in ("knn", "all"):
        bundle, rows = sg.data.build_bundle(sdata, candidates=cand)
        _bundle(f"{name}/bundle_{cand}", bundle, out)
        out[f"{name}/bundle_{cand}/rows"] = rows
    model = sg.tl.train_sigmma(sdata, **TINY, **train_kw)
    sg.tl.embed(sdata, model, shifts=4)
    sg.tl.embed(sdata, model, shifts=None, key_added="plain")
    for key in ("table", "sigmma_tiles"):
        _table(f"{name}/{key}", sdata.tables[key], out)


def snapshot(path: str) -> None:
    import spatialdata as sd
    from _section import make_section

    import sigmma_sc as sg

    out: dict = {}
    small = make_section(n_cells=700, image_px=200, rotation_deg=8.0)
    small.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    _run("small", small, {"image_key": "he", "tile_size_um": 8.0, "pixel_size_um": 0.25}, {"n_comps": 8},
         {"epochs": 2}, out)  # fmt: skip
    demo = sd.deepcopy(sg.datasets.demo())
    _run("demo", demo, {"image_key": "he", "tile_size_um": 128.0}, {}, {"steps": 20}, out)
    np.savez_compressed(path, **out)
    print(f"{len(out)} arrays -> {path}")


def compare(a: str, b: str) -> int:
    A, B = np.load(a, allow_pickle=True), np.load(b, allow_pickle=True)  # our own snapshots (string columns)
    bad = sorted(set(A.files) ^ set(B.files))
    for k in sorted(set(A.files) & set(B.files)):
        x, y = A[k], B[k]
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
            bad.append(k)
    print(f"{len(set(A.files) & set(B.files))} arrays compared; differing or missing: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        snapshot(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
