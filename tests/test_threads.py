"""torch's OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), set on `import sigmma_sc` in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sigmma_sc import _threads

TESTS = str(Path(__file__).resolve().parent)  # the toy bundle's module, for the fresh processes


def test_passive_policy_set_only_when_it_can_take_effect():
    env: dict = {}
    assert _threads.passive_openmp(env, modules={}) == {"policy": "PASSIVE", "source": "sigmma_sc"}
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "active"}  # the user's choice wins
    assert _threads.passive_openmp(env, modules={}) == {"policy": "ACTIVE", "source": "user"}
    assert env["OMP_WAIT_POLICY"] == "active"
    env = {}  # torch (libgomp) already loaded: setting it now would do nothing, so it is not claimed
    assert _threads.passive_openmp(env, modules={"torch": object()})["source"] == "torch imported first"
    assert "OMP_WAIT_POLICY" not in env


def _policy_in_fresh_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_import_sets_the_policy_before_torch_loads():
    code = "import os, sigmma_sc; from sigmma_sc._threads import STATE; print(os.environ.get('OMP_WAIT_POLICY'), STATE['source'])"
    assert _policy_in_fresh_python(code) == "PASSIVE sigmma_sc"
    code = "import os, torch, sigmma_sc; from sigmma_sc._threads import STATE; print(os.environ.get('OMP_WAIT_POLICY'), STATE['source'])"
    assert _policy_in_fresh_python(code) == "None torch imported first"


def test_warning_when_threads_may_spin_on_a_busy_machine(monkeypatch):
    monkeypatch.setitem(_threads.STATE, "source", "torch imported first")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    message = _threads.spinning_under_load(2, load=3.2, cpus=2)
    assert "load average 3.2 on 2 CPUs" in message
    assert "OMP_WAIT_POLICY=PASSIVE" in message
    assert _threads.spinning_under_load(2, load=0.4, cpus=2) is None  # quiet machine
    assert _threads.spinning_under_load(1, load=3.2, cpus=2) is None  # one thread has no partner to wait for
    assert _threads.spinning_under_load(2, load=3.2, cpus=16) is None  # enough free CPUs
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # set before torch by the user
    assert _threads.spinning_under_load(2, load=3.2, cpus=2) is None
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setitem(_threads.STATE, "source", "sigmma_sc")
    assert _threads.spinning_under_load(2, load=3.2, cpus=2) is None


@pytest.mark.slow  # two fresh processes that train; the spinning one crawls on a busy machine
def test_policy_does_not_change_the_trained_weights():
    """Sleeping or spinning threads split the work the same way: bit-identical weights for a seed."""
    code = (
        "{first}\nimport hashlib, torch\nfrom sigmma_sc.model import SigmmaModel\nimport sys; sys.path.insert(0, {tests!r}); from _toy import toy_bundle\n"
        "torch.set_num_threads(2)\n"
        "b = toy_bundle(n_tiles=20, n_features=20, image_dim=16, min_cells=30, max_cells=60, n_neighs=6, seed=1)\n"
        "m = SigmmaModel.from_bundle(b, hidden=32, out_dim=32, steps=3, warmup=0, patience=None, max_batch_fraction=1.0)\n"
        "m.fit(b, progress=False)\nh = hashlib.sha1()\n"
        "for k, v in sorted(m.state_dict().items()): h.update(v.contiguous().numpy().tobytes())\n"
        "import os; print(os.environ.get('OMP_WAIT_POLICY'), h.hexdigest())"
    )
    passive = _policy_in_fresh_python(code.format(first="import sigmma_sc", tests=TESTS))
    spin = _policy_in_fresh_python(code.format(first="import torch", tests=TESTS))
    assert passive.split()[0] == "PASSIVE"
    assert spin.split()[0] == "None"
    assert passive.split()[1] == spin.split()[1]
