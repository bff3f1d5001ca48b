"""The ``sigmma`` command line: the SIGMMA pipeline for scripts and GPU jobs (see :data:`DESCRIPTION`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ._demo_report import DEMO_TIME

logger = logging.getLogger("sigmma_sc")

#: what ``sigmma --help`` prints (plain text: argparse shows it as is)
DESCRIPTION = """\
The SIGMMA pipeline for scripts and GPU jobs.

  sigmma demo --out demo.zarr                  everything on the embedded synthetic Xenium section
  sigmma run --xenium DIR --out OUT.zarr       tile, graph, train, embed and cluster a Xenium run (and its H&E)
  sigmma predict --model M --slide S --out O   tile expression of a new image-only slide
  sigmma evaluate OUT.zarr                     score a written run on its held-out test tiles
  sigmma bundle / sigmma train-bundle          preprocess here, train on a GPU machine with only torch

Errors are one line naming the fix; --debug shows the traceback."""

#: errors of bad input: printed as one line (the library's messages name the fix), not as a traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the text already gives it, or the option is required)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Parsers (and subcommand parsers) that show every option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _positive(kind: type):
    """An argparse type: a number > 0 (checked while parsing, before any reading)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


_pos_int, _pos_float = _positive(int), _positive(float)

#: optimiser steps of ``sigmma demo`` (fits the 5-minute CPU budget; early stopping usually ends sooner)
DEMO_STEPS = 600
#: tile side of ``sigmma demo``: 96 µm gives the demo section 23 test tiles, so that R@5/10/15% differ (K = 1, 2, 3)
DEMO_TILE_UM = 96.0


def _budget(args: argparse.Namespace) -> dict:
    """The training-budget arguments given on the command line (others come from the preset)."""
    out = {"preset": args.preset}
    out |= {k: getattr(args, k) for k in ("steps", "epochs", "batch_size") if getattr(args, k) is not None}
    return out


def _common_training(p: argparse.ArgumentParser, steps: int | None = None) -> None:
    p.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="training settings: default (step budget, warm-up, early stopping) or paper (Table 3: 100 epochs of "
        "1280-tile batches at lr 1e-4) (default: default)",
    )
    p.add_argument(
        "--steps",
        type=_pos_int,
        default=steps,
        help=f"budget of optimiser steps (default: {steps or 'the preset, 1000'}; early stopping may end sooner)",
    )
    p.add_argument(
        "--epochs",
        type=_pos_int,
        default=None,
        help="budget of epochs (default: none with the default preset, 100 paper)",
    )
    p.add_argument(
        "--batch-size",
        type=_pos_int,
        default=None,
        help="tiles per contrastive batch (default: the preset's, 256 capped at a quarter of the training tiles; "
        "paper 1280)",
    )
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="image backbone: efficientnet_lite0 (offline), uni, or a timm name (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and sampling")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sigmma", description=DESCRIPTION)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for add in (_demo_parser, _run_parser, _evaluate_parser, _predict_parser, _bundle_parser, _train_parser):
        add(sub)
    return parser


def _demo_parser(sub) -> None:
    """``sigmma demo``: the whole pipeline on the embedded synthetic section."""
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded synthetic Xenium section",
        description="Write the embedded synthetic Xenium section (15,000 cells, an H&E registered by an affine; once, "
        "then cached), tile it at 96 µm, build the cell graphs, train SIGMMA with CPU-sized settings, embed every "
        "tile and cell, cluster microenvironments, write --out and end with the held-out test tiles' retrieval "
        "score against chance (and a JSON summary next to --out). It takes " + DEMO_TIME + " (BENCHMARKS.md).",
    )
    demo.add_argument("--out", type=Path, default=Path("sigmma_demo.zarr"), help="output SpatialData zarr")
    demo.add_argument(
        "--n-cells", type=_pos_int, default=None, help="cells of the synthetic section (default: the demo's)"
    )
    demo.add_argument(
        "--image", choices=("he", "morphology_focus"), default="he", help="image to align with (default: he)"
    )
    demo.add_argument(
        "--input-size",
        type=_pos_int,
        default=112,
        help="crop side for the backbone (default: 112, fast on a CPU; 224 is native)",
    )
    demo.add_argument(
        "--hidden",
        type=_pos_int,
        default=128,
        help="GNN and embedding width (default: 128 for a CPU demo; the paper uses 512)",
    )
    _common_training(demo, steps=DEMO_STEPS)


