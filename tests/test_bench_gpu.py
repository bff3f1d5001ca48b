"""``benchmarks/bench_gpu.py``: the CPU dry run, the GPU smoke run and its torch-only imports."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_gpu")


def _check(records, out, *, device):
    names = [r["name"] for r in records]
    assert names == ["featurize/test_vit", "featurize/test_efficientnet", "train", "env"]
    for r in records[:2]:
        assert r["pipeline_crops_per_s"] > 0
        assert r["bare_crops_per_s"] > 0
        assert r["value"] == pytest.approx(r["pipeline_crops_per_s"] / r["bare_crops_per_s"], rel=0.01)
    train = records[2]
    assert train["epochs"] == 2
    assert train["tiles"] == 48
    assert math.isfinite(train["final_train_loss"])
    assert train["oom_fallback"] is False
    assert train["host_syncs_per_step"] == 0, train
    assert (train["peak_gpu_mem_gb"] is None) == (device == "cpu")
    text = out.read_text()
    assert text.count("| date | device |") == 1
    assert len(text.strip().splitlines()) == 2 + len(records)


def test_dry_run(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    records = bench.main(["--dry-run", "--out", str(out)])
    _check(records, out, device="cpu")
    printed = capsys.readouterr().out
    assert '"name": "featurize/test_vit"' in printed
    # a second run appends rows under the same header
    more = bench.main(["--dry-run", "--out", str(out), "--only", "train"])
    assert [r["name"] for r in more] == ["train", "env"]
    assert out.read_text().count("| date | device |") == 1


@pytest.mark.gpu
def test_small_run_on_gpu(bench, tmp_path):
    """The CUDA paths (pinned staging, channels_last, CUDA events, sync counting) at dry-run sizes."""
    out = tmp_path / "bench.md"
    records = bench.main(["--dry-run", "--device", "cuda", "--precisions", "fp32", "--out", str(out)])
    _check(records, out, device="cuda")


def test_bench_imports_only_the_torch_stack():
    """The script and everything it imports run without anndata/spatialdata (a bare GPU machine)."""
    code = (
        "import sys, importlib.util; "
        f"spec = importlib.util.spec_from_file_location('bench_gpu', {str(SCRIPT)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "m.build_backbone('test_efficientnet', pretrained=False); "
        "bad = [k for k in m.SCVERSE if k in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
