"""The device a run trains on, and its numeric settings (bf16 autocast, TF32 matmuls)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .._settings import settings


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, else ``settings.device``, else CUDA when available, else CPU."""
    device = device or settings.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of fresh forward-pass contexts: bf16 autocast for ``precision="bf16"`` on CUDA, else no-op."""
    if precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:  # noqa: FBT001 - internal
    """Allow TensorFloat-32 matmuls and convolutions inside the block (restored after)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