def _run_parser(sub) -> None:
    """``sigmma run``: tile, graph, train, embed and cluster Xenium run(s)."""
    run = sub.add_parser(
        "run",
        help="tile, graph, train, embed and cluster a Xenium run",
        description="Read a Xenium output folder (and its registered H&E: found in the folder, or --he IMAGE "
        "--alignment CSV; without one the DAPI morphology image), cut it into tiles of --tile-size-um read at "
        "--pixel-size-um, build each tile's cell graph, train SIGMMA (GPU when available), embed every tile and "
        "cell, cluster microenvironments and write one SpatialData zarr (--out) for napari-spatialdata. Several "
        "--xenium folders train one model over the cohort. Score the result with `sigmma evaluate OUT.zarr`.",
    )
    run.add_argument(
        "--xenium",
        type=Path,
        nargs="+",
        required=True,
        help="Xenium output folder; several: one model over the cohort, each section written to OUT/<folder>.zarr",
    )
    run.add_argument(
        "--he",
        default=None,
        help="H&E image (OME-TIFF) registered to the run (default: the folder's *he_image.ome.tif with its "
        "*he_imagealignment.csv, if any); 'none' to align the DAPI morphology image even when an H&E exists. "
        "Without an H&E the DAPI morphology image is used.",
    )
    run.add_argument(
        "--alignment",
        type=Path,
        default=None,
        help="H&E alignment CSV: the 3x3 H&E pixel -> Xenium pixel affine of Xenium Explorer (default: the one "
        "found next to the H&E)",
    )
    run.add_argument("--out", type=Path, required=True, help="output SpatialData zarr (several --xenium: a folder)")
    run.add_argument(
        "--image",
        default=None,
        help="image element to align with, e.g. he or morphology_focus (default: he when an H&E is read, else "
        "morphology_focus)",
    )
    run.add_argument("--tile-size-um", type=_pos_float, default=128.0, help="tile side in µm")
    run.add_argument("--pixel-size-um", type=_pos_float, default=0.5, help="pixel size tiles are read at, in µm")
    run.add_argument(
        "--cells-outside",
        choices=("raise", "drop"),
        default="raise",
        help="cells outside the image: stop with an error (raise) or leave them untiled (drop)",
    )
    run.add_argument(
        "--model-out", type=Path, default=None, help="also save the trained model here (default: not saved)"
    )
    run.add_argument(
        "--input-size", type=_pos_int, default=None, help="crop side for the backbone (default: the backbone's)"
    )
    run.add_argument(
        "--hidden", type=_pos_int, default=None, help="GNN and embedding width (default: the model's, 512)"
    )
    run.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="write a checkpoint (last.pt) here after every epoch, for --resume (default: no checkpoints)",
    )
    run.add_argument("--resume", action="store_true", help="continue a killed run from --checkpoint-dir (default: off)")
    _common_training(run)


