"""benchmarks/train_defaults.py: compare runs with references, resumes from checkpoints, rescores and merges."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _benchmarks import load_benchmark

REFERENCES = ("initial weights, hidden 16 (no training)", "frozen backbone, 3 scales (no training)")


@pytest.fixture(scope="module")
def td():
    return load_benchmark("train_defaults")


def _argv(tmp, seed: int, *only: str) -> list[str]:
    return [
        "compare", "--dataset", "synthetic", "--n-cells", "600", "--tile-size-um", "24",
        "--backbone", "test_efficientnet", "--no-pretrained", "--hidden", "16", "--steps", "4", "--threads", "1",
        "--seeds", str(seed), "--only", *only, "--checkpoint", "--tag", f"_s{seed}",
        "--out-dir", str(tmp / "out"), "--results-dir", str(tmp / "results"),
    ]  # fmt: skip


def _rows(path) -> dict[str, list[dict]]:
    return json.loads(path.read_text())["rows"]


@pytest.fixture(scope="module")
def runs(td, tmp_path_factory):
    """Seed 0 (defaults and the references) and seed 1 (defaults), as two parallel jobs would write them."""
    tmp = tmp_path_factory.mktemp("train_defaults")
    td.main(_argv(tmp, 0, "defaults", *REFERENCES))
    td.main(_argv(tmp, 1, "defaults"))
    return tmp, [tmp / "results" / f"train_defaults_compare_s{s}_synthetic_24um.json" for s in (0, 1)]


def test_compare_rows_and_references(runs):
    _, (s0, _) = runs
    rows = _rows(s0)
    assert set(rows) == {"defaults", *REFERENCES}
    (trained,) = rows["defaults"]
    assert trained["seed"] == 0
    assert trained["steps"] == 4
    for col in ("image->st R@10%", "st->image R@10%", "hest_gene_pcc", "paper_gene_pcc", "mean_cosine_image",
                "mean_cosine_st", "participation_ratio_image", "participation_ratio_st", "mean_cosine_all"):  # fmt: skip
        assert np.isfinite(trained[col]), col
    assert 0 <= trained["image->st R@10%"] <= 1
    # the spread over both modalities is the mean of the per-modality spreads (training's diagnostics vs ours)
    assert trained["mean_cosine_all"] == pytest.approx((trained["mean_cosine_image"] + trained["mean_cosine_st"]) / 2)
    (untrained,) = rows[REFERENCES[0]]
    assert untrained["steps"] == 0
    assert np.isnan(untrained["best_val_rank"])
    assert np.isfinite(untrained["hest_gene_pcc"])
    (backbone,) = rows[REFERENCES[1]]  # deterministic: scored once, without retrieval
    assert np.isnan(backbone["image->st R@10%"])
    assert np.isfinite(backbone["paper_gene_pcc"])


def test_rerun_resumes_from_the_checkpoint(td, runs, caplog):
    tmp, (s0, _) = runs
    before = _rows(s0)["defaults"][0]
    assert (tmp / "out" / "checkpoints" / "compare_s0_synthetic_24um" / "defaults_seed0" / "last.pt").exists()
    with caplog.at_level(logging.INFO, logger="sigmma_sc.train._trainer"):
        td.main(_argv(tmp, 0, "defaults", *REFERENCES))  # the same command: the finished run is loaded, not retrained
    assert "Resuming from" in caplog.text
    after = _rows(s0)["defaults"][0]
    assert after["epoch_seconds"] == before["epoch_seconds"]  # the epochs' records come from the checkpoint
    for col in ("hest_gene_pcc", "image->st R@10%", "best_val_rank", "mean_cosine_st", "kept_step"):
        assert after[col] == before[col], col


def test_rescore_fills_old_results_and_checks_the_weights(td, runs):
    tmp, (_, s1) = runs
    full = json.loads(s1.read_text())
    old = json.loads(s1.read_text())  # as written before the paper probe and the per-modality spread
    (row,) = old["rows"]["defaults"]
    for col in [c for c in row if c.startswith("paper_") or c.endswith(("_image", "_st"))]:
        del row[col]
    for m in ("mean_cosine", "participation_ratio"):
        row[f"{m}_st"] = row.pop(f"{m}_all")
    s1.write_text(json.dumps(old))
    args = ["rescore", "--files", str(s1), "--hidden", "16", "--out-dir", str(tmp / "out"),
            "--results-dir", str(tmp / "results")]  # fmt: skip
    td.main(args)
    (new,) = _rows(s1)["defaults"]
    (ref,) = full["rows"]["defaults"]
    assert set(new) == set(ref)
    for col, value in ref.items():
        assert new[col] == pytest.approx(value, rel=1e-9, nan_ok=True), col
    new["hest_gene_pcc"] += 0.1  # not the scored weights: refused
    s1.write_text(json.dumps({**full, "rows": {"defaults": [new]}}))
    with pytest.raises(SystemExit, match="not the scored weights"):
        td.main(args)
    s1.write_text(json.dumps(full))


def test_merge_seeds_of_parallel_jobs(td, runs):
    tmp, files = runs
    td.main(["merge", "--files", *map(str, files), "--name", "compare_merged", "--results-dir", str(tmp / "results")])
    merged = json.loads((tmp / "results" / "train_defaults_compare_merged_synthetic_24um.json").read_text())
    assert [r["seed"] for r in merged["rows"]["defaults"]] == [0, 1]
    assert len(merged["rows"][REFERENCES[1]]) == 1
    assert [m["file"] for m in merged["merged_from"]] == [f.name for f in files]
    other = json.loads(files[1].read_text())
    other["info"]["split"] = {"train": 1}
    bad = tmp / "results" / "other.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="not on the same section"):
        td.main(["merge", "--files", str(files[0]), str(bad), "--results-dir", str(tmp / "results")])


def test_table_pools_seeds_of_parallel_jobs(td, runs, capsys):
    _, (s0, s1) = runs
    out = td.main(["table", "--files", str(s0), str(s1), "--only", "defaults", REFERENCES[1]])
    lines = out.splitlines()
    assert lines[0].startswith("| setting | image->st R@5%")
    assert len(lines) == 4  # header, rule, the two rows in the order asked
    r0, r1 = (_rows(f)["defaults"][0] for f in (s0, s1))
    mean = (r0["hest_gene_pcc"] + r1["hest_gene_pcc"]) / 2
    std = abs(r0["hest_gene_pcc"] - r1["hest_gene_pcc"]) / np.sqrt(2)  # sample std of two values
    assert lines[2].startswith("| defaults (2 seeds) |")
    assert f"{mean:.3f} ± {std:.3f}" in lines[2]
    assert lines[3].startswith(f"| {REFERENCES[1]} (1 seed) | – |")  # the backbone has no retrieval
    assert out in capsys.readouterr().out
    old = json.loads(s0.read_text())  # written before the spread was split by modality: "_st" averaged both
    for r in old["rows"]["defaults"]:
        for m in ("mean_cosine", "participation_ratio"):
            r[f"{m}_st"] = r.pop(f"{m}_all")
            del r[f"{m}_image"]
    s0.with_name("old.json").write_text(json.dumps(old))
    (row,) = td.main(["table", "--files", str(s0.with_name("old.json")), "--only", "defaults"]).splitlines()[2:]
    assert row.endswith(" – | – | – | – | 4 | 4 |")  # per-modality spread unknown: not shown as the ST's
    with pytest.raises(SystemExit, match="a seed occurs in two files"):
        td.main(["table", "--files", str(s0), str(s0)])
    with pytest.raises(SystemExit, match="No rows"):
        td.main(["table", "--files", str(s0), "--only", "paper (Table 3)"])
