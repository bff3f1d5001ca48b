"""Bit-reproducible CPU arithmetic for a seed, whatever the number of threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device | str) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside, on the CPU only; the caller's setting restored after.

    With more than one intra-op thread, the scatter-adds of message passing and pooling sum in an order that
    depends on thread scheduling, so two runs with the same seed drift apart by float rounding, and training
    amplifies it (measured: 2 threads, the same seed, 24 steps: different weights; deterministic mode: the same
    weights as 1 thread). On CUDA the setting is left as the caller has it (it would need
    ``CUBLAS_WORKSPACE_CONFIG`` and slow scatter kernels down); set it yourself for bit-reproducible GPU runs.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(mode=True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode=enabled, warn_only=warn_only)
