"""Stain robustness: held-out retrieval and probe PCC on a stain-shifted copy of the synthetic H&E.

Usage::

    python benchmarks/bench_stain.py [--n-cells 10000] [--epochs 30] [--tile-size-um 64] [--pixel-size-um 0.5]

Trains SIGMMA on the synthetic Xenium section's H&E (EfficientNet-Lite0, ImageNet weights, frozen),
fits the expression probe on its training tiles and stores the training stains (``sg.tl.attach_reference``).
Then the same section's H&E is recoloured in HED space (``skimage.color.rgb2hed``: hematoxylin x1.5,
eosin x0.6, DAB +0.03, ``hed2rgb``), lazily, and the image side is re-embedded from (a) the original H&E,
(b) the shifted H&E, (c) the shifted H&E Macenko-normalised to the training stains. For each, on the
held-out **test** tiles only: image -> ST Recall@10% (against the ST embeddings, which do not depend on the
image) and the tile-level / gene-wise PCC of the probe fitted on the original training tiles.

Private imports on purpose: the stain shift is applied with the normaliser's own pixel map
(``sigmma_sc.pp._stain._map_image``) and the gene-wise PCC is the probe's (``sigmma_sc.metrics._probe.rowwise_pcc``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _shift(block: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.moveaxis(block, 0, -1))
    hed[..., 0] *= 1.5
    hed[..., 1] *= 0.6
    hed[..., 2] += 0.03
    return np.moveaxis((np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8), -1, 0)


def _image_only_copy(tiles):
    """The tile table without its image features and embeddings (the ST embeddings stay in the original)."""
    from sigmma_sc._constants import Keys

    out = tiles.copy()
    for k in list(out.obsm):
        if k.startswith(("X_sigmma_", "sigmma_backbone_")):
            del out.obsm[k]
    uns = dict(out.uns.get(Keys.UNS, {}))
    uns.pop("backbone", None)
    uns.pop("embed", None)
    out.uns[Keys.UNS] = uns
    return out


def main(argv=None) -> int:
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys
    from sigmma_sc.metrics import recall_at
    from sigmma_sc.metrics._probe import rowwise_pcc
    from sigmma_sc.pp._stain import _map_image

    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tile-size-um", type=float, default=64.0)
    p.add_argument("--pixel-size-um", type=float, default=0.5)
    p.add_argument("--out", default="bench_out/stain")
    a = p.parse_args(argv)
    sg.settings.progress_bar = False
    t0 = time.perf_counter()
    path = sg.datasets.synthetic_xenium(f"{a.out}/run", n_cells=a.n_cells, n_genes=60, seed=0, transcripts=False,
                                        morphology=False, labels=False, overwrite=True)  # fmt: skip
    sdata = sg.io.xenium(path)
    kw = {"tile_size_um": a.tile_size_um, "pixel_size_um": a.pixel_size_um}
    sg.pp.tile(sdata, image_key="he", **kw)
    sg.pp.cell_graph(sdata, n_comps=30)
    model = sg.tl.train_sigmma(sdata, input_size=112, epochs=a.epochs, hidden=128, out_dim=128)
    sg.tl.embed(sdata, model)
    sg.tl.fit_probe(sdata, model, n_genes=30)
    sg.tl.attach_reference(sdata, model)
    lp = model.probes["expression"]
    sdata.images["he_shifted"] = _map_image(sdata.images["he"], _shift)
    sg.pp.stain_normalize(sdata, image_key="he_shifted", reference=model.meta["stain_reference"],
                          key_added="he_shifted_normalized")  # fmt: skip

    base = sdata.tables[Keys.TILE_TABLE]
    test = base.obs[Keys.SPLIT].to_numpy() == "test"
    counts = base.X.toarray() if hasattr(base.X, "toarray") else np.asarray(base.X)
    gene_idx = base.var_names.get_indexer(lp.genes)
    totals = counts.sum(1, keepdims=True)
    y = np.log1p(counts[:, gene_idx] * (lp.target_sum / np.maximum(totals, 1)))[test]
    rows = []
    for image in ("he", "he_shifted", "he_shifted_normalized"):
        key = Keys.TILE_TABLE if image == "he" else f"{image}_tiles"
        if image != "he":
            # The same tiles (grid, split, cell assignment) as the original section: a copy of its tile table,
            # featurized from the recoloured image. Re-tiling the recoloured image instead would keep a
            # different set of tiles (tissue detection sees other colours) and re-assign the cell table's tiles.
            sdata.tables[key] = _image_only_copy(base)
            sg.tl.embed(sdata, model, table_key=None, tile_key=key, image_key=image)  # featurizes as for training
        tiles = sdata.tables[key]
        x = np.hstack([tiles.obsm[k] for k in lp.embedding_keys])[test]
        pred = lp.predict(x)
        zi = tiles.obsm[Keys.embedding()["image"]["macro"]][test]
        zs = base.obsm[Keys.embedding()["st"]["macro"]][test]
        r = recall_at(zi, zs)
        rows.append({
            "image": image,
            "n_test": int(test.sum()),
            **{f"image->st {k}": round(float(v), 3) for k, v in r.items()},
            "tile_pcc": round(float(np.nanmean(rowwise_pcc(y, pred))), 3),
            "gene_pcc": round(float(np.nanmean(rowwise_pcc(y.T, pred.T))), 3),
            "mse": round(float(np.mean((y - pred) ** 2)), 3),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "n_tiles": int(base.n_obs),
                      "chance R@10%": round(max(1, int(0.1 * test.sum())) / test.sum(), 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
