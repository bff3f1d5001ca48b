"""Small helpers that write the training record into ``.uns`` (shared by single-section and cohort training)."""

from __future__ import annotations

from typing import Any


def history_columns(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch records as columns of floats (NaN where an epoch lacks a value), for ``.uns``."""
    keys = list(dict.fromkeys(k for h in history for k in h))
    return {k: [float(h[k]) if h.get(k) is not None else float("nan") for h in history] for k in keys}


def resolve_seed(seed: int | None) -> int:
    """``seed`` as an int; ``None`` (unseeded, as in scanpy) draws a fresh one from the OS, to be recorded."""
    if seed is not None:
        return int(seed)
    import logging

    import numpy as np

    drawn = int(np.random.default_rng().integers(2**31 - 1))
    logging.getLogger(__name__).info("Unseeded (`seed=None`): drew seed %d.", drawn)
    return drawn
