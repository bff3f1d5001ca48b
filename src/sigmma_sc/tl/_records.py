"""Small helpers that write the training record into ``.uns`` (shared by single-section and cohort training)."""

from __future__ import annotations

from typing import Any


def history_columns(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch records as columns of floats (NaN where an epoch lacks a value), for ``.uns``."""
    keys = list(dict.fromkeys(k for h in history for k in h))
    return {k: [float(h[k]) if h.get(k) is not None else float("nan") for h in history] for k in keys}


def package_version() -> str:
    """The installed version of ``sigmma_sc``."""
    from .. import __version__

    return __version__
