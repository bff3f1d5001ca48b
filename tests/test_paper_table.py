"""benchmarks/paper_table.py runs end to end on a tiny synthetic section and writes every row."""

from __future__ import annotations

import json

from _benchmarks import load_benchmark


def _load():
    return load_benchmark("paper_table")


def test_paper_table_end_to_end(tmp_path):
    pt = _load()
    out = tmp_path / "table.md"
    argv = [
        "--dataset", "synthetic", "--synthetic-source", "section", "--n-cells", "600", "--quick",
        "--tile-size-um", "24", "--backbone", "test_efficientnet", "--no-pretrained", "--seeds", "0", "1",
        "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    assert pt.main(argv) == out
    text = out.read_text()
    for row in pt.ROWS:  # Table 5 layout and details, and the training table for trained rows
        assert text.count(f"| {row['label']} |") == (3 if "config" in row else 2), row["label"]
    for needle in ("Command: `python benchmarks/paper_table.py", "Machine:", "Runtime:", "HEST PCC", "R@15%"):
        assert needle in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert len(raw["results"]["sigmma"]) == 2
    assert len(raw["results"]["backbone_macro"]) == 1
    full = raw["results"]["sigmma"][0]
    assert set(full) == {"model", "macro", "config"}
    assert full["model"]["steps"] >= 1
    assert full["model"]["best_step"] <= full["model"]["steps"]
    assert full["config"]["steps"] == 6
    assert full["config"]["schedule"] == "cosine"
    assert 0 <= full["model"]["image->st R@10%"] <= 1
    # the featurized section is cached: a second run reuses it
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    assert (cached[0] / "bundle.pt").exists()
    assert pt.main([*argv, "--rows", "backbone_macro", "--out", str(tmp_path / "again.md")]).exists()
    # the markdown can be re-rendered from the run's JSON
    out.unlink()
    assert pt.main(["--dataset", "synthetic", "--from-json", str(out.with_suffix(".json"))]) == out
    assert out.read_text() == text


def test_rows_run_the_papers_rows():
    """Each trained row's config is valid and runs the paper's row (Table 5)."""
    from sigmma_sc.model import SigmmaConfig

    pt = _load()
    rows = {r["name"]: SigmmaConfig(n_features=4, image_dim=4, **r["config"]) for r in pt.ROWS if "config" in r}
    assert (rows["bleep"].use_graph, rows["bleep"].scales) == (False, ("macro",))
    single = rows["graph"]  # one GNN over the tile's plain kNN graph, macro only
    assert (single.graph, single.scales, single.edge_addition, single.use_graph) == ("tile", ("macro",), False, True)
    multi = rows["graph_multiscale"]  # the hierarchy with fixed edges
    assert (multi.graph, multi.scales, multi.edge_addition) == ("hierarchical", pt.SCALES, False)
    full = rows["sigmma"]
    assert (full.graph, full.scales, full.edge_addition, full.use_graph) == ("hierarchical", pt.SCALES, True, True)
    # the controls change only the edges of the row they control
    assert rows["no_edges"].to_dict() == {**multi.to_dict(), "edges": "none"}
    assert rows["rewired"].to_dict() == {**full.to_dict(), "edges": "rewired"}
