"""User preferences: verbosity, progress bars and the default device."""

from __future__ import annotations

import logging
import sys
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
        """Logging level of the ``sigmma_sc`` logger (``'INFO'`` shows each step's log; default: warnings only).

        Without a logging configuration of your own, messages go to stderr as ``LEVEL: message``; once the root
        logger has a handler (``logging.basicConfig``, Jupyter extensions, pytest), they go there instead, once.
        """
        return logging.getLogger("sigmma_sc").level

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logging.getLogger("sigmma_sc").setLevel(level)


settings = _Settings()
"""Global settings of :mod:`sigmma_sc`."""


class _Stderr(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (as replaced by Jupyter or a test), only while the root has no handler."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self.addFilter(lambda record: not logging.getLogger().handlers)  # root handlers print it: no duplicate

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """Warnings of ``sigmma_sc`` reach users by default (scanpy-like): a stderr handler on the package logger.

    Python alone prints only WARNING and above, bare, and nothing after ``settings.verbosity = 'INFO'``; this
    handler prints at the logger's level. It stays silent while the root logger has handlers (the records
    propagate there), so no message is printed twice.
    """
    logger = logging.getLogger("sigmma_sc")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())


_setup_logging()
