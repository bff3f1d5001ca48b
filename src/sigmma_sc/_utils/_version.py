"""The installed package version, recorded with every model and training run."""

from __future__ import annotations


def package_version() -> str:
    """The installed version of ``sigmma_sc``."""
    from .. import __version__

    return __version__
