"""Sphinx configuration for sigmma_sc.

Builds offline by default: intersphinx inventories are fetched only when ``SIGMMA_DOCS_INTERSPHINX=1``
(or on Read the Docs), and references to third-party types that cannot resolve without them are listed
in ``nitpick_ignore_regex``, so ``sphinx-build -W -n`` passes with or without network. Notebooks are
committed with their outputs and never executed here (``nb_execution_mode = "off"``); the test suite
executes the quick-start (``tests/test_tutorials.py``).
"""

from __future__ import annotations

import os
from datetime import date
from importlib.metadata import version as _version

project = "sigmma_sc"
author = "sigmma_sc developers"
copyright = f"{date.today().year}, {author}"
release = _version("sigmma-sc")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinxcontrib.bibtex",
]

# -- sources -------------------------------------------------------------------------------------------
# .rst first: autosummary writes its stub pages with the first suffix, and they are reStructuredText
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_static/*.py", "tutorials/data", "tutorials/*.zarr"]
templates_path = ["_templates"]

# -- myst / notebooks ----------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are committed with outputs; tests/test_tutorials.py runs the quick-start
nb_merge_streams = True
nb_output_stderr = "show"

# -- autodoc -------------------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
autodoc_inherit_docstrings = False  # torch / PyG docstrings of overridden methods do not belong here
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# The package's "Returns" sections are prose (scanpy style: what is written where), not "name : type" entries,
# so render them as a plain section; "Shapes" documents tensor shapes of torch modules.
napoleon_custom_sections = [("Returns", "prose_returns"), "Shapes"]
typehints_defaults = "braces"
always_document_param_types = False
typehints_use_signature_return = False

# -- bibtex --------------------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# -- intersphinx (only with network) ------------------------------------------------------------------
_online = os.environ.get("SIGMMA_DOCS_INTERSPHINX", "") == "1" or os.environ.get("READTHEDOCS") == "True"
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "spatialdata_io": ("https://spatialdata.scverse.org/projects/io/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "torch_geometric": ("https://pytorch-geometric.readthedocs.io/en/latest/", None),
    }
    if _online
    else {}
)

# -- nitpicky: every reference must resolve, except third-party ones that need intersphinx -------------
nitpicky = True
_third_party = (
    "anndata",
    "ad",
    "dask",
    "geopandas",
    "gpd",
    "matplotlib",
    "mpl",
    "np",
    "numpy",
    "pandas",
    "pd",
    "pathlib",
    "scanpy",
    "sc",
    "scipy",
    "sparse",
    "spatialdata",
    "spatialdata_io",
    "sd",
    "squidpy",
    "timm",
    "torch",
    "torch_geometric",
    "xarray",
    "collections",
    "typing",
    "types",
    "os",
)
_bare = (  # unqualified names that appear in string annotations and docstrings
    "AnnData",
    "SpatialData",
    "DataTree",
    "DataArray",
    "DataFrame",
    "GeoDataFrame",
    "Series",
    "Categorical",
    "Index",
    "Tensor",
    "Module",
    "Axes",
    "Figure",
    "Path",
    "Mapping",
    "Sequence",
    "Iterable",
    "Iterator",
    "Callable",
    "Literal",
    "Any",
    "Final",
    "csr_matrix",
    "ndarray",
    "ArrayLike",
    "optional",
    "default",
    "device",
    "dtype",
    "nn.Module",
)
_builtins = (
    "bool",
    "bytes",
    "dict",
    "float",
    "int",
    "list",
    "object",
    "set",
    "str",
    "tuple",
    "type",
    "None",
    "Ellipsis",
    "ValueError",
    "KeyError",
    "FileExistsError",
    "FileNotFoundError",
)
nitpick_ignore = [
    # documented in the dataclass's fields but not (yet) in its numpydoc "Attributes" section
    ("py:attr", "ProbeResult.notes"),
]
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_third_party)})\..*"),
    (r"py:.*", rf"({'|'.join(_bare)}|{'|'.join(_builtins)})"),
]

# -- html ----------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "sigmma_sc"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": False}
html_show_sourcelink = False
