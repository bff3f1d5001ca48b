"""SIGMMA: multi-scale graph contrastive alignment of tissue images and spatial transcriptomics.

Submodules are imported lazily, so ``import sigmma_sc`` stays cheap and
:mod:`sigmma_sc.nn` / :mod:`sigmma_sc.model` work with only torch installed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._settings import settings
from ._threads import passive_openmp

passive_openmp()  # before torch loads libgomp: its threads sleep, not spin, between operations (see _threads)

try:
    __version__ = version("sigmma-sc")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0.0.0"

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "data", "model", "nn", "metrics", "train")

if TYPE_CHECKING:
    from . import data, datasets, io, metrics, model, nn, pl, pp, tl, train

__all__ = [*_SUBMODULES, "settings", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
