"""The conftest's skips follow real markers only, not folder or module names that pytest adds to the keywords."""

from __future__ import annotations

import conftest
import pytest


class _Item:
    """The part of a pytest item that ``pytest_collection_modifyitems`` uses."""

    def __init__(self, keywords: dict, markers: tuple[str, ...] = ()) -> None:
        self.keywords = keywords
        self.markers = list(markers)
        self.added: list = []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker) -> None:
        self.added.append(marker)


class _Config:
    def getoption(self, name):
        return True  # --run-network given: only the data skip is under test


def _skipped(item: _Item) -> bool:
    return any(getattr(m, "name", None) == "skip" for m in item.added)


def test_data_skip_needs_the_marker_not_the_folder_name(monkeypatch, tmp_path):
    in_data_folder = _Item({"data": 1, "test_candidates.py": 1, "test_brute_force": 1})  # tests/data/...
    marked = _Item({"data": 1, "test_real_section": 1}, markers=("data",))
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    conftest.pytest_collection_modifyitems(_Config(), [in_data_folder, marked])
    assert not _skipped(in_data_folder)
    assert _skipped(marked)

    present = _Item({"data": 1}, markers=("data",))
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)  # exists
    conftest.pytest_collection_modifyitems(_Config(), [present])
    assert not _skipped(present)


def test_data_marker_is_registered(pytestconfig):
    markers = "\n".join(pytestconfig.getini("markers"))
    assert "data:" in markers
    assert pytestconfig.option.strict_markers  # an unregistered or misspelt marker is an error, not a silent no-op


@pytest.mark.data
def test_a_data_marked_test_runs_only_with_the_data():
    assert conftest.SHARED_DATA.exists()
