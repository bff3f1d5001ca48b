"""User preferences: verbosity, progress bars and the default device."""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass
class _Settings:
    """Global preferences of :mod:`sigmma_sc`.

    Attributes
    ----------
    progress_bar
        Show tqdm progress bars on long steps.
    device
        Default torch device for training and featurisation (``None``: CUDA when available, else CPU).
    """

    progress_bar: bool = True
    device: str | None = None

    @property
    def verbosity(self) -> int:
        """Logging level of the ``sigmma_sc`` logger."""
        return logging.getLogger("sigmma_sc").level

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logging.getLogger("sigmma_sc").setLevel(level)


settings = _Settings()
"""Global settings of :mod:`sigmma_sc`."""
