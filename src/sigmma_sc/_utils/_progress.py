"""The one progress-bar wrapper; :attr:`sigmma_sc.settings.progress_bar` switches it off."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def track(iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: int | None = None, **kwargs: Any):
    """Wrap ``iterable`` in a tqdm progress bar unless progress bars are disabled.

    Uses ``tqdm.auto`` so that Jupyter gets a widget and scripts a text bar.
    """
    from tqdm.auto import tqdm

    from sigmma_sc._settings import settings

    return tqdm(iterable, desc=desc, total=total, disable=not settings.progress_bar, leave=False, **kwargs)
