"""CPU threads that wait without spinning, so that training slows down in proportion when other processes run.

torch's CPU kernels run in OpenMP parallel regions; between regions libgomp's threads *busy-wait* (spin) by
default. When other processes keep the cores busy, a spinning thread burns the time slice its partner needed,
and every one of the thousands of small parallel regions of a GNN training step waits for the scheduler.
Measured (BENCHMARKS.md, "CPU threads under load"; a demo-sized training step, 2 cores busy with other jobs,
load average 11-16): torch's default 2 spinning threads took 14.3 s per step, the same 2 threads with
``OMP_WAIT_POLICY=PASSIVE`` (they sleep instead of spinning) 1.37 s and 1 thread 1.56 s. The wait policy does
not change how work is split between threads, so the weights stay bit-identical for a seed (measured); the
thread count would change them.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is imported, so :mod:`sigmma_sc` sets it on import when
torch has not been imported yet and the user has not chosen a policy. This module imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

#: How the OpenMP wait policy of torch's threads was decided at ``import sigmma_sc`` (see :func:`passive_openmp`).
STATE = {"policy": None, "source": None}


def passive_openmp(environ: dict | None = None, modules: dict | None = None) -> dict:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or torch (libgomp) is already loaded.

    Returns (and records in :data:`STATE`) ``{"policy": ..., "source": ...}`` with ``source`` one of
    ``"sigmma_sc"`` (set here), ``"user"`` (the environment had a policy) or ``"torch imported first"``
    (too late: the policy is whatever torch started with, libgomp's default of spinning unless set).
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get("OMP_WAIT_POLICY"):
        state = {"policy": environ["OMP_WAIT_POLICY"].upper(), "source": "user"}
    elif "torch" in modules:
        state = {"policy": None, "source": "torch imported first"}
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        state = {"policy": "PASSIVE", "source": "sigmma_sc"}
    STATE.update(state)
    return state


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def spinning_under_load(threads: int, *, load: float | None = None, cpus: int | None = None) -> str | None:
    """A warning when torch's threads may spin while other processes keep the CPUs busy, else ``None``.

    Only when the wait policy could not be set (torch was imported before sigmma_sc without
    ``OMP_WAIT_POLICY``), more than one thread runs, and the 1-minute load average is above the CPUs
    available minus the threads this process would use.
    """
    if STATE.get("source") != "torch imported first" or os.environ.get("OMP_WAIT_POLICY") or threads <= 1:
        return None
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
            return None
    if load <= max(cpus - threads, 0) + 0.5:
        return None
    return (
        f"Other processes keep the CPUs busy (load average {load:.1f} on {cpus} CPUs) and torch's {threads} threads "
        "busy-wait between operations (torch was imported before sigmma_sc, so OMP_WAIT_POLICY could not be set): "
        "CPU training can then take ten times as long as on a quiet machine. Import sigmma_sc before torch, or set "
        "OMP_WAIT_POLICY=PASSIVE before Python starts (same results); torch.set_num_threads(1) also helps but "
        "changes the float rounding of the results."
    )
