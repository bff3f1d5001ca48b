"""Parameter docs shared by several functions, substituted into docstrings with :func:`doc_params`.

A docstring names a shared entry as ``{doc_inplace}`` on a line of its own, at the indentation of the
parameter names; :func:`doc_params` replaces it (only the names it is given, so other braces such as
``{scale}`` stay as they are).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import TypeVar

_F = TypeVar("_F", bound=Callable)

doc_table_key = """\
table_key
    Cell table (e.g. ``'table'`` of a Xenium run).\
"""

doc_tile_key = """\
tile_key
    Tile table, ``f'{key_added}_tiles'`` of :func:`sigmma_sc.pp.tile` (default ``'sigmma_tiles'``).\
"""

doc_graph_key = """\
graph_key
    The ``key_added`` of :func:`sigmma_sc.pp.cell_graph` whose graph and node features are read.\
"""

doc_use_rep = """\
use_rep
    The ``key_added`` of the :func:`sigmma_sc.tl.embed` run whose embeddings are read (default ``'sigmma'``,
    i.e. ``.obsm['X_sigmma_{scale}...']``); its keys are looked up in the table's ``.uns[use_rep]['embed']``.\
"""

doc_inplace = """\
inplace
    Write into ``sdata`` and return ``None``; otherwise return the results and leave ``sdata`` unchanged.\
"""

doc_seed = """\
seed
    Random seed; ``None``: unseeded (a fresh seed is drawn and recorded).\
"""

doc_device = """\
device
    Torch device, e.g. ``'cuda'`` or ``'cpu'`` (default: :attr:`sigmma_sc.settings.device`, else CUDA when
    available).\
"""


# metrics: parameters shared by sg.metrics.evaluate and sg.metrics.compare
doc_split = """\
split
    Tiles that are scored: ``'test'`` (report) or ``'val'`` (model selection).\
"""

doc_fractions = """\
fractions
    Fractions ``p`` of Recall@p%.\
"""

doc_n_genes = """\
n_genes
    Target genes of the probes.\
"""

doc_n_components = """\
n_components
    PCA components of the probes.\
"""

doc_n_boot = """\
n_boot
    Bootstrap resamples of the CIs (0: no CIs).\
"""

doc_ci = """\
ci
    Coverage of the CIs.\
"""

doc_boot_seed = """\
seed
    Seed of the resamples.\
"""

doc_folds = """\
folds
    Spatial k-fold probes: cut the section's tiles with cells into ``folds`` contiguous strips and let every
    tile be a probe's test tile once (each fold's probe fitted on the other folds, the next fold picking the
    penalty; :func:`sigmma_sc.metrics.spatial_folds`); the probe columns and their CIs are then over all
    ``n_probe_eval`` tiles. It applies to the probes only: the embeddings are not retrained, and retrieval
    stays on ``split``. Sound for embeddings not fitted on this section (the frozen backbone, a model
    trained on other sections); a SIGMMA model trained on this section saw its training tiles, whose k-fold
    probe scores are therefore not held-out (a warning says so). ``None``: the section's split.\
"""


def doc_params(**replacements: str) -> Callable[[_F], _F]:
    """Substitute ``{name}`` lines of a docstring by ``replacements[name]``, indented as the line."""

    def decorator(obj: _F) -> _F:
        doc = inspect.getdoc(obj)
        if not doc:
            raise ValueError(f"{obj.__qualname__} has no docstring to substitute into.")
        lines = []
        for line in doc.splitlines():
            name = line.strip()
            if name.startswith("{") and name.endswith("}") and name[1:-1] in replacements:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(textwrap.indent(replacements[name[1:-1]], indent))
            else:
                lines.append(line)
        missing = [n for n in replacements if not any(line.strip() == f"{{{n}}}" for line in doc.splitlines())]
        if missing:
            raise ValueError(f"{obj.__qualname__}: no placeholder line for {missing}.")
        obj.__doc__ = "\n".join(lines)
        return obj

    return decorator
