"""The ``sigmma`` command line: help texts, ``sigmma run`` on a small Xenium folder, then ``sigmma evaluate``."""

from __future__ import annotations

import re

import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._cli import main
from sigmma_sc._constants import Keys

HE = "sigmma_synthetic_he_image.ome.tif"


COMMANDS = [[], ["demo"], ["run"], ["evaluate"], ["predict"], ["bundle"], ["train-bundle"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sigmma" in out
    if command == ["evaluate"]:
        assert "training tiles only" in out
    for markup in ("``", ":func:", ":data:", ":class:"):  # argparse prints the description as is: no reST
        assert markup not in out


def _options(parser):
    """Every (subcommand, option action) of the parser tree."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {n}".strip(), a) for n, a in _options(sub))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield "", action


def test_every_option_has_help_with_its_default(capsys):
    from sigmma_sc._cli import _parser

    parser = _parser()
    for command, action in _options(parser):
        assert action.help, f"sigmma {command} {action.option_strings[0]} has no help text"
        if action.required:
            continue
        sub = parser if not command else parser._subparsers._group_actions[0].choices[command]
        formatter = sub._get_formatter()
        text = formatter._get_help_string(action) % {"default": action.default}
        assert "default" in text, f"sigmma {command} {action.option_strings[0]}: help shows no default ({text!r})"


def _usage_error(capsys, argv) -> str:
    """Run `sigmma argv`, expect argparse's exit (code 2, usage + one line on stderr), return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: sigmma")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return sg.datasets.synthetic_xenium(
        tmp_path_factory.mktemp("cli") / "run", n_cells=1500, n_genes=40, seed=0, transcripts=False,
        morphology=False, labels=False,
    )  # fmt: skip


def test_user_errors_are_one_line_before_reading(small_run, tmp_path, capsys, monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError("the run was read before the arguments were checked")

    monkeypatch.setattr(sg.io, "xenium", no_read)
    run = ["run", "--xenium", str(small_run), "--out", str(tmp_path / "o.zarr")]
    assert "--tile-size-um: must be > 0, got 0" in _usage_error(capsys, [*run, "--tile-size-um", "0"])
    assert "--pixel-size-um: must be > 0" in _usage_error(capsys, [*run, "--pixel-size-um", "-1"])
    assert "--steps: expected a int" in _usage_error(capsys, [*run, "--steps", "many"])
    assert "--he: no such file: missing.tif" in _usage_error(capsys, [*run, "--he", "missing.tif"])
    assert "--alignment needs --he" in _usage_error(capsys, [*run, "--he", "none", "--alignment", "x.csv"])
    assert "--alignment: no such file" in _usage_error(capsys, [*run, "--he", str(small_run / HE), "--alignment", "x"])
    assert "--resume needs --checkpoint-dir" in _usage_error(capsys, [*run, "--resume"])
    assert "--xenium: no such folder" in _usage_error(capsys, ["run", "--xenium", str(tmp_path / "nope"), "--out", "o"])
    (tmp_path / "o.zarr").mkdir()
    assert "--out" in _usage_error(capsys, run)
    assert "exists; choose another --out" in _usage_error(capsys, run)
    assert "--out" in _usage_error(capsys, ["demo", "--out", str(tmp_path / "o.zarr")])


def test_library_errors_are_one_line(small_run, tmp_path):
    run = ["-q", "run", "--xenium", str(small_run), "--out", str(tmp_path / "o.zarr"), "--tile-size-um", "2",
           "--pixel-size-um", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as e:  # pp.tile's ValueError, as one line with the fix
        main(run)
    message = str(e.value.code)
    assert message.startswith("sigmma run: A 2.0 µm tile")
    assert "Increase `tile_size_um`" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="micro crops"):  # --debug: the traceback
        main(["--debug", *run[1:]])
    with pytest.raises(SystemExit, match=r"--image dapi: no such image; this run has \['he'"):
        main(["-q", "run", "--xenium", str(small_run), "--out", str(tmp_path / "p.zarr"), "--image", "dapi"])
    assert not (tmp_path / "o.zarr").exists()
    assert not (tmp_path / "p.zarr").exists()


def test_library_warnings_reach_users_once(tmp_path):
    """Without any logging setup, sigmma_sc warnings print (and INFO after verbosity='INFO'); never twice."""
    import subprocess
    import sys

    code = (
        "import logging, sigmma_sc as sg\n"
        "log = logging.getLogger('sigmma_sc.pp._tile')\n"
        "log.warning('first warning'); log.info('hidden info')\n"
        "sg.settings.verbosity = 'INFO'; log.info('shown info')\n"
        "logging.basicConfig(format='ROOT %(levelname)s %(message)s')\n"
        "log.warning('second warning')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.strip().splitlines()
    assert lines == ["WARNING: first warning", "INFO: shown info", "ROOT WARNING second warning"]


def test_run_then_evaluate(small_run, tmp_path, capsys, caplog, monkeypatch):
    import logging

    import spatialdata as sd

    folder = small_run
    tile_calls = []
    tile = sg.pp.tile

    def spy(*args, **kwargs):
        tile_calls.append(kwargs)
        return tile(*args, **kwargs)

    monkeypatch.setattr(sg.pp, "tile", spy)
    progress, level = sg.settings.progress_bar, logging.getLogger("sigmma_sc").level
    out = tmp_path / "out.zarr"
    common = ["--tile-size-um", "64", "--pixel-size-um", "2", "--input-size", "32", "--epochs", "3"]
    new = ["--hidden", "16", "--checkpoint-dir", str(tmp_path / "ckpt"), "--cells-outside", "drop", "--image", "he"]
    try:
        with caplog.at_level(logging.INFO, logger="sigmma_sc"):
            assert main(["run", "--xenium", str(folder), "--out", str(out), *common, "--batch-size", "64", *new]) == 0
    finally:
        sg.settings.progress_bar = progress
        logging.getLogger("sigmma_sc").setLevel(level)
    wrote = [r for r in caplog.records if r.name == "sigmma_sc" and r.getMessage().startswith("Wrote")]
    assert [r.levelno for r in wrote] == [logging.INFO]  # not a WARNING
    encoding = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Encoding")]
    assert encoding
    assert " on cpu (" in encoding[0]  # the device actually used, with its threads, not "auto"
    assert "auto" not in encoding[0]
    assert tile_calls[0]["cells_outside"] == "drop"
    assert tile_calls[0]["image_key"] == "he"
    assert (tmp_path / "ckpt" / "last.pt").exists()
    sdata = sd.read_zarr(out)
    tiles, cells = sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]
    assert tiles.uns[Keys.UNS]["training"]["config"]["hidden"] == 16
    assert Keys.embedding()["image"]["macro"] in tiles.obsm
    assert all(Keys.microenvironments()[s] in cells.obs for s in ("micro", "meso", "macro"))
    assert tiles.uns[Keys.UNS]["backbone"]["input_size"] == 32  # --input-size reaches featurization
    resumed = ["-q", "run", "--xenium", str(folder), "--out", str(tmp_path / "again.zarr"), *common, *new, "--resume"]
    trained = []

    def stop(sdata, **kwargs):
        trained.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(sg.tl, "train_sigmma", stop)
    with pytest.raises(RuntimeError, match="stop here"):  # not a user error: not turned into one line
        main(resumed)
    assert trained[0]["resume"] is True
    assert trained[0]["checkpoint_dir"] == tmp_path / "ckpt"

    capsys.readouterr()
    assert main(["-q", "evaluate", str(out), "--backbone", "--n-genes", "10", "--csv", str(tmp_path / "s.csv")]) == 0
    printed = capsys.readouterr().out
    assert "Scores on" in printed
    assert "image->st R@10%" in printed
    assert "hest_gene_pcc" in printed
    assert re.search(r"\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", printed)  # scores with their 95% CIs
    assert re.search(r"SIGMMA 'all' minus the frozen backbone 'backbone_concat'.*\n\s+paper_pcc: [+-]", printed)
    assert "image->st R@10%_ci_low" in pd.read_csv(tmp_path / "s.csv", index_col=0)
    scores = pd.read_csv(tmp_path / "s.csv", index_col=0)
    assert {"all", "backbone_macro", "backbone_concat"} <= set(scores.index)
    assert 0 <= scores.loc["all", "image->st R@10%"] <= 1
    assert -1 <= scores.loc["all", "paper_gene_pcc"] <= 1
    assert pd.isna(scores.loc["backbone_macro", "image->st R@10%"])  # no ST partner: no retrieval
    with pytest.raises(SystemExit, match="^sigmma evaluate: No such zarr"):
        main(["evaluate", str(tmp_path / "missing.zarr")])


def test_every_subcommand_has_a_description():
    """``sigmma run --help`` (and the others) explain the command, not only list its options."""
    from sigmma_sc._cli import _parser

    parser = _parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert len(sub.description or "") > 80, f"sigmma {name} --help has no description"


def test_evaluate_errors_name_the_command(tmp_path):
    import spatialdata as sd

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^sigmma evaluate: .*empty is not a SpatialData zarr; pass the zarr written"):
        main(["-q", "evaluate", str(tmp_path / "empty")])
    sd.SpatialData().write(tmp_path / "bare.zarr")
    with pytest.raises(SystemExit, match=r"^sigmma evaluate: .*bare.zarr has no tile table 'sigmma_tiles'"):
        main(["-q", "evaluate", str(tmp_path / "bare.zarr")])


def test_a_folder_that_is_not_a_xenium_run_gets_no_he_hint(small_run, tmp_path):
    """The "pass --he IMAGE --alignment CSV" hint is for a missing H&E alignment, not for a wrong folder."""
    import shutil

    (tmp_path / "not_xenium").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["-q", "run", "--xenium", str(tmp_path / "not_xenium"), "--out", str(tmp_path / "o.zarr")])
    message = str(e.value.code)
    assert message.startswith("sigmma run: ")
    assert "is not a Xenium output folder" in message
    assert "--he" not in message
    # control: an H&E without its alignment file still gets the command-line hint
    folder = shutil.copytree(small_run, tmp_path / "run", ignore=shutil.ignore_patterns("*imagealignment.csv"))
    with pytest.raises(SystemExit) as e:
        main(["-q", "run", "--xenium", str(folder), "--out", str(tmp_path / "o.zarr")])
    message = str(e.value.code)
    assert message.startswith("sigmma run: Found the H&E image")
    assert "pass --he IMAGE --alignment CSV, or --he none" in message
    assert not (tmp_path / "o.zarr").exists()


def test_demo_ends_with_the_held_out_score_against_chance(small_run, tmp_path, capsys, monkeypatch):
    """`sigmma demo` prints test retrieval against chance (no `sigmma evaluate` needed) and writes its summary."""
    import json

    import spatialdata as sd

    import sigmma_sc._cli as cli
    from sigmma_sc._demo_report import DEMO_TIME, chance

    monkeypatch.setattr(sg.datasets, "demo", lambda **kwargs: sg.io.xenium(small_run))  # small and fast
    monkeypatch.setattr(cli, "DEMO_TILE_UM", 48.0)
    out = tmp_path / "demo.zarr"
    argv = ["-q", "demo", "--out", str(out), "--steps", "8", "--input-size", "32", "--hidden", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo.summary.json").read_text())
    test = summary["test_retrieval"]
    n = test["n"]
    assert n == summary["tiles"]["test"] > 0
    assert test["chance"]["R@10%"] == pytest.approx(chance(n, 10)) == pytest.approx(max(1, int(0.1 * n)) / n)
    rows = {(r["scale"], r["direction"]): r for r in test["rows"]}
    # the printed score is the one `sigmma evaluate` computes from the written zarr
    scores = sg.metrics.cross_modal_retrieval(sd.read_zarr(out))
    ref = scores.set_index(["scale", "direction"])
    for key, row in rows.items():
        assert row["R@10%"] == pytest.approx(ref.loc[key, "R@10%"])
    assert "Held-out test tiles" in printed
    assert f"image -> cells  {rows[('all', 'image->st')]['R@5%']:.2f}" in printed
    assert f"chance          {chance(n, 5):.2f} / {chance(n, 10):.2f} / {chance(n, 15):.2f}" in printed
    assert summary["training"]["steps"] == 8
    assert set(summary["timings_s"]) >= {"featurize", "train", "total"}
    assert summary["settings"]["demo_defaults"] is False
    assert DEMO_TIME not in printed  # the stated time is for the demo's own settings only
