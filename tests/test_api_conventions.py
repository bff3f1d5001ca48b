"""Package-wide conventions: public signatures and the one-way import direction."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import sigmma_sc as sg

NAMESPACES = ("pp", "tl", "pl", "io", "datasets", "metrics")


def _public_functions():
    for ns in NAMESPACES:
        try:
            mod = getattr(sg, ns)
        except ImportError:  # pragma: no cover - namespace not built yet
            continue
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{ns}.{name}", obj


@pytest.mark.parametrize(("name", "func"), list(_public_functions()))
def test_signature_conventions(name, func):
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name}: at most 3 positional parameters, got {[p.name for p in positional]}"
    for p in params:
        assert not isinstance(p.default, list | dict | set), f"{name}: mutable default for {p.name}"
    assert func.__doc__, f"{name}: docstring"
    assert "Parameters" in func.__doc__, f"{name}: numpydoc docstring with Parameters"
    if positional and positional[0].name in ("sdata", "data") and "inplace" in {p.name for p in params}:
        assert "Returns" in func.__doc__


def test_core_imports_without_scverse_stack():
    """``sigmma_sc.nn`` and ``sigmma_sc.model`` must run on a GPU box with only torch, PyG, timm and numpy."""
    code = (
        "import sys; import sigmma_sc.nn, sigmma_sc.model; "
        "bad = [m for m in ('spatialdata', 'anndata', 'scanpy', 'squidpy', 'dask', 'zarr') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_is_light():
    code = "import sys, sigmma_sc; sys.exit(1 if any(m in sys.modules for m in ('torch', 'spatialdata')) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
