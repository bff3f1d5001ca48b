"""The demo's time and numbers are stated once: the docs quote DEMO_TIME and BENCHMARKS.md the demo's JSON summary."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from sigmma_sc._demo_report import DEMO_TIME

ROOT = Path(__file__).resolve().parents[1]


def _text(path: Path) -> str:
    return " ".join(path.read_text().split())  # line breaks do not matter


@pytest.mark.parametrize("doc", ["README.md", "docs/installation.md"])
def test_docs_state_the_demo_time_once_and_the_same(doc):
    text = _text(ROOT / doc)
    assert DEMO_TIME in text
    # any other "N minutes" next to the demo would be a second statement of its time
    minutes = r"(\d+(?:\.\d+)?) minutes"
    stated = re.search(minutes, DEMO_TIME).group(1)
    demo_times = set(re.findall(r"demo[^.]{0,200}?" + minutes, text, flags=re.IGNORECASE))
    assert demo_times <= {stated}, demo_times


def test_benchmarks_quote_the_demo_summary():
    """BENCHMARKS.md's demo block is what `python benchmarks/demo.py render` prints from the committed JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import demo as bench
    finally:
        sys.path.pop(0)
    if not bench.RESULT.exists():
        pytest.skip("no benchmarks/results/demo_summary.json")
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert bench.BEGIN in text, "BENCHMARKS.md lacks the demo block: paste `python benchmarks/demo.py render`"
    block = text[text.index(bench.BEGIN) : text.index(bench.END) + len(bench.END)]
    assert block == bench.render()
