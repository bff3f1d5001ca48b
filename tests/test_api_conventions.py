"""Package-wide conventions: public signatures and the one-way import direction."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

NAMESPACES = ("pp", "tl", "pl", "io", "datasets", "metrics")

#: functions that write into ``sdata``: each takes ``key_added`` (a prefix or key) and ``inplace``
WRITERS = (
    "pp.tile",
    "pp.cell_graph",
    "pp.stain_normalize",
    "tl.embed",
    "tl.microenvironments",
    "tl.predict_expression",
)
#: writers without ``key_added``, and why
NO_KEY_ADDED = {
    "tl.featurize": "caches backbone features of its tile table (one backbone per tiling; tile again for another)",
    "tl.train_sigmma": "returns the model; writes only the training record of the tile table it trained on",
    "tl.attach_reference": "writes into the model, not into sdata",
}
#: readers of embeddings: each takes ``use_rep`` (the ``key_added`` of ``sg.tl.embed``)
READERS = (
    "tl.microenvironments",
    "tl.retrieve",
    "tl.fit_probe",
    "tl.predict_expression",
    "metrics.evaluate",
    "metrics.cross_modal_retrieval",
    "pl.retrieval_examples",
)


def _public_functions():
    """Every public function of the user-facing namespaces; a namespace that fails to import fails the tests."""
    for ns in NAMESPACES:
        mod = importlib.import_module(f"sigmma_sc.{ns}")  # no silent skip: an ImportError is a failure
        assert mod.__all__, f"sigmma_sc.{ns} exports nothing"
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{ns}.{name}", obj


PUBLIC = dict(_public_functions())


def _func(name):
    assert name in PUBLIC, f"{name} is listed in tests/test_api_conventions.py but not public any more"
    return PUBLIC[name]


@pytest.mark.parametrize(("name", "func"), list(PUBLIC.items()))
def test_signature_conventions(name, func):
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name}: at most 3 positional parameters, got {[p.name for p in positional]}"
    for p in params:
        assert not isinstance(p.default, list | dict | set), f"{name}: mutable default for {p.name}"
        if p.name == "seed":  # scanpy: None means unseeded, so the default seed is explicit
            assert p.default is not None, f"{name}: default `seed` must be an explicit int (None means unseeded)"
        assert p.name != "copy", f"{name}: `copy=` (SpatialData functions take `inplace=`)"
    assert func.__doc__, f"{name}: docstring"
    assert "Parameters" in func.__doc__, f"{name}: numpydoc docstring with Parameters"
    documented = {n.strip() for line in inspect.getdoc(func).splitlines() for n in line.split(",")}  # "a, b"
    for p in params:
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            assert p.name in documented, f"{name}: parameter {p.name!r} is not documented"
    assert "{doc_" not in func.__doc__, f"{name}: unsubstituted _docs placeholder"
    if "inplace" in {p.name for p in params}:
        assert "Returns" in func.__doc__, f"{name}: writers document what they write under Returns"


@pytest.mark.parametrize("name", WRITERS)
def test_writers_take_key_added_and_inplace(name):
    func = _func(name)
    params = inspect.signature(func).parameters
    assert "key_added" in params, f"{name}: writers take `key_added`"
    assert "inplace" in params, f"{name}: writers take `inplace`"
    assert params["inplace"].default is True
    returns = func.__doc__[func.__doc__.index("Returns") :]
    assert "key_added" in returns, f"{name}: Returns names the written keys in scanpy's `'default' | key_added` form"


@pytest.mark.parametrize("name", list(NO_KEY_ADDED))
def test_exempt_writers_still_exist(name):
    assert "key_added" not in inspect.signature(_func(name)).parameters, (
        f"{name} now takes key_added: list it in WRITERS"
    )


@pytest.mark.parametrize("name", READERS)
def test_readers_take_use_rep(name):
    params = inspect.signature(_func(name)).parameters
    assert "use_rep" in params, f"{name}: embedding readers take `use_rep`"


def test_tl_and_pl_microenvironments_share_names():
    tl = inspect.signature(_func("tl.microenvironments")).parameters
    pl = inspect.signature(_func("pl.microenvironments")).parameters
    assert tl["scale"].default == pl["scale"].default


def test_fixtures_are_not_public_api():
    import sigmma_sc.model

    assert "toy_bundle" not in sigmma_sc.model.__all__
    assert not hasattr(sigmma_sc.model, "toy_bundle")


def test_core_imports_without_scverse_stack():
    """``sigmma_sc.nn``, ``sigmma_sc.train`` and ``sigmma_sc.model`` run on a GPU box with only torch, PyG, timm, numpy."""
    code = (
        "import sys; import sigmma_sc.nn, sigmma_sc.train, sigmma_sc.model; "
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
#: layer of each subpackage: a module may import its own layer or a lower one (``pp/tl/pl -> data -> model -> train -> nn``);
#: the base modules (constants, settings, utilities, the package root) are importable from everywhere
LAYERS = {"nn": 0, "train": 0.5, "model": 1, "data": 2, "pp": 3, "tl": 3, "pl": 3, "metrics": 3, "io": 3, "datasets": 3}
BASE = {"", "_constants", "_settings", "_docs", "_utils", "_threads"}
TOP = {"_cli": 4, "__main__": 4, "_demo_report": 4}


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
    """``pp/tl/pl -> data -> model -> train -> nn``: no module imports a higher layer (an AST scan of the package)."""
    edges = _module_imports()
    assert len(edges) > 50, "the scan found too few modules"
    wrong = []
    for mod, targets in edges.items():
        (sub, layer) = _layer(mod)
        for t in targets:
            tsub, tlayer = _layer(t)
            if tlayer > layer or (layer == -1 and tsub not in BASE):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, "imports against the layer direction pp/tl/pl -> data -> model -> train -> nn:\n" + "\n".join(wrong)


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
