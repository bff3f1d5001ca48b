"""Package-wide conventions: public signatures and the one-way import direction."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
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


# --- the key contract (docs/keys.md) --------------------------------------------------------------------------

#: writers whose ``key_added`` is a stem: the ``Keys`` function that derives every key they write from it
KEY_ADDED_STEM = {"pp.tile": "tiling", "pp.cell_graph": "graph", "tl.embed": "embedding",
                  "tl.microenvironments": "microenvironments"}  # fmt: skip
#: writers of one output, written at ``key_added`` itself
KEY_ADDED_KEY = ("pp.stain_normalize", "tl.predict_expression")
#: readers whose ``use_rep`` also takes a full ``.obsm`` key (scanpy's meaning): they read one cell embedding per scale
USE_REP_OBSM = ("tl.microenvironments", "metrics.grid_artefact")
#: parameters that name a whole element of ``sdata``, and how their docs start
ELEMENT_KEYS = {"table_key": "Cell table", "tile_key": "Tile table", "reference_tile_key": "Tile table"}


def _param_docs(func) -> dict[str, str]:
    """Parameter name -> its numpydoc description (one line), from the Parameters section."""
    lines = inspect.getdoc(func).splitlines()
    start = lines.index("Parameters") + 2
    out: dict[str, str] = {}
    names: list[str] = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            if set(line) == {"-"} or line in ("Returns", "Yields", "Raises", "Notes", "Examples", "See Also"):
                break
            names = [n.strip() for n in line.split(",")]
            for n in names:
                out[n] = ""
        elif names:
            for n in names:
                out[n] = (out[n] + " " + line.strip()).strip()
    return out


def _key_contract_violations(name: str, func) -> list[str]:
    """What in ``func``'s signature or docs breaks the key contract of docs/keys.md (empty: nothing)."""
    from sigmma_sc._constants import Keys
    from sigmma_sc._docs import doc_graph_key

    params = inspect.signature(func).parameters
    docs = _param_docs(func)
    bad = []
    if "key_added" in params:
        doc = docs.get("key_added", "")
        if name in KEY_ADDED_STEM:
            fn = KEY_ADDED_STEM[name]
            if not hasattr(Keys, fn):
                bad.append(f"{name}: no `Keys.{fn}` derives its keys")
            if not (doc.startswith("Stem") and f"Keys.{fn}(key_added" in doc):
                bad.append(f"{name}: `key_added` must be documented as the stem, derived by `Keys.{fn}(key_added...)`")
        elif name in KEY_ADDED_KEY:
            if not doc.startswith("Key of"):
                bad.append(f"{name}: `key_added` of a one-output writer is documented as 'Key of ...'")
        else:
            bad.append(f"{name}: takes `key_added` but is in neither KEY_ADDED_STEM nor KEY_ADDED_KEY (docs/keys.md)")
    if "use_rep" in params:
        doc = docs.get("use_rep", "")
        if not (doc.startswith("The ``key_added`` of") and ":func:`sigmma_sc.tl.embed`" in doc):
            bad.append(f"{name}: `use_rep` is documented as 'The ``key_added`` of the :func:`sigmma_sc.tl.embed` run'")
        if ("full ``.obsm`` key" in doc) != (name in USE_REP_OBSM):
            bad.append(f"{name}: `use_rep` takes a full `.obsm` key exactly in USE_REP_OBSM readers ({doc!r})")
        if params["use_rep"].default not in (None, Keys.embedding.__defaults__[0]):
            bad.append(f"{name}: default `use_rep` must be the default `key_added` of `tl.embed` (or None)")
    if "graph_key" in params:
        if docs.get("graph_key", "") != " ".join(doc_graph_key.split("\n", 1)[1].split()):
            bad.append(f"{name}: `graph_key` is documented with `_docs.doc_graph_key`")
        if params["graph_key"].default != Keys.graph.__defaults__[0]:
            bad.append(f"{name}: default `graph_key` must be the default `key_added` of `pp.cell_graph`")
    for key, start in ELEMENT_KEYS.items():
        if key in params:
            doc = docs.get(key, "")
            if not doc.startswith(start) or re.search(r"\b(prefix|stem)\b", doc.lower()):
                bad.append(f"{name}: `{key}` names a whole element: its doc starts with {start!r}, no prefix")
    for key in params:  # any other `*_key` names a whole element or field: never a prefix
        if key.endswith("_key") and key not in ELEMENT_KEYS and key != "graph_key":
            if re.search(r"\b(prefix|stem)\b", docs.get(key, "").lower()):
                bad.append(f"{name}: `{key}` names a whole element or field, not a prefix (docs/keys.md)")
            if key == "image_key" and "image" not in docs.get(key, "").lower():
                bad.append(f"{name}: `image_key` names an image element")
    if "key" in params:  # labels: an .obs column or the use_rep of a tl.microenvironments run, in every reader
        doc = docs.get("key", "")
        if not (doc.startswith("Which labels") and "``.obs`` column" in doc and "tl.microenvironments` run" in doc):
            bad.append(f"{name}: `key` reads labels: an ``.obs`` column or the ``use_rep`` of a microenvironments run")
    if "tile_key" in params and params["tile_key"].default not in (None, Keys.tiling()["tile_table"]):
        bad.append(f"{name}: default `tile_key` must be the tile table of the default tiling")
    return bad


