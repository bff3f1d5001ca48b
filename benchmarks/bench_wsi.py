"""Memory and time of ``sigmma predict`` on large synthetic whole-slide pyramids (mostly glass).

Usage::

    python benchmarks/bench_wsi.py model --out bench_out/wsi_model.pt     # a tiny model (128 µm @ 0.5 µm/px)
    python benchmarks/bench_wsi.py slide --side 100000 --out bench_out/wsi_100k.tif
    python benchmarks/bench_wsi.py predict --model bench_out/wsi_model.pt --slide bench_out/wsi_100k.tif

The slide is a tiled (512 px, zlib) pyramidal TIFF at 0.5 µm/px written tile by tile: glass tiles are one
pre-encoded tile, tissue tiles (one disc of fixed size, ``--radius`` px, pink with random nuclei) are
rendered at each level, so writing never holds a level in memory. ``predict`` runs ``sigmma predict`` in
this process and reports wall time and the process's peak RSS (``ru_maxrss``).
"""

# Private imports on purpose: sigmma_sc._cli.main (runs the `sigmma predict` command in-process, as a user's shell would).

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

TILE = 512
MPP = 0.5


def _render(k: int, ty: int, tx: int, side: int, radius: float) -> np.ndarray | None:
    """Tile (ty, tx) of level k, or None when it is all glass."""
    f = 2**k
    c = side / 2
    y0, x0 = ty * TILE * f, tx * TILE * f
    dy = max(abs(c - np.clip(c, y0, y0 + TILE * f)), 0)
    dx = max(abs(c - np.clip(c, x0, x0 + TILE * f)), 0)
    if dx * dx + dy * dy > radius * radius:
        return None
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    yy, xx = (y0 + (yy + 0.5) * f), (x0 + (xx + 0.5) * f)
    inside = (yy - c) ** 2 + (xx - c) ** 2 < radius**2
    rng = np.random.default_rng([k, ty, tx])
    img = np.full((TILE, TILE, 3), 242, np.uint8)
    img[inside] = (205, 125, 175)
    nuclei = inside & (rng.random((TILE, TILE)) < 0.12)
    img[nuclei] = (110, 70, 150)
    return img


def write_slide(path: Path, side: int, radius: float) -> None:
    import imagecodecs
    import tifffile

    glass = imagecodecs.zlib_encode(np.full((TILE, TILE, 3), 242, np.uint8).tobytes())
    levels = 1
    while side / 2**levels >= 1024:
        levels += 1
    opts = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "rgb", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k in range(levels):
            s = -(-side // 2**k)
            n = -(-s // TILE)

            def tiles(k=k, n=n):
                for ty in range(n):
                    for tx in range(n):
                        img = _render(k, ty, tx, side, radius)
                        yield glass if img is None else imagecodecs.zlib_encode(img.tobytes())

            ps = MPP * 2**k
            extra = (
                {"subifds": levels - 1, "metadata": {"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP}}
                if k == 0
                else {"subfiletype": 1}
            )
            tif.write(tiles(), shape=(s, s, 3), dtype=np.uint8, resolution=(1e4 / ps, 1e4 / ps), **extra, **opts)


def train_model(out: Path) -> None:
    import sigmma_sc as sg

    sg.settings.progress_bar = False
    path = sg.datasets.synthetic_xenium(out.parent / "wsi_train", n_cells=1500, n_genes=40, seed=0,
                                        transcripts=False, morphology=False, labels=False, overwrite=True)  # fmt: skip
    sdata = sg.io.xenium(path)
    sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata, n_comps=16)
    model = sg.tl.train_sigmma(sdata, backbone="test_vit", pretrained=False, input_size=32, epochs=2,
                               hidden=16, out_dim=16, batch_size=64)  # fmt: skip
    sg.tl.embed(sdata, model)
    sg.tl.fit_probe(sdata, model, n_genes=10)
    sg.tl.attach_reference(sdata, model)
    model.save(out)


def predict(model: Path, slide: Path) -> dict:
    import shutil

    from sigmma_sc._cli import main

    out = slide.with_suffix(".pred.zarr")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    main(["-q", "predict", "--model", str(model), "--slide", str(slide), "--out", str(out), "--retrieve", "5"])
    wall = time.perf_counter() - t
    import spatialdata as sd

    tiles = sd.read_zarr(out, selection=("tables",)).tables["sigmma_tiles"]
    return {
        "slide": slide.name,
        "slide_bytes": slide.stat().st_size,
        "tiles": int(tiles.n_obs),
        "grid_tiles": int(np.prod(tiles.uns["sigmma"]["tile"]["grid_shape"])),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("slide")
    s.add_argument("--side", type=int, required=True)
    s.add_argument("--radius", type=float, default=2500.0, help="tissue disc radius in level-0 px")
    s.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("predict")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--slide", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "model":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        train_model(a.out)
    elif a.cmd == "slide":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_slide(a.out, a.side, a.radius)
        print(json.dumps({"side": a.side, "write_s": round(time.perf_counter() - t, 1),
                          "bytes": a.out.stat().st_size,
                          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}))  # fmt: skip
    else:
        print(json.dumps(predict(a.model, a.slide)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