def _evaluate_parser(sub) -> None:
    """``sigmma evaluate``: retrieval and expression probes of a written run."""
    ev = sub.add_parser(
        "evaluate",
        help="score a written run: image<->ST retrieval and expression probes on its held-out tiles",
        description="Cross-modal retrieval (Recall@5/10/15%%) and linear probes of tile expression (paper and "
        "HEST protocols) of the SIGMMA image embeddings of a zarr written by `sigmma run` or `sigmma demo`. "
        "Probes are fitted on the training tiles only; the test tiles are only scored.",
    )
    ev.add_argument("zarr", type=Path, help="SpatialData zarr written by `sigmma run` / `sigmma demo`")
    ev.add_argument("--split", choices=("test", "val"), default="test", help="tiles scored")
    ev.add_argument(
        "--protocols", nargs="+", choices=("paper", "hest"), default=["paper", "hest"], help="probe protocols"
    )
    ev.add_argument("--n-genes", type=_pos_int, default=50, help="target genes of the probes")
    ev.add_argument(
        "--backbone",
        action="store_true",
        help="also score the frozen backbone's features, and SIGMMA minus the backbone with a paired CI",
    )
    ev.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples of the 95%% CIs (0: none; default: %(default)s)"
    )
    ev.add_argument("--csv", type=Path, default=None, help="also write the scores to this CSV file (default: none)")


def _bundle_parser(sub) -> None:
    """``sigmma bundle``: featurize zarr(s) and save training bundles."""
    bundle = sub.add_parser(
        "bundle",
        help="featurize processed zarr(s) and save training bundles (tensors)",
        description="Encode the tiles of a tiled and graphed zarr (sigmma run / sg.pp.tile + sg.pp.cell_graph) with "
        "the frozen backbone and save everything training needs as plain tensors, so that `sigmma train-bundle` "
        "can train on a GPU machine that has only torch and torch-geometric.",
    )
    bundle.add_argument("zarr", type=Path, nargs="+", help="tiled and graphed zarr; several: a cohort")
    bundle.add_argument(
        "--out", type=Path, required=True, help="bundle file; for several zarrs a folder of <zarr name>.pt files"
    )
    bundle.add_argument("--backbone", default="efficientnet_lite0", help="image backbone (as for sigmma run)")
    bundle.add_argument(
        "--input-size", type=_pos_int, default=None, help="crop side for the backbone (default: its own)"
    )
    bundle.add_argument("--split", choices=("spatial", "section"), default="spatial", help="cohort split")
    bundle.add_argument(
        "--val-sections", nargs="*", default=(), help="with --split section: validation zarr names (default: none)"
    )
    bundle.add_argument(
        "--test-sections", nargs="*", default=(), help="with --split section: test zarr names (default: none)"
    )


def _train_parser(sub) -> None:
    """``sigmma train-bundle``: train on saved bundles."""
    train = sub.add_parser(
        "train-bundle",
        help="train on saved bundle(s) (needs only torch; runs under `torchrun --nproc-per-node N`)",
        description="Train SIGMMA on training bundles saved by `sigmma bundle` and save the model (--out); needs only "
        "torch and torch-geometric. Under torchrun (or srun) one process per GPU trains one model with the negatives "
        "of the whole batch.",
    )
    train.add_argument("bundle", type=Path, nargs="+", help="bundle file(s); several are joined (one per section)")
    train.add_argument("--out", type=Path, required=True, help="where to save the model")
    train.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint folder (default: none)")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    _common_training(train)


