"""Seed-0 training fingerprints: a hash of the trained weights, history and diagnostics per training path.

A refactor of the training code must not change what a seed trains (issue 24: "no behaviour change"). This script
trains tiny models on the CPU along every path of the loop (whole batch, GradCache micro-batches, loss selection
with StepLR, early stopping, no graph, a killed-and-resumed run, fine-tuning with and without the boundary cache,
``sg.tl.train_sigmma`` on a synthetic section and on a two-section cohort) and prints a 16-hex-digit SHA-256
prefix of each model's ``state_dict`` bytes, history (without wall times) and diagnostics. Run it before and after
a change on the same machine and torch version: every hash must stay the same. Usage::

    python benchmarks/train_fingerprint.py --out benchmarks/results/train_fingerprint.json   # record
    python benchmarks/train_fingerprint.py --check benchmarks/results/train_fingerprint.json # compare (exit 1)
    python benchmarks/train_fingerprint.py --fast ...                                        # toy bundles only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(model, history) -> str:
    """16 hex digits of the SHA-256 of the weights, the history (without wall times) and the diagnostics."""
    d = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        d.update(k.encode())
        d.update(v.detach().cpu().contiguous().numpy().tobytes())
    d.update(json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in history], sort_keys=True,
                        default=str).encode())  # fmt: skip
    d.update(json.dumps(model.diagnostics or {}, sort_keys=True, default=str).encode())
    return d.hexdigest()[:16]


def toy_runs() -> dict[str, str]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from _toy import toy_bundle

    from sigmma_sc.model import SigmmaModel
    from sigmma_sc.nn import build_backbone

    out = {}
    b = toy_bundle(n_tiles=24, n_features=8, image_dim=12, seed=0)
    small = {"hidden": 16, "out_dim": 16, "batch_size": 8, "dropout": 0.1}
    variants = {
        "default": {},
        "micro": {"micro_batch": 3},
        "loss_step": {"select_by": "loss", "schedule": "step", "step_size": 1},
        "patience": {"patience": 2, "steps": 40},
        "nograph": {"use_graph": False},
    }
    for name, kw in variants.items():
        m = SigmmaModel.from_bundle(b, **small, **kw)
        out[name] = fingerprint(m, m.fit(b, epochs=4, seed=0, progress=False, device="cpu"))
    with tempfile.TemporaryDirectory() as d:
        m = SigmmaModel.from_bundle(b, **small)
        m.fit(b, epochs=2, seed=0, progress=False, device="cpu", checkpoint_dir=d)
        m = SigmmaModel.from_bundle(b, **small)
        out["resume"] = fingerprint(m, m.fit(b, epochs=4, seed=0, progress=False, device="cpu", checkpoint_dir=d,
                                             resume=True))  # fmt: skip
    tiled = toy_bundle(n_tiles=12, n_features=6, image_dim=10, tile_size=16, seed=0)
    with torch.random.fork_rng(devices=[]):
        _, info = build_backbone("test_efficientnet", pretrained=False)
    info = dataclasses.replace(info, input_size=24).to_dict()
    for cache in ("off", "auto"):
        m = SigmmaModel.from_bundle(tiled, hidden=16, out_dim=16, batch_size=8, dropout=0.0,
                                    backbone="test_efficientnet", backbone_pretrained=False, finetune_blocks=1,
                                    backbone_info=info, backbone_lr=1e-3, finetune_cache=cache)  # fmt: skip
        out[f"finetune_{cache}"] = fingerprint(m, m.fit(tiled, epochs=2, seed=0, progress=False, device="cpu"))
    return out


def section_runs() -> dict[str, str]:
    import spatialdata as sd

    import sigmma_sc as sg

    sys.path.insert(0, str(ROOT / "tests"))
    from _section import make_section

    tiny = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64,
            "lr": 1e-3}  # fmt: skip
    sections = []
    for seed in (0, 1):
        s = make_section(n_cells=700, image_px=200, rotation_deg=8.0, seed=seed)
        sg.pp.tile(s, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
        sg.pp.cell_graph(s, n_comps=8)
        s.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
        sections.append(s)
    m = sg.tl.train_sigmma(sd.deepcopy(sections[0]), epochs=3, seed=0, **tiny)
    out = {"section": fingerprint(m, m.history)}
    m = sg.tl.train_sigmma({"a": sd.deepcopy(sections[0]), "b": sd.deepcopy(sections[1])}, epochs=2, seed=0, **tiny)
    out["cohort"] = fingerprint(m, m.history)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="toy bundles only (no SpatialData)")
    p.add_argument("--out", type=Path, help="write the fingerprints (JSON)")
    p.add_argument("--check", type=Path, help="compare with a JSON written by --out; exit 1 on any difference")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    hashes = toy_runs() | ({} if args.fast else section_runs())
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    print(json.dumps(hashes, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"hashes": hashes, "env": env}, indent=1) + "\n")
    if args.check:
        ref = json.loads(args.check.read_text())
        if ref["env"] != env:
            print(f"note: the reference was written with {ref['env']}, this run uses {env}")
        diff = {k: (ref["hashes"].get(k), v) for k, v in hashes.items() if ref["hashes"].get(k) != v}
        print("identical" if not diff else f"DIFFERENT: {diff}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
