"""No import cycle between ``sigmma_sc`` modules: lazy (in a function) and type-only imports count too.

``tests/test_api_conventions.py`` checks the layer direction of run-time imports; this scan is stricter about
cycles. It counts every import statement, including those inside functions and under ``if TYPE_CHECKING:``,
and the package ``__init__`` that importing a submodule runs first: ``from ..model._bundle import X`` in
``sigmma_sc.train`` also imports ``sigmma_sc.model`` (its ``__init__``), so it closes a cycle when that
``__init__`` imports the training layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_api_conventions import _cycles as cycles  # Tarjan's strongly connected components

SRC = Path(__file__).resolve().parents[1] / "src" / "sigmma_sc"


def _modules(src: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in src.rglob("*.py"):
        parts = f.relative_to(src.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules that importing it may import (every import statement, any place)."""
    modules = _modules(src)
    edges: dict[str, set[str]] = {}
    for mod, (f, is_pkg) in modules.items():
        package = mod.split(".") if is_pkg else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `import a.b.c` where c is an attribute
                    name = name.rpartition(".")[0]
                if name and name.split(".")[0] == src.name:
                    targets.add(name)
        # importing a.b.c runs a and a.b first; the importer's own ancestors are already running
        mine = set(_ancestors(mod)) | ({mod} if is_pkg else set())
        implied = {a for t in targets for a in [*_ancestors(t), t] if a not in mine}
        edges[mod] = {t for t in implied if t != mod}
    return edges


def test_no_module_cycles_counting_lazy_and_type_only_imports():
    graph = import_graph()
    assert len(graph) > 50, "the scan found too few modules"
    assert "sigmma_sc.train._trainer" in graph["sigmma_sc.model._sigmma"]
    found = cycles(graph)
    assert not found, "import cycles (lazy and type-only imports included):\n" + "\n".join(map(str, found))


def test_the_scan_finds_lazy_type_only_and_package_cycles(tmp_path):
    """The control: each kind of cycle that the package must not have is found in a tiny package."""
    pkg = tmp_path / "sigmma_sc"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a/__init__.py": "from ._x import X\n",
        "a/_x.py": "def f():\n    from ..b._y import Y\n",  # lazy
        "a/_z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._w import W\n",  # type-only
        "a/_w.py": "from ._z import Z\n",
        "b/__init__.py": "",
        "b/_y.py": "from ..a._z import Z\n",  # via the package: runs a/__init__ -> a._x -> b._y
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = cycles(import_graph(pkg))
    assert ["sigmma_sc.a._w", "sigmma_sc.a._z"] in found
    assert any({"sigmma_sc.a", "sigmma_sc.a._x", "sigmma_sc.b._y"} <= set(c) for c in found), found
