"""What does a split buffer cost and change? ``sg.pp.tile(split_buffer=1)`` on the demo, with a size-matched control.

Usage::

    python benchmarks/split_buffer.py --seeds 0 1 --steps 300

The demo section is tiled once (default split); ``sg.pp.tile(..., split_buffer=b, inplace=False)`` gives the
buffered split of the same tiles (validation and test tiles are the same; training tiles next to them become
``'buffer'``). Three arms train full SIGMMA on the same bundle and are scored on the same test tiles:

- ``none``: every training tile (regions touch: some test tiles' neighbours are training tiles);
- ``buffer``: without the buffer tiles (no test tile touches a training tile);
- ``random``: without as many training tiles drawn at random (seeded): the same training-set size as ``buffer``
  with neighbours kept, so ``buffer - random`` isolates the adjacency from the loss of training tiles.

Cross-modal retrieval R@10% (both directions, mean over scales of the cosine similarity) on test tiles, paired
bootstrap over test tiles for the differences. Results: ``benchmarks/results/split_buffer.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import common_args  # noqa: E402

logger = logging.getLogger("split_buffer")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--buffer", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=112)
    common_args(p, seeds=(0,), threads=1)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "bench_out" / "split_buffer")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "split_buffer.md")
    return p.parse_args(argv)


def prepare(args):
    import sigmma_sc as sg
    from sigmma_sc.model import TrainingBundle

    folder = args.cache_dir / f"demo_b{args.buffer}_{args.input_size}"
    if (folder / "bundle.pt").exists():
        return TrainingBundle.load(folder / "bundle.pt"), np.load(folder / "splits.npz")
    folder.mkdir(parents=True, exist_ok=True)
    sdata = sg.datasets.demo()
    sg.pp.tile(sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5)
    _, buffered, _ = sg.pp.tile(
        sdata, image_key="he", tile_size_um=128.0, pixel_size_um=0.5, split_buffer=args.buffer, inplace=False
    )
    sg.pp.cell_graph(sdata)
    sg.tl.featurize(sdata, input_size=args.input_size)
    bundle, _ = sg.data.build_bundle(sdata)
    tiles = sdata.tables["sigmma_tiles"]
    plain = tiles.obs["split"].astype(str).to_numpy()
    buf = buffered.obs["split"].astype(str).to_numpy()
    if (plain[plain != "train"] != buf[plain != "train"]).any():
        raise RuntimeError("The buffer changed held-out tiles; expected only training tiles to move.")
    np.savez(folder / "splits.npz", plain=plain, buffered=buf)
    bundle.save(folder / "bundle.pt")
    return bundle, np.load(folder / "splits.npz", allow_pickle=True)


def scores(model, bundle, test):
    st, _ = model.encode_st(bundle)
    img = model.encode_image(bundle)
    sims = []
    for s in model.config.scales:
        a = img[s].numpy()[test]
        b = st[s].numpy()[test]
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        sims.append(a @ b.T)
    sim = np.mean(sims, 0)
    k = max(1, int(np.floor(0.1 * sim.shape[0])))
    own = np.diag(sim)
    i2s = np.clip(k - (sim > own[:, None] + 1e-9).sum(1), 0, 1).astype(float)
    s2i = np.clip(k - (sim > own[None, :] + 1e-9).sum(0), 0, 1).astype(float)
    return i2s, s2i


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from sigmma_sc.model import SigmmaModel

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle, splits = prepare(args)
    plain, buffered = splits["plain"], splits["buffered"]
    code = {"train": 0, "val": 1, "test": 2, "buffer": 3}
    base = torch.as_tensor(np.array([code[s] for s in plain]), dtype=torch.int8)
    n_drop = int((buffered == "buffer").sum())
    rng = np.random.default_rng(0)
    random_drop = rng.choice(np.flatnonzero(plain == "train"), n_drop, replace=False)
    arms = {"none": base.clone(), "buffer": torch.as_tensor(np.array([code[s] for s in buffered]), dtype=torch.int8)}
    arms["random"] = base.clone()
    arms["random"][torch.as_tensor(random_drop)] = 3
    test = plain == "test"
    hits: dict[str, list] = {a: [] for a in arms}
    for seed in args.seeds:
        for arm, split in arms.items():
            bundle.split = split
            model = SigmmaModel.from_bundle(
                bundle, seed=seed, hidden=args.hidden, out_dim=args.hidden, steps=args.steps,
                batch_size=args.batch_size, patience=None,
            )  # fmt: skip
            model.fit(bundle, progress=False, seed=seed)
            i2s, s2i = scores(model, bundle, test)
            hits[arm].append((i2s, s2i))
            logger.info("%s seed %d: I->ST R@10%% %.3f, ST->I %.3f", arm, seed, i2s.mean(), s2i.mean())
    idx = np.random.default_rng(1).integers(0, int(test.sum()), (args.n_boot, int(test.sum())))

    def boot(arm, d):
        return np.mean([h[d][idx].mean(1) for h in hits[arm]], 0)

    table = {arm: {d: [float(h[i].mean()) for h in hits[arm]] for i, d in enumerate(("i2s", "s2i"))} for arm in arms}
    comps = {}
    for a, b in (("buffer", "none"), ("random", "none"), ("buffer", "random")):
        comps[f"{a} - {b}"] = {
            d: [float(np.mean(table[a][d]) - np.mean(table[b][d])),
                *np.percentile(boot(a, i) - boot(b, i), [2.5, 97.5]).tolist()]
            for i, d in enumerate(("i2s", "s2i"))
        }  # fmt: skip
    info = {
        "command": "python benchmarks/split_buffer.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {args.threads}",
        "runtime_s": time.perf_counter() - t0,
        "tiles": {k: int((plain == k).sum()) for k in ("train", "val", "test")} | {"buffer": n_drop},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"info": info, "table": table, "comparisons": comps}, indent=1))
    lines = [
        "# Split buffer on the demo",
        "",
        f"- Command: `{info['command']}`",
        f"- Date {info['date']}; {info['machine']}; runtime {info['runtime_s'] / 60:.1f} min",
        f"- Tiles: {info['tiles']} (the buffer and the random arm each drop {n_drop} training tiles)",
        "",
        "| arm | I→ST R@10% | ST→I R@10% |",
        "|---|---|---|",
    ]
    for arm, d in table.items():
        lines.append(f"| {arm} | {np.mean(d['i2s']):.3f} ({len(d['i2s'])} seeds) | {np.mean(d['s2i']):.3f} |")
    lines += ["", "| difference | I→ST [95% CI] | ST→I [95% CI] |", "|---|---|---|"]
    for k, d in comps.items():
        lines.append(
            f"| {k} | {d['i2s'][0]:+.3f} [{d['i2s'][1]:+.3f}, {d['i2s'][2]:+.3f}] | "
            f"{d['s2i'][0]:+.3f} [{d['s2i'][1]:+.3f}, {d['s2i'][2]:+.3f}] |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    logger.info("Wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    main()
