"""The ``sigmma`` command line: the SIGMMA pipeline for scripts and GPU jobs.

``sigmma demo --out demo.zarr`` runs everything on the embedded synthetic Xenium section;
``sigmma run --xenium DIR --out OUT.zarr`` on a Xenium run (optionally with its H&E);
``sigmma predict --model MODEL --slide SLIDE --out OUT.zarr`` predicts tile expression of a new image-only slide;
``sigmma evaluate OUT.zarr`` scores the embeddings of a written run on its held-out test tiles;
``sigmma bundle`` / ``sigmma train-bundle`` split preprocessing from training, so that training runs on a
GPU machine with only torch installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("sigmma_sc")

#: optimiser steps of ``sigmma demo`` (fits the 5-minute CPU budget; early stopping usually ends sooner)
DEMO_STEPS = 600


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
        type=int,
        default=steps,
        help=f"budget of optimiser steps (default: {steps or 'the preset, 1000'}; early stopping may end sooner)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="budget of epochs (default: none with the default preset, 100 paper)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per contrastive batch (default: the preset's, 256 capped at a quarter of the training tiles; "
        "paper 1280)",
    )
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="image backbone: efficientnet_lite0 (offline), uni, or a timm name",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigmma", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic Xenium section")
    demo.add_argument("--out", type=Path, default=Path("sigmma_demo.zarr"), help="output SpatialData zarr")
    demo.add_argument("--n-cells", type=int, default=None, help="cells of the synthetic section (default: the demo's)")
    demo.add_argument(
        "--image", choices=("he", "morphology_focus"), default="he", help="image to align with (default he)"
    )
    demo.add_argument(
        "--input-size",
        type=int,
        default=112,
        help="crop side for the backbone (default 112, fast on a CPU; 224 is native)",
    )
    demo.add_argument(
        "--hidden",
        type=int,
        default=128,
        help="GNN and embedding width (default 128 for a CPU demo; the paper uses 512)",
    )
    _common_training(demo, steps=DEMO_STEPS)

    run = sub.add_parser("run", help="tile, graph, train, embed and cluster a Xenium run")
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
    run.add_argument("--alignment", type=Path, default=None, help="H&E alignment CSV (3x3 affine from 10x)")
    run.add_argument("--out", type=Path, required=True, help="output SpatialData zarr (several --xenium: a folder)")
    run.add_argument("--tile-size-um", type=float, default=128.0)
    run.add_argument("--pixel-size-um", type=float, default=0.5)
    run.add_argument("--model-out", type=Path, default=None, help="also save the trained model here")
    run.add_argument(
        "--input-size", type=int, default=None, help="crop side for the backbone (default: the backbone's)"
    )
    _common_training(run)

    ev = sub.add_parser(
        "evaluate",
        help="score a written run: image<->ST retrieval and expression probes on its held-out tiles",
        description="Cross-modal retrieval (Recall@5/10/15%%) and linear probes of tile expression (paper and "
        "HEST protocols) of the SIGMMA image embeddings of a zarr written by `sigmma run` or `sigmma demo`. "
        "Probes are fitted on the training tiles only; the test tiles are only scored.",
    )
    ev.add_argument("zarr", type=Path, help="SpatialData zarr written by `sigmma run` / `sigmma demo`")
    ev.add_argument("--split", choices=("test", "val"), default="test", help="tiles scored (default test)")
    ev.add_argument(
        "--protocols", nargs="+", choices=("paper", "hest"), default=["paper", "hest"], help="probe protocols"
    )
    ev.add_argument("--n-genes", type=int, default=50, help="target genes of the probes (default 50)")
    ev.add_argument("--backbone", action="store_true", help="also score the frozen backbone's features")
    ev.add_argument("--csv", type=Path, default=None, help="also write the scores to this CSV file")

    _predict_parser(sub)

    bundle = sub.add_parser("bundle", help="featurize processed zarr(s) and save training bundles (tensors)")
    bundle.add_argument("zarr", type=Path, nargs="+", help="tiled and graphed zarr; several: a cohort")
    bundle.add_argument(
        "--out", type=Path, required=True, help="bundle file; for several zarrs a folder of <zarr name>.pt files"
    )
    bundle.add_argument("--backbone", default="efficientnet_lite0")
    bundle.add_argument("--input-size", type=int, default=None, help="crop side for the backbone (default: its own)")
    bundle.add_argument("--split", choices=("spatial", "section"), default="spatial", help="cohort split")
    bundle.add_argument("--val-sections", nargs="*", default=(), help="with --split section: validation zarr names")
    bundle.add_argument("--test-sections", nargs="*", default=(), help="with --split section: test zarr names")

    train = sub.add_parser(
        "train-bundle", help="train on saved bundle(s) (needs only torch; runs under `torchrun --nproc-per-node N`)"
    )
    train.add_argument("bundle", type=Path, nargs="+", help="bundle file(s); several are joined (one per section)")
    train.add_argument("--out", type=Path, required=True, help="where to save the model")
    train.add_argument("--checkpoint-dir", type=Path, default=None)
    train.add_argument("--resume", action="store_true")
    _common_training(train)
    return parser


def _pipeline(sdata, args, image_key: str, out: Path, tile_size_um: float = 128.0, pixel_size_um: float = 0.5):
    import sigmma_sc as sg

    t0 = time.perf_counter()
    sg.pp.tile(sdata, image_key=image_key, tile_size_um=tile_size_um, pixel_size_um=pixel_size_um)
    sg.pp.cell_graph(sdata)
    model = sg.tl.train_sigmma(
        sdata,
        backbone=args.backbone,
        **_budget(args),
        device=args.device,
        seed=args.seed,
        input_size=getattr(args, "input_size", None),
        **({"hidden": args.hidden, "out_dim": args.hidden} if getattr(args, "hidden", None) else {}),
    )
    sg.tl.embed(sdata, model)
    sg.tl.microenvironments(sdata)
    sdata.write(out)  # refuses an existing path (main checks it before any work)
    logger.warning(
        "Wrote %s in %.0f s; open it with napari-spatialdata or spatialdata.read_zarr.", out, time.perf_counter() - t0
    )
    return model


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
    p.add_argument("--retrieve", type=int, default=0, metavar="N", help="closest training tiles per tile (default 0)")
    p.add_argument("--pixel-size-um", type=float, default=None, help="slide pixel size if the file records none")
    p.add_argument("--probe", default="expression", help="name of the model's probe (default expression)")
    p.add_argument("--no-probe", action="store_true", help="no expression prediction (retrieval only)")
    p.add_argument("--stain-normalize", action="store_true", help="Macenko-normalise to the training stains first")
    p.add_argument("--min-tissue-fraction", type=float, default=0.05)
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
    tiles = sdata.tables["sigmma_tiles"]
    logger.warning("%d tissue tiles, %d predicted genes.", tiles.n_obs, tiles.n_vars)


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
        image_key = "he" if "he" in sdata.images else "morphology_focus"
        sg.pp.tile(sdata, image_key=image_key, tile_size_um=args.tile_size_um, pixel_size_um=args.pixel_size_um)
        sg.pp.cell_graph(sdata)
        sections[name] = sdata
    model = sg.tl.train_sigmma(sections, backbone=args.backbone, **_budget(args),
                               device=args.device, seed=args.seed, input_size=args.input_size)  # fmt: skip
    args.out.mkdir(parents=True)
    for name, sdata in sections.items():
        sg.tl.embed(sdata, model)
        sg.tl.microenvironments(sdata)
        sdata.write(args.out / f"{name}.zarr")
    if args.model_out:
        model.save(args.model_out)
    logger.warning("Wrote %d sections to %s in %.0f s.", len(sections), args.out, time.perf_counter() - t0)


def _evaluate(args) -> None:
    import warnings

    import pandas as pd
    import spatialdata as sd

    import sigmma_sc as sg
    from sigmma_sc._constants import SCALES, Keys
    from sigmma_sc.metrics._evaluate import default_embeddings

    if not args.zarr.exists():
        raise SystemExit(f"No such zarr: {args.zarr}")
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
                                 n_genes=args.n_genes)  # fmt: skip
    cols = [c for c in scores.columns if "R@" in c] + [
        f"{p}_{k}" for p in args.protocols for k in ("pcc", "mse", "gene_pcc")
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.3f}".format):
        print(f"Scores on {int(scores['n_eval'].iloc[0])} {args.split} tiles of {args.zarr}:")
        print(scores[cols].T.to_string())
    print(
        "R@p%: fraction of tiles whose partner is among the top floor(p N) hits (chance = floor(p N) / N). "
        "pcc / mse: tile-level, across genes (paper eq. 1-2); gene_pcc: gene-wise, across tiles (HEST's metric)."
    )
    if args.csv is not None:
        scores.to_csv(args.csv)
        logger.warning("Wrote %s.", args.csv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sigmma`` console script."""
    args = _parser().parse_args(argv)
    import warnings

    import sigmma_sc as sg

    warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)  # noise on every write
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    sg.settings.progress_bar = not args.quiet

    if args.command in ("demo", "run") and args.out.exists():  # before any reading or training, not after
        raise FileExistsError(f"{args.out} exists; choose another --out or remove it.")
    if args.command == "demo":
        kwargs = {} if args.n_cells is None else {"n_cells": args.n_cells}
        sdata = sg.datasets.demo(**kwargs)
        _pipeline(sdata, args, args.image, args.out)
    elif args.command == "run" and len(args.xenium) > 1:
        _run_cohort(args)
    elif args.command == "run":
        args.xenium = args.xenium[0]
        no_he = args.he is not None and str(args.he).lower() == "none"
        if args.alignment is not None and (args.he is None or no_he):
            raise SystemExit("--alignment needs --he: name the H&E image the alignment belongs to.")
        try:
            sdata = sg.io.xenium(
                args.xenium, he_image=None if no_he else (args.he or "auto"), he_alignment=args.alignment
            )
        except FileNotFoundError as e:
            if args.he is not None:
                raise
            raise SystemExit(f"{e}\nWith the command line: pass --he IMAGE --alignment CSV, or --he none.") from e
        model = _pipeline(
            sdata,
            args,
            "he" if "he" in sdata.images else "morphology_focus",
            args.out,
            args.tile_size_um,
            args.pixel_size_um,
        )
        if args.model_out:
            model.save(args.model_out)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "bundle" and len(args.zarr) > 1:
        import spatialdata as sd

        from sigmma_sc.model._distributed import init_from_env
        from sigmma_sc.tl._cohort import save_cohort_bundles

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
        logger.warning("Saved %r to %s.", bundle, args.out)
    elif args.command == "train-bundle":
        from sigmma_sc.model import SigmmaModel, TrainingBundle
        from sigmma_sc.model._distributed import init_from_env

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
