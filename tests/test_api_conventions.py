"""Package-wide conventions: public signatures and the one-way import direction."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

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


# --- import direction -----------------------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "sigmma_sc"
#: layer of each subpackage: a module may import its own layer or a lower one (``pp/tl/pl -> data -> model -> nn``);
#: the base modules (constants, settings, utilities, the package root) are importable from everywhere
LAYERS = {"nn": 0, "model": 1, "data": 2, "pp": 3, "tl": 3, "pl": 3, "metrics": 3, "io": 3, "datasets": 3}
BASE = {"", "_constants", "_settings", "_docs", "_utils"}
TOP = {"_cli": 4, "__main__": 4}


def _module_imports() -> dict[str, set[str]]:
    """Module -> the ``sigmma_sc`` modules it imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    modules = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    edges: dict[str, set[str]] = {}
    for mod, (f, is_pkg) in modules.items():
        tree = ast.parse(f.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        package = mod.split(".") if is_pkg else mod.split(".")[:-1]
        out = set()
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "sigmma_sc"]
            elif node.level == 0:
                targets = [node.module] if node.module and node.module.split(".")[0] == "sigmma_sc" else []
            else:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            out |= {t for t in targets if t in modules and t != mod}
        edges[mod] = out
    return edges


def _layer(module: str) -> tuple[str, float]:
    sub = module.split(".")[1] if "." in module else ""
    if sub in BASE:
        return sub, -1
    if sub in TOP:
        return sub, TOP[sub]
    assert sub in LAYERS, f"subpackage {sub!r} has no layer in tests/test_api_conventions.py::LAYERS; add it"
    return sub, LAYERS[sub]


def test_imports_run_one_way():
    """``pp/tl/pl -> data -> model -> nn``: no module imports a higher layer (an AST scan of the package)."""
    edges = _module_imports()
    assert len(edges) > 50, "the scan found too few modules"
    wrong = []
    for mod, targets in edges.items():
        (sub, layer) = _layer(mod)
        for t in targets:
            tsub, tlayer = _layer(t)
            if tlayer > layer or (layer == -1 and tsub not in BASE):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, "imports against the layer direction pp/tl/pl -> data -> model -> nn:\n" + "\n".join(wrong)


def test_no_import_cycles():
    """No cycle among modules, nor among the subpackages of one layer (e.g. ``tl`` <-> ``pp``)."""
    edges = _module_imports()
    sub_edges: dict[str, set[str]] = {}
    for mod, targets in edges.items():
        for t in targets:
            a, b = _layer(mod)[0], _layer(t)[0]
            if a != b and a not in BASE and b not in BASE:
                sub_edges.setdefault(a, set()).add(b)
    for graph, what in ((edges, "modules"), (sub_edges, "subpackages")):
        cycles = _cycles(graph)
        assert not cycles, f"import cycles among {what}: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    nodes = set(graph) | {t for ts in graph.values() for t in ts}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter
                counter += 1
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(sorted(graph.get(nxt, ())))))
            elif nxt in on_stack:
                low[v] = min(low[v], index[nxt])
    return out


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