@pytest.mark.parametrize(("name", "func"), list(PUBLIC.items()))
def test_key_contract(name, func):
    assert not _key_contract_violations(name, func)


def test_key_contract_lists_are_current():
    for name in (*KEY_ADDED_STEM, *KEY_ADDED_KEY, *USE_REP_OBSM):
        _func(name)


def test_key_contract_check_catches_a_prefix_and_a_bare_use_rep():
    def writer(sdata, *, key_added: str = "sigmma", use_rep: str = "X_pca", tile_key: str = "t"):
        """Write.

        Parameters
        ----------
        sdata
            Data.
        key_added
            Prefix of every key written.
        use_rep
            A full ``.obsm`` key.
        tile_key
            Prefix of the tile table.
        """

    got = _key_contract_violations("pp.tile", writer)
    for what in ("`key_added` must be documented as the stem", "'The ``key_added`` of", "exactly in USE_REP_OBSM",
                 "default `use_rep`", "`tile_key` names a whole element", "default `tile_key`"):  # fmt: skip
        assert sum(what in v for v in got) == 1, (what, got)
    assert len(got) == 6, got
    new = _key_contract_violations("tl.new_writer", writer)
    assert "in neither KEY_ADDED_STEM nor KEY_ADDED_KEY" in new[0]
    assert len(new) == 6, new


def test_key_derivations_match_the_documented_defaults():
    from sigmma_sc._constants import Keys

    assert Keys.tiling("p", "he") == {
        "tile_table": "p_tiles", "shapes": "he_p_tiles", "cell_tile": "p_tile",
        "cell_blocks": {"micro": "p_micro_block", "meso": "p_meso_block"}, "cell_spatial": "p_spatial",
    }  # fmt: skip
    assert Keys.graph("p") == {
        "connectivities": "p_connectivities",
        "distances": "p_distances",
        "features": "p_features",
    }
    assert Keys.embedding("p", ("micro",)) == {"image": {"micro": "X_p_micro_image"}, "st": {"micro": "X_p_micro_st"},
                                               "cell": {"micro": "X_p_micro"}}  # fmt: skip
    assert Keys.microenvironments("p", ("meso",)) == {"meso": "p_meso"}
    assert Keys.tiling()["tile_table"] == Keys.TILE_TABLE
    old = {"CELL_SPATIAL", "EMB_CELL", "EMB_IMAGE", "EMB_ST", "MICROENV", "CELL_BLOCK", "TILE_SHAPES_SUFFIX",
           "tile_shapes", "block", "connectivities", "distances"}  # fmt: skip
    assert not old & set(vars(Keys)), "keys are spelled one way: through Keys.tiling / graph / embedding / ..."


def test_evaluate_and_compare_share_their_parameter_docs():
    shared = ("split", "fractions", "n_genes", "n_components", "n_boot", "ci", "seed", "folds", "tile_key")
    evaluate, compare = _param_docs(_func("metrics.evaluate")), _param_docs(_func("metrics.compare"))
    assert {p: evaluate[p] for p in shared} == {p: compare[p] for p in shared}


#: modules of pp/tl/pl/metrics that assign into an AnnData / SpatialData field without the write helper, and why
DIRECT_WRITES = {
    "metrics._folds": "fills a new AnnData it returns",
    "pp._tile": "the record of the tile table it builds (written with the helper)",
    "tl._shifts": "in-memory views of shifted grids, never written into sdata",
}


def test_writes_go_through_the_helper():
    """Every write into ``sdata`` goes through ``_utils._write`` (one log line per write, in the same words)."""
    fields = {"obs", "obsm", "obsp", "var", "varm", "varp", "layers", "uns", "images", "labels", "points", "shapes",
              "tables"}  # fmt: skip
    found = {}
    for f in SRC.rglob("*.py"):
        module = ".".join(f.relative_to(SRC).with_suffix("").parts)
        if module.split(".")[0] not in ("pp", "tl", "pl", "metrics"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr in fields:
                    found.setdefault(module, []).append(f"{node.lineno}: {ast.unparse(t)}")
    unexpected = {m: v for m, v in found.items() if m not in DIRECT_WRITES}
    assert not unexpected, f"write with sigmma_sc._utils._write.save_output / save_outputs / save_record: {unexpected}"


#: functions allowed over 100 code lines (issue 24: none; add one only with a reason)
OVER_100_LINES: set[str] = set()


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of a function that are code: no blank line, comment or docstring."""
    first = node.body[0]
    doc = range(0)
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        doc = range(first.lineno, first.end_lineno + 1)
    return sum(
        1
        for n in range(node.lineno, node.end_lineno + 1)
        if n not in doc and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#")
    )


def test_no_function_over_100_code_lines():
    long = {}
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        lines = text.splitlines()
        module = ".".join(f.relative_to(SRC).with_suffix("").parts)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(lines, node) > 100:
                long[f"{module}.{node.name}"] = _code_lines(lines, node)
    new = {k: v for k, v in long.items() if k not in OVER_100_LINES}
    assert not new, f"functions over 100 code lines (split them): {new}"


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
