"""Shared fixtures: a small synthetic SpatialData section with a registered image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _section import make_section

#: the real data of the ``data``-marked tests; ``SIGMMA_SHARED_DATA`` points elsewhere (e.g. a missing folder, to
#: check that every test needing it is marked and skips without it)
SHARED_DATA = Path(os.environ.get("SIGMMA_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def pytest_addoption(parser):
    parser.addoption("--run-network", action="store_true", default=False, help="run tests that need internet")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


_SKIPS = {  # registered marker (pyproject.toml, --strict-markers) -> (skip?, reason)
    "gpu": (lambda config: not _cuda(), "needs a CUDA device"),
    "network": (lambda config: not config.getoption("--run-network"), "needs --run-network"),
    "data": (lambda config: not SHARED_DATA.exists(), f"needs the real data in {SHARED_DATA}"),
}


def pytest_collection_modifyitems(config, items):
    """Skip the tests that carry a marker whose need is not met.

    Only real markers count: ``item.keywords`` also holds the names of folders and modules, so matching it
    skipped every test in ``tests/data/`` (which needs no data) wherever ``../shared/data`` was absent.
    """
    for marker, (should_skip, reason) in _SKIPS.items():
        if should_skip(config):
            skip = pytest.mark.skip(reason=reason)
            for item in items:
                if item.get_closest_marker(marker) is not None:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def _section_master():
    return make_section()


@pytest.fixture
def section(_section_master):
    """A fresh deep copy of the default synthetic section for each test."""
    import spatialdata as sd

    sdata = sd.deepcopy(_section_master)
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    return sdata


@pytest.fixture(autouse=True)
def _single_torch_thread(request):
    """nn/model tests use tiny tensors: one intra-op thread is faster and immune to CPU contention."""
    if not any(part in ("nn", "model") for part in request.path.parts[-3:-1]):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
