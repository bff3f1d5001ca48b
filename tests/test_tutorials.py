"""The tutorials run from top to bottom (executed with nbclient in a temporary directory).

The committed notebooks keep their outputs for the docs (which never execute them); this test re-executes
copies, so the tutorials cannot silently rot. The quick start trains on the 15,000-cell synthetic section
(a few minutes on a CPU) and runs in the default suite; the bone-marrow tutorial trains on the real
84,518-cell section in ``../shared/data`` (about a quarter of an hour; skipped without the data), hence
``slow``: ``python -m pytest -m slow tests/test_tutorials.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_tutorials_are_committed_with_outputs():
    """Docs render the notebooks as committed (``nb_execution_mode = "off"``), so they must hold outputs."""
    nbformat = pytest.importorskip("nbformat")
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path.name
        assert all(c.get("execution_count") for c in code), f"{path.name}: not executed top to bottom"
        assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{path.name}: committed without outputs"
        errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: committed with an error output"
        # executed with MPLBACKEND=Agg, a notebook keeps its text but loses every figure: each plotting cell
        # must carry its picture (run the kernel with the inline backend, i.e. without MPLBACKEND set)
        blank = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code"
            and "sg.pl." in c.source
            and not any("image/png" in o.get("data", {}) for o in c.outputs)
        ]
        assert not blank, f"{path.name}: plotting cells {blank} were committed without their figure"


_HEAVY = {"bonemarrow": (pytest.mark.slow, pytest.mark.data)}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=_HEAVY.get(p.stem, ())) for p in NOTEBOOKS])
def test_tutorial_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # the kernel must be this interpreter (the "python3" kernelspec runs whatever `python` is on PATH)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if path.stem == "bonemarrow":  # the real section, read from ../shared/data
        from conftest import SHARED_DATA

        data = SHARED_DATA / "xenium-bonemarrow"
        if not data.exists():
            pytest.skip(f"needs the real data in {data}")
        monkeypatch.setenv("SIGMMA_BONEMARROW", str(data))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback

    outputs = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    if path.stem == "quickstart":
        assert "CXCL2" in outputs
        assert "CXCL6" in outputs
        assert (tmp_path / "sigmma_quickstart.zarr").is_dir()
        assert (tmp_path / "sigmma_quickstart_model.pt").is_file()
    if path.stem == "bonemarrow":
        assert "84518 × 477" in outputs or "n_obs × n_vars = 84518 × 477" in outputs
        assert (tmp_path / "bonemarrow_sigmma.zarr").is_dir()
