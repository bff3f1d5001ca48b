import numpy as np
import pytest
import torch
from _toy import toy_bundle

from sigmma_sc._constants import GRID, SCALES
from sigmma_sc.model import TrainingBundle
from sigmma_sc.nn._edges import block_ids


def _parts(b):
    return {
        "x": b.x,
        "cell_ptr": b.cell_ptr,
        "pos": b.pos,
        "edge_index": b.edge_index,
        "cand_meso": b.cand_meso,
        "cand_macro": b.cand_macro,
        "image_features": b.image_features,
        "split": b.split,
    }


def _reference_select(b, tiles):
    """Naive per-tile gather (test only)."""
    xs, batch, edges = [], [], {k: [] for k in ("edge_index", "cand_meso", "cand_macro")}
    offset = 0
    for i, t in enumerate(tiles):
        lo, hi = int(b.cell_ptr[t]), int(b.cell_ptr[t + 1])
        xs.append(b.x[lo:hi])
        batch += [i] * (hi - lo)
        for k in edges:
            e = getattr(b, k)
            keep = (e[0] >= lo) & (e[0] < hi)
            edges[k].append(e[:, keep] - lo + offset)
        offset += hi - lo
    return torch.cat(xs), torch.tensor(batch, dtype=torch.long), {k: torch.cat(v, 1) for k, v in edges.items()}


def _as_set(e):
    return set(map(tuple, e.T.tolist()))


def test_select_matches_reference():
    b = toy_bundle(n_tiles=10, n_empty=2, seed=3)
    tiles = [4, 9, 0, 4, 8]  # unordered, repeated, empty tiles included
    tb = b.select(torch.tensor(tiles))
    x, batch, edges = _reference_select(b, tiles)
    torch.testing.assert_close(tb.x, x)
    assert torch.equal(tb.batch, batch)
    assert tb.num_tiles == 5
    for k, e in edges.items():
        assert _as_set(getattr(tb, k)) == _as_set(e)
        assert getattr(tb, k).shape == e.shape
    for s in SCALES:
        torch.testing.assert_close(tb.image_features[s], b.image_features[s][tiles])
    x2, pos, batch2, ei, cm, cM, feats = tb  # unpacks as the 7-tuple
    assert x2 is tb.x
    assert feats is tb.image_features


def test_candidate_normalisation():
    b = toy_bundle(n_tiles=6, seed=2)
    n = b.n_cells
    tile = torch.repeat_interleave(torch.arange(b.n_tiles), b.cell_ptr.diff())
    for e in (b.cand_meso, b.cand_macro):
        assert (e[0] != e[1]).all()
        assert _as_set(e) == _as_set(e.flip(0))  # undirected
        assert len(_as_set(e)) == e.shape[1]  # no duplicates
    meso = block_ids(b.pos, tile, GRID["meso"])
    assert (meso[b.cand_meso[0]] == meso[b.cand_meso[1]]).all()
    assert not (_as_set(b.cand_meso) & _as_set(b.cand_macro))
    # every kNN edge crossing a micro block is a candidate at meso or macro scale
    micro = block_ids(b.pos, tile, GRID["micro"])
    src, dst = b.edge_index
    crossing = _as_set(b.edge_index[:, micro[src] != micro[dst]])
    assert crossing <= _as_set(b.cand_meso) | _as_set(b.cand_macro)
    # idempotent
    again = TrainingBundle(**_parts(b), meta=b.meta)
    for k in ("edge_index", "cand_meso", "cand_macro"):
        assert torch.equal(getattr(again, k), getattr(b, k))
    assert n == again.n_cells


def test_save_load_roundtrip(tmp_path):
    b = toy_bundle(n_tiles=8, seed=1)
    b.meta["feature_key"] = "X_pca"
    b.save(tmp_path / "b.pt")
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert raw["format"] == "sigmma_sc.TrainingBundle"
    c = TrainingBundle.load(tmp_path / "b.pt", map_location="cpu")
    for k, v in _parts(b).items():
        if isinstance(v, dict):
            for s in v:
                assert torch.equal(v[s], c.image_features[s])
        else:
            assert torch.equal(v, getattr(c, k))
    assert c.meta == b.meta
    assert "TrainingBundle(8 tiles" in repr(c)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a sigmma_sc training bundle"):
        TrainingBundle.load(tmp_path / "bad.pt")


def test_to_device_copy_and_properties():
    b = toy_bundle(n_tiles=6)
    c = b.to("cpu")
    assert c is not b
    assert c.n_tiles == 6
    assert c.n_features == 8
    assert c.image_dim == 12
    assert torch.equal(c.select([1, 2]).x, b.select([1, 2]).x)
    assert b.tiles_in("train").numel() + b.tiles_in(1).numel() + b.tiles_in("test").numel() == 6


def test_float16_features_and_no_features():
    b = toy_bundle(n_tiles=5)
    feats = {s: f.half() for s, f in b.image_features.items()}
    c = TrainingBundle(**{**_parts(b), "image_features": feats})
    assert c.image_features["micro"].dtype == torch.float16
    assert c.select([0]).image_features["micro"].dtype == torch.float32
    d = TrainingBundle(**{**_parts(b), "image_features": None, "split": None})
    assert d.image_dim is None
    assert d.select([0, 1]).image_features is None
    assert (d.split == 0).all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p: p.update(x=p["x"].clone().fill_(np.nan)), "NaN"),
        (lambda p: p.update(pos=p["pos"] + 1.5), r"\[0, 1\]"),
        (lambda p: p.update(pos=p["pos"][:-1]), "shape"),
        (lambda p: p.update(cell_ptr=p["cell_ptr"].flip(0)), "cell_ptr"),
        (lambda p: p.update(cell_ptr=p["cell_ptr"][:-1]), "cell_ptr"),
        (lambda p: p.update(edge_index=torch.tensor([[0], [int(p["cell_ptr"][1])]])), "different tiles"),
        (lambda p: p.update(cand_macro=torch.tensor([[0], [10_000]])), "outside"),
        (lambda p: p.update(edge_index=torch.zeros(3, 2, dtype=torch.long)), r"\(2, E\)"),
        (lambda p: p.update(image_features={"micro": torch.zeros(2, 3)}), "image_features"),
        (lambda p: p.update(image_features={"nano": torch.zeros(6, 3)}), "scales"),
        (lambda p: p.update(split=torch.full((6,), 5)), "split"),
        (lambda p: p.update(x=p["x"].long()), "floating point"),
    ],
)
def test_validation_errors(change, match):
    p = _parts(toy_bundle(n_tiles=6))
    change(p)
    with pytest.raises(ValueError, match=match):
        TrainingBundle(**p)


def test_meta_must_be_jsonable():
    with pytest.raises(ValueError, match="JSON"):
        TrainingBundle(**_parts(toy_bundle(n_tiles=3)), meta={"a": object()})
