"""TrainingBundle.concat and bundles over several files."""

from __future__ import annotations

import pytest
import torch
from _toy import toy_bundle

from sigmma_sc.model import TrainingBundle


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_concat_selects_like_its_parts_and_round_trips(tmp_path):
    a, b = toy_bundle(n_tiles=10, seed=0), toy_bundle(n_tiles=7, seed=1, n_empty=1)
    c = TrainingBundle.concat([a, b], names=["A", "B"])
    assert (c.n_tiles, c.n_cells) == (17, a.n_cells + b.n_cells)
    assert c.meta["sections"] == ["A", "B"]
    assert c.section.tolist() == [0] * 10 + [1] * 7
    assert torch.equal(c.split, torch.cat([a.split, b.split]))
    for part, idx in ((a, torch.arange(10)), (b, torch.arange(10, 17))):
        got, want = c.select(idx), part.select(torch.arange(idx.numel()))
        assert all(_equal(x, y) for x, y in zip(got, want, strict=True))
        assert got.edge_sections == want.edge_sections
    mixed = c.select(torch.tensor([3, 12, 0, 16]))  # a batch mixing both sections
    assert mixed.num_tiles == 4
    assert int(mixed.batch.max()) <= 3
    # a cohort bundle saved and reloaded, and a bundle over several files
    c.save(tmp_path / "c.pt")
    back = TrainingBundle.load(tmp_path / "c.pt")
    assert back.meta["sections"] == ["A", "B"]
    assert torch.equal(back.section, c.section)
    a.save(tmp_path / "A.pt")
    b.save(tmp_path / "B.pt")
    files = TrainingBundle.load([tmp_path / "A.pt", tmp_path / "B.pt"])
    assert files.meta["sections"] == ["A", "B"]
    assert torch.equal(files.x, c.x)
    assert torch.equal(files.edge_index, c.edge_index)
    # nested: a cohort bundle joined with another section keeps the section names
    d = TrainingBundle.concat([c, toy_bundle(n_tiles=5, seed=2)], names=None)
    assert d.meta["sections"] == ["A", "B", "section_1"]
    assert d.section.tolist()[-5:] == [2] * 5


def test_concat_refuses_mismatched_sections():
    a = toy_bundle(n_tiles=6, seed=0)
    other_width = toy_bundle(n_tiles=6, n_features=5, seed=1)
    with pytest.raises(ValueError, match="disagree on 'n_features'"):
        TrainingBundle.concat([a, other_width])
    b = toy_bundle(n_tiles=6, seed=1)
    b.meta["tile_size_um"] = 64.0
    a.meta["tile_size_um"] = 128.0
    with pytest.raises(ValueError, match="disagree on 'tile_size_um'"):
        TrainingBundle.concat([a, b])
    with pytest.raises(ValueError, match="unique"):
        TrainingBundle.concat([toy_bundle(n_tiles=4), toy_bundle(n_tiles=4)], names=["x", "x"])
    with pytest.raises(ValueError, match="`section` must be"):
        TrainingBundle(**{**{k: v for k, v in a.state_dict().items() if k not in ("format", "version")},
                          "section": torch.zeros(6, dtype=torch.long)})  # fmt: skip