def _training(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``sg.tl.train_sigmma`` from the command line."""
    out = {"backbone": args.backbone, **_budget(args), "device": args.device, "seed": args.seed}
    out["input_size"] = getattr(args, "input_size", None)
    if getattr(args, "hidden", None):
        out |= {"hidden": args.hidden, "out_dim": args.hidden}
    if getattr(args, "checkpoint_dir", None) is not None:
        out |= {"checkpoint_dir": args.checkpoint_dir, "resume": args.resume}
    return out


def _image_key(sdata, args: argparse.Namespace) -> str:
    """``--image``, or the H&E when one was read, else the DAPI morphology image."""
    image = getattr(args, "image", None)
    if image is None:
        return "he" if "he" in sdata.images else "morphology_focus"
    if image not in sdata.images:
        raise SystemExit(f"--image {image}: no such image; this run has {sorted(sdata.images)}.")
    return image


def _pipeline(
    sdata,
    args,
    image_key: str,
    out: Path,
    tile_size_um: float = 128.0,
    pixel_size_um: float = 0.5,
    timings: dict | None = None,
):
    import sigmma_sc as sg

    timings = {} if timings is None else timings  # seconds per step, for the demo's summary
    t0 = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - tick
        tick = time.perf_counter()

    sg.pp.tile(sdata, image_key=image_key, tile_size_um=tile_size_um, pixel_size_um=pixel_size_um,
               cells_outside=getattr(args, "cells_outside", "raise"))  # fmt: skip
    sg.pp.cell_graph(sdata)
    lap("tile + graph")
    training = _training(args)
    sg.tl.featurize(sdata, backbone=training["backbone"], input_size=training["input_size"], device=args.device)
    lap("featurize")
    model = sg.tl.train_sigmma(sdata, **training)  # reuses the features just cached
    lap("train")
    sg.tl.embed(sdata, model)
    lap("embed")
    sg.tl.microenvironments(sdata)
    lap("microenvironments")
    sdata.write(out)  # refuses an existing path (main checks it before any work)
    lap("write")
    logger.info(
        "Wrote %s in %.0f s; open it with napari-spatialdata or spatialdata.read_zarr.", out, time.perf_counter() - t0
    )
    return model


def _demo(args: argparse.Namespace) -> None:
    """``sigmma demo``: the pipeline on the embedded section, then its held-out score against chance and a summary."""
    import sigmma_sc as sg
    from sigmma_sc._demo_report import demo_summary, format_summary, summary_path, write_summary

    t0 = time.perf_counter()
    kwargs = {} if args.n_cells is None else {"n_cells": args.n_cells}
    sdata = sg.datasets.demo(**kwargs)
    timings = {"read the demo section": time.perf_counter() - t0}
    model = _pipeline(sdata, args, args.image, args.out, tile_size_um=DEMO_TILE_UM, timings=timings)
    timings["total"] = time.perf_counter() - t0
    settings = {
        "n_cells": args.n_cells or sg.datasets._demo.DEMO_N_CELLS, "image": args.image, "tile_size_um": DEMO_TILE_UM,
        "input_size": args.input_size, "hidden": args.hidden, **_budget(args), "backbone": args.backbone,
        "seed": args.seed, "device": str(model.device),
    }  # fmt: skip
    defaults = {k: a.default for a in _parser()._subparsers._group_actions[0].choices["demo"]._actions
                for k in [a.dest] if k not in ("help", "out")}  # fmt: skip
    settings["demo_defaults"] = all(getattr(args, k) == v for k, v in defaults.items())  # DEMO_TIME applies
    summary = demo_summary(sdata, model, settings=settings, timings=timings)
    path = summary_path(args.out)
    write_summary(summary, path)
    print(format_summary(summary))
    print(f"Wrote {args.out} and {path.name}; `sigmma evaluate {args.out}` adds the expression probes.")


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict tile expression (and the closest training tiles) of a new image-only whole-slide image",
        description="Tile a whole-slide image (SVS, NDPI, OME-TIFF, ...) over its tissue at the model's tiling, embed "
        "its image side, predict each tile's expression with the probe saved in the model (sg.tl.fit_probe) and "
        "optionally retrieve the closest training tiles (sg.tl.attach_reference); write a zarr for "
        "napari-spatialdata.",
    )
    p.add_argument("--model", type=Path, required=True, help="model saved by SigmmaModel.save / sigmma run --model-out")
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image file")
    p.add_argument("--out", type=Path, required=True, help="output SpatialData zarr (tiles, tile table, overview)")
    p.add_argument("--retrieve", type=int, default=0, metavar="N", help="closest training tiles per tile")
    p.add_argument(
        "--pixel-size-um",
        type=_pos_float,
        default=None,
        help="slide pixel size if the file records none (default: the file's)",
    )
    p.add_argument("--probe", default="expression", help="name of the model's probe")
    p.add_argument("--no-probe", action="store_true", help="no expression prediction (retrieval only)")
    p.add_argument("--stain-normalize", action="store_true", help="Macenko-normalise to the training stains first")
    p.add_argument("--min-tissue-fraction", type=float, default=0.05, help="tiles with less tissue are left out")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")


def _predict(args) -> None:
    import sigmma_sc as sg

    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out or remove it.")
    for what, path in (("--model", args.model), ("--slide", args.slide)):
        if not path.exists():
            raise SystemExit(f"{what}: no such file: {path}")
    try:
        sdata = sg.tl.predict_slide(
            args.slide,
            args.model,
            pixel_size_um=args.pixel_size_um,
            probe=None if args.no_probe else args.probe,
            retrieve=args.retrieve,
            stain_normalize=args.stain_normalize,
            min_tissue_fraction=args.min_tissue_fraction,
            device=args.device,
            out=args.out,
        )
    except ValueError as e:
        raise SystemExit(f"sigmma predict: {e}") from e
    from sigmma_sc._constants import Keys

    tiles = sdata.tables[Keys.TILE_TABLE]
    logger.info("Wrote %s: %d tissue tiles, %d predicted genes.", args.out, tiles.n_obs, tiles.n_vars)


def _run_cohort(args) -> None:
    """``sigmma run`` on several Xenium folders: one model over the cohort, each section written to OUT/<name>.zarr."""
    import sigmma_sc as sg

    if args.he is not None or args.alignment is not None:
        raise SystemExit("With several --xenium folders, each folder's own H&E (or its DAPI) is used; drop --he.")
    names = [p.name for p in args.xenium]
    if len(set(names)) < len(names):
        raise SystemExit(f"The Xenium folder names must be unique (they name the sections): {names}.")
    missing = [str(p) for p in args.xenium if not p.is_dir()]
    if missing:
        raise SystemExit(f"No such Xenium folder(s): {missing}.")
    t0 = time.perf_counter()
    sections = {}
    for name, folder in zip(names, args.xenium, strict=True):
        try:
            sdata = sg.io.xenium(folder, he_image="auto")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"{folder}: {e}") from e
        sg.pp.tile(sdata, image_key=_image_key(sdata, args), tile_size_um=args.tile_size_um,
                   pixel_size_um=args.pixel_size_um, cells_outside=args.cells_outside)  # fmt: skip
        sg.pp.cell_graph(sdata)
        sections[name] = sdata
    model = sg.tl.train_sigmma(sections, **_training(args))
    args.out.mkdir(parents=True)
    for name, sdata in sections.items():
        sg.tl.embed(sdata, model)
        sg.tl.microenvironments(sdata)
        sdata.write(args.out / f"{name}.zarr")
    if args.model_out:
        model.save(args.model_out)
    logger.info("Wrote %d sections to %s in %.0f s.", len(sections), args.out, time.perf_counter() - t0)


def _evaluate(args) -> None:
    import warnings

    import pandas as pd
    import spatialdata as sd

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.metrics._evaluate import default_embeddings

    if not args.zarr.exists():
        raise SystemExit(f"No such zarr: {args.zarr}")
    if not (args.zarr / "zarr.json").exists() and not (args.zarr / ".zgroup").exists():
        raise SystemExit(
            f"{args.zarr} is not a SpatialData zarr; pass the zarr written by `sigmma run` or `sigmma demo`."
        )
    with warnings.catch_warnings():  # reading only the tables: spatialdata warns that their elements are absent
        warnings.simplefilter("ignore", UserWarning)
        sdata = sd.read_zarr(args.zarr, selection=("tables",))
    if Keys.TILE_TABLE not in sdata.tables:
        raise SystemExit(f"{args.zarr} has no tile table {Keys.TILE_TABLE!r}; write it with `sigmma run` first.")
    tiles = sdata.tables[Keys.TILE_TABLE]
    try:
        embeddings = default_embeddings(tiles)
    except KeyError as e:
        raise SystemExit(f"{args.zarr}: {e.args[0]}") from e
    if args.backbone:
        backbone = [Keys.BACKBONE.format(scale=s) for s in SCALES]
        if not all(k in tiles.obsm for k in backbone):
            raise SystemExit(f"--backbone: {args.zarr} holds no frozen-backbone features ({backbone}).")
        if not any(k.startswith("backbone") for k in embeddings):  # not already the default rows
            embeddings |= {"backbone_macro": backbone[-1:], "backbone_concat": backbone}
    scores = sg.metrics.evaluate(tiles, embeddings=embeddings, protocols=args.protocols, split=args.split,
                                 n_genes=args.n_genes, n_boot=args.n_boot)  # fmt: skip
    cols = [c for c in scores.columns if "R@" in c and not c.endswith(("_ci_low", "_ci_high"))] + [
        f"{p}_{k}" for p in args.protocols for k in ("pcc", "mse", "gene_pcc")
    ]

    def cell(row, col) -> str:  # "0.417 [0.35, 0.48]": the score and its 95% CI over the scored tiles
        if pd.isna(row[col]):
            return "-"
        lo, hi = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
        return f"{row[col]:.3f}" + ("" if lo is None or pd.isna(lo) else f" [{lo:.3f}, {hi:.3f}]")

    table = pd.DataFrame({name: {c: cell(row, c) for c in cols} for name, row in scores.iterrows()})
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        ci = f", 95% CI over {args.n_boot} bootstrap resamples of the tiles" if args.n_boot else ""
        print(f"Scores on {int(scores['n_eval'].iloc[0])} {args.split} tiles of {args.zarr}{ci}:")
        print(table.to_string())
    print(
        "R@p%: fraction of tiles whose partner is among the top floor(p N) hits (chance = floor(p N) / N). "
        "pcc / mse: tile-level, across genes (paper eq. 1-2); gene_pcc: gene-wise, across tiles (HEST's metric)."
    )
    sigmma_rows = [n for n in embeddings if not n.startswith("backbone")]
    if args.backbone and sigmma_rows and args.n_boot:  # SIGMMA against the frozen backbone, paired on the same tiles
        row = "all" if "all" in sigmma_rows else sigmma_rows[-1]
        base = "backbone_concat" if len(embeddings[row]) > 1 else "backbone_macro"
        diff = sg.metrics.compare(tiles, a=embeddings[row], b=embeddings[base], protocols=args.protocols,
                                  split=args.split, n_genes=args.n_genes, n_boot=args.n_boot)  # fmt: skip
        print(f"\nSIGMMA {row!r} minus the frozen backbone {base!r} (paired bootstrap over the same tiles):")
        for r in diff.itertuples():
            if r.metric.endswith(("_pcc", "_mse", "_gene_pcc")):
                print(f"  {r.metric:>16}: {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  p={r.p:.3f}")
    if args.csv is not None:
        scores.to_csv(args.csv)
        logger.info("Wrote %s.", args.csv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sigmma`` console script.

    Bad input ends with a one-line message naming the fix (``SystemExit``) instead of a traceback; ``--debug``
    shows the traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)  # every check that needs no reading, before any reading
    import warnings

    import sigmma_sc as sg

    warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)  # noise on every write
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    sg.settings.progress_bar = not args.quiet
    try:
        return _main(args)
    except SystemExit as e:  # every subcommand's one-line errors start with "sigmma <command>:"
        if isinstance(e.code, str) and not e.code.startswith("sigmma "):
            raise SystemExit(f"sigmma {args.command}: {e.code}") from e
        raise
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise SystemExit(f"sigmma {args.command}: {' '.join(str(message).split())}") from e


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad combinations and missing paths (as argparse does: usage and one line) before any work."""
    if args.command in ("demo", "run") and args.out.exists():
        parser.error(f"--out {args.out} exists; choose another --out or remove it.")
    if args.command == "run":
        missing = [str(p) for p in args.xenium if not p.is_dir()]
        if missing:
            parser.error(f"--xenium: no such folder: {', '.join(missing)}.")
        if args.resume and args.checkpoint_dir is None:
            parser.error("--resume needs --checkpoint-dir: the folder of the run to continue.")
        if len(args.xenium) > 1:  # each folder's own H&E (_run_cohort refuses --he)
            return
        if args.alignment is not None and (args.he is None or str(args.he).lower() == "none"):
            parser.error("--alignment needs --he: name the H&E image the alignment belongs to.")
        he = args.he if args.he is None or str(args.he).lower() in ("none", "auto") else Path(args.he)
        if isinstance(he, Path) and not he.exists() and not (args.xenium[0] / he).exists():
            parser.error(f"--he: no such file: {he} (nor in {args.xenium[0]}); give the H&E OME-TIFF, or --he none.")
        if (
            args.alignment is not None
            and not args.alignment.exists()
            and not (args.xenium[0] / args.alignment).exists()
        ):
            parser.error(f"--alignment: no such file: {args.alignment}.")


def _main(args: argparse.Namespace) -> int:
    import sigmma_sc as sg

    if args.command == "demo":
        _demo(args)
    elif args.command == "run" and len(args.xenium) > 1:
        _run_cohort(args)
    elif args.command == "run":
        args.xenium = args.xenium[0]
        no_he = args.he is not None and str(args.he).lower() == "none"
        try:
            sdata = sg.io.xenium(
                args.xenium, he_image=None if no_he else (args.he or "auto"), he_alignment=args.alignment
            )
        except FileNotFoundError as e:
            if args.he is not None or not any(args.xenium.glob("*he_image.ome.tif")):  # not about the H&E
                raise
            raise SystemExit(
                f"sigmma run: {e} With the command line: pass --he IMAGE --alignment CSV, or --he none."
            ) from e
        model = _pipeline(sdata, args, _image_key(sdata, args), args.out, args.tile_size_um, args.pixel_size_um)
        if args.model_out:
            model.save(args.model_out)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "bundle" and len(args.zarr) > 1:
        import spatialdata as sd

        from sigmma_sc.tl._cohort import save_cohort_bundles
        from sigmma_sc.train._distributed import init_from_env

        ctx, device = init_from_env(None)  # under torchrun: the sections are shared out over the ranks
        names = [p.stem for p in args.zarr]
        if len(set(names)) < len(names):
            raise SystemExit(f"The zarr names must be unique (they name the sections): {names}.")
        sections = {n: sd.read_zarr(p) for n, p in zip(names, args.zarr, strict=True)}
        save_cohort_bundles(sections, args.out, backbone=args.backbone, input_size=args.input_size, split=args.split,
                            val_sections=args.val_sections, test_sections=args.test_sections,
                            device=None if device is None else str(device),
                            shard=None if ctx is None else (ctx.rank, ctx.world_size))  # fmt: skip
        if ctx is not None:  # no barrier: ranks write only their own sections' files
            import torch.distributed as dist

            dist.destroy_process_group()
    elif args.command == "bundle":
        import spatialdata as sd

        sdata = sd.read_zarr(args.zarr[0])
        sg.tl.featurize(sdata, backbone=args.backbone, input_size=args.input_size)
        bundle, _ = sg.data.build_bundle(sdata)
        bundle.save(args.out)
        logger.info("Saved %r to %s.", bundle, args.out)
    elif args.command == "train-bundle":
        from sigmma_sc.model import SigmmaModel, TrainingBundle
        from sigmma_sc.train._distributed import init_from_env

        ctx, device = init_from_env(args.device)  # under torchrun / srun: one process per device
        if ctx is not None and not ctx.is_main:
            logger.setLevel(logging.WARNING)  # one log, rank 0's
        bundle = TrainingBundle.load(args.bundle if len(args.bundle) > 1 else args.bundle[0])
        model = SigmmaModel.from_bundle(bundle, **_budget(args), seed=args.seed)
        model.fit(bundle, device=device or args.device, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                  progress=ctx is None or ctx.is_main)  # fmt: skip
        if ctx is None or ctx.is_main:
            model.save(args.out)
            logger.warning("Saved the model to %s.", args.out)
        if ctx is not None:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
