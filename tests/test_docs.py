"""The documentation: every output key is documented, and the site builds offline with ``-W`` (warnings are errors).

The build copies ``docs/`` and ``tutorials/`` into a temporary directory, so nothing (``docs/generated``,
``docs/_build``) is written into the checkout. It needs the ``doc`` extra, which the ``test`` extra includes,
and takes about half a minute (notebooks are rendered as committed, not executed), so CI runs it by default.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sigmma_sc._constants import Keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _documented_keys() -> set[str]:
    """Every name in ``Keys`` and every key its functions derive from the default ``key_added``, with ``{scale}``
    and ``{image_key}`` spelled as docs/outputs.md spells them."""
    names = {v for k, v in vars(Keys).items() if k.isupper() and isinstance(v, str)}
    tiling = Keys.tiling()
    names |= {tiling["tile_table"], tiling["shapes"], tiling["cell_tile"], tiling["cell_spatial"]}
    names |= set(tiling["cell_blocks"].values()) | set(Keys.graph().values())
    names |= {keys["{scale}"] for keys in Keys.embedding(scales=("{scale}",)).values()}
    names |= {Keys.microenvironments(scales=("{scale}",))["{scale}"]}
    return names - {Keys.GRAPH}


def test_outputs_page_lists_every_key():
    text = (DOCS / "outputs.md").read_text()
    missing = sorted(k for k in _documented_keys() if f'"{k}"' not in text)
    assert not missing, f"docs/outputs.md does not list {missing} (see sigmma_sc._constants.Keys)"


def test_api_page_lists_every_public_name():
    import importlib

    text = (DOCS / "api.md").read_text()
    missing = []
    for ns in ("pp", "tl", "pl", "io", "datasets", "metrics", "data", "model", "train", "nn"):
        try:
            mod = importlib.import_module(f"sigmma_sc.{ns}")
        except ImportError:  # pragma: no cover - namespace not built yet
            continue
        section = text.split(f".. module:: sigmma_sc.{ns}\n", 1)
        assert len(section) == 2, f"docs/api.md has no section for sigmma_sc.{ns}"
        body = section[1].split(".. module::", 1)[0]
        missing += [f"{ns}.{name}" for name in mod.__all__ if f"\n   {name}\n" not in body]
    assert not missing, f"docs/api.md does not list {missing}"


def test_docs_build_offline_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    src = tmp_path / "src"
    shutil.copytree(DOCS, src / "docs", symlinks=True, ignore=shutil.ignore_patterns("_build", "generated"))
    shutil.copytree(ROOT / "tutorials", src / "tutorials", ignore=shutil.ignore_patterns("data", "*.zarr", "*.pt"))
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "docs", str(tmp_path / "html")],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SIGMMA_DOCS_INTERSPHINX": "0"},
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-10000:]
    for page in ("index", "installation", "how_it_works", "api", "outputs", "napari", "evaluation", "changelog"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    for tutorial in ("quickstart", "bonemarrow"):
        assert (tmp_path / "html" / "tutorials" / f"{tutorial}.html").is_file(), tutorial
    assert (tmp_path / "html" / "generated" / "sigmma_sc.tl.train_sigmma.html").is_file()
