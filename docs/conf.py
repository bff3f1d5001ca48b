"""Sphinx configuration for sigmma_sc."""

from importlib.metadata import version as _version

project = "sigmma_sc"
author = "sigmma_sc developers"
release = _version("sigmma-sc")
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
nb_execution_mode = "off"
html_theme = "sphinx_book_theme"
intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "python": ("https://docs.python.org/3", None),
}
exclude_patterns = ["_build"]
