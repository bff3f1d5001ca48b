"""What `sigmma demo` prints at its end: the held-out score against chance, and honest notes on its warnings."""

from __future__ import annotations

import copy

import pytest

from sigmma_sc._demo_report import DEMO_TIME, chance, format_summary, summary_path

SUMMARY = {
    "settings": {"demo_defaults": True},
    "tiles": {"train": 173, "val": 23, "test": 23},
    "training": {
        "steps": 452, "epochs": 113, "stopped": "early stopping", "kept_epoch": 38, "val_rank_kept": 0.371,
        "train_loss_first": 13.8, "train_loss_last": 1.46, "val_loss_last": 28.2, "val_loss_chance": 9.76,
        "warnings": ["Embeddings of the val tiles have collapsed, so tiles are hard to tell apart: ..."],
        "collapsed": ["image meso", "st macro"],
    },
    "test_retrieval": {
        "n": 23,
        "chance": {f"R@{p}%": chance(23, p) for p in (5, 10, 15)},
        "rows": [
            {"scale": "all", "direction": "image->st", "R@5%": 0.435, "R@10%": 0.609, "R@15%": 0.739},
            {"scale": "all", "direction": "st->image", "R@5%": 0.478, "R@10%": 0.696, "R@15%": 0.739},
        ],
    },
    "timings_s": {"featurize": 96.0, "train": 113.0, "total": 268.0},
    "machine": {"cpus": 2, "load_average_1min_end": 1.1},
}  # fmt: skip


def test_chance_is_k_over_n():
    assert [chance(23, p) for p in (5, 10, 15)] == pytest.approx([1 / 23, 2 / 23, 3 / 23])
    assert chance(5, 10) == pytest.approx(1 / 5)  # K is at least 1


def test_scores_against_chance_and_the_stated_time():
    text = format_summary(SUMMARY)
    assert "image -> cells  0.43 / 0.61 / 0.74" in text
    assert "cells -> image  0.48 / 0.70 / 0.74" in text
    assert "chance          0.04 / 0.09 / 0.13" in text
    assert "top K = 1, 2, 3 of 23" in text
    assert "R@10% is 7.0x (image -> cells) and 8.0x (cells -> image) chance" in text
    assert "Took 4 min 28 s (featurize 1 min 36 s, train 1 min 53 s)" in text
    assert DEMO_TIME in text
    assert "busy" not in text


def test_warnings_explained_only_when_they_fired():
    text = format_summary(SUMMARY)
    assert "About the 'collapsed' warning: on the 23 validation tiles the image meso, st macro embeddings" in text
    assert "it ends at 28.2, above its chance level 9.8" in text
    assert "13.8 -> 1.46" in text
    quiet = copy.deepcopy(SUMMARY)
    quiet["training"] |= {"warnings": [], "val_loss_last": 9.0}
    quiet["settings"]["demo_defaults"] = False
    quiet["machine"]["load_average_1min_end"] = 7.5
    text = format_summary(quiet)
    assert "collapsed" not in text
    assert "validation loss" not in text
    assert DEMO_TIME not in text  # other settings: no stated time to compare with
    assert "busy (load average 7.5 on 2 CPUs" in text
    unfitted = copy.deepcopy(SUMMARY)
    unfitted["training"]["train_loss_last"] = 12.0  # the training loss barely fell: no "fits its tiles" story
    assert "validation loss" not in format_summary(unfitted)


def test_summary_sits_next_to_the_zarr(tmp_path):
    assert summary_path(tmp_path / "sigmma_demo.zarr") == tmp_path / "sigmma_demo.summary.json"
    assert summary_path("out") == summary_path("out.zarr").with_name("out.summary.json")
