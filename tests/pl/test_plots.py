"""sg.pl: every plot returns the documented type, draws the expected panels and writes a PNG."""

from __future__ import annotations

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _section import make_section
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_vit", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def _trained():
    """A small section with a pyramid, rotated registration, trained 3 epochs, embedded and clustered."""
    progress, sg.settings.progress_bar = sg.settings.progress_bar, False
    sdata = make_section(n_cells=500, image_px=256, scale_factors=[2], rotation_deg=10.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=24.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.tl.featurize(sdata, backbone=TINY["backbone"], pretrained=False)
    model = sg.tl.train_sigmma(sdata, epochs=3, **TINY)
    sg.tl.embed(sdata, model)
    sg.tl.microenvironments(sdata)
    cells = sdata.tables["table"]
    x = cells.obsm[Keys.tiling()["cell_spatial"]][:, 0]
    cells.obs["cell_type"] = pd.Categorical(np.where(x > np.nanmedian(x), "tumour", "stroma"))
    yield sdata, model
    sg.settings.progress_bar = progress


@pytest.fixture
def trained(_trained):
    return _trained[0]


@pytest.fixture
def model(_trained):
    return _trained[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _data_axes(fig: Figure) -> list[Axes]:
    """Axes that are panels (not colorbars)."""
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def test_microenvironments_one_panel_per_scale(trained, tmp_path):
    fig = sg.pl.microenvironments(trained, save=tmp_path / "micro.png")
    assert isinstance(fig, Figure)
    axes = _data_axes(fig)
    assert len(axes) == 3
    cells = trained.tables["table"]
    for a, s in zip(axes, SCALES, strict=True):
        n = cells.obs[Keys.microenvironments()[s]].nunique()
        assert a.get_title() == f"{s} scale: {n} microenvironments"
        assert a.get_legend() is not None
        assert len(a.get_legend().get_texts()) >= n
        assert sum(isinstance(im, AxesImage) for im in a.get_images()) == 1  # the H&E background
        assert all(c.get_rasterized() for c in a.collections)
        assert sum(len(c.get_offsets()) for c in a.collections) == cells.n_obs
        assert any("µm" in t.get_text() for t in a.findobj(mpl.text.Text))  # scale bar
        assert a.get_ylim()[0] > a.get_ylim()[1]  # image orientation
    assert (tmp_path / "micro.png").stat().st_size > 10_000


def test_microenvironments_single_scale_crop_and_axes(trained):
    _, ax = plt.subplots()
    out = sg.pl.microenvironments(
        trained, scale="meso", ax=ax, crop=(10, 10, 40, 40), show_image=False, palette="tab10", point_size=4
    )
    assert out is ax  # one panel: its Axes
    assert ax.get_images() == []
    assert ax.get_xlim() == (10, 40)
    assert sum(len(c.get_offsets()) for c in ax.collections) < trained.tables["table"].n_obs
    with pytest.raises(ValueError, match="Expected 2 axes"):
        sg.pl.microenvironments(trained, scale=("micro", "meso"), ax=ax)
    with pytest.raises(ValueError, match="`scale` must be among"):
        sg.pl.microenvironments(trained, scale="nano")


def test_microenvironments_close_up_under_the_whole_section(trained):
    from matplotlib.patches import Rectangle

    cells = trained.tables["table"]
    fig = sg.pl.microenvironments(trained, zoom_um=40.0)
    axes = _data_axes(fig)
    assert len(axes) == 6  # whole section, then the close-ups
    xy = cells.obsm[Keys.tiling()["cell_spatial"]] * 0.5  # µm
    cx, cy = np.median(xy, axis=0)
    for top, close, s in zip(axes[:3], axes[3:], SCALES, strict=True):
        assert top.get_title().startswith(f"{s} scale: ")
        assert close.get_title().startswith(f"{s} scale, close-up")
        np.testing.assert_allclose(close.get_xlim(), (cx - 20, cx + 20))
        np.testing.assert_allclose(close.get_ylim(), (cy + 20, cy - 20))  # image orientation
        assert sum(isinstance(im, AxesImage) for im in close.get_images()) == 1  # the image under the close-up too
        n_close = sum(len(c.get_offsets()) for c in close.collections)
        assert 0 < n_close < cells.n_obs
        assert close.get_legend() is None
        boxes = [p for p in top.patches if isinstance(p, Rectangle) and p.get_width() == pytest.approx(40.0)]
        assert len(boxes) == 1  # the window, outlined on the whole-section panel
        assert boxes[0].get_xy() == pytest.approx((cx - 20, cy - 20))
    one = sg.pl.microenvironments(trained, scale="micro", zoom=(10, 10, 50, 50))
    assert isinstance(one, Figure)
    assert _data_axes(one)[1].get_xlim() == (10, 50)
    # no close-up when the section is not larger than the window, nor when `ax` has one Axes per scale
    assert isinstance(sg.pl.microenvironments(trained, scale="micro"), Axes)
    _, ax = plt.subplots()
    assert sg.pl.microenvironments(trained, scale="micro", zoom_um=40.0, ax=ax) is ax
    with pytest.raises(ValueError, match="Expected 2 axes"):
        sg.pl.microenvironments(trained, scale="micro", zoom=(10, 10, 50, 50), ax=ax)
    with pytest.raises(ValueError, match="`zoom` must be"):
        sg.pl.microenvironments(trained, zoom="half")
    with pytest.raises(ValueError, match="min < max"):
        sg.pl.microenvironments(trained, zoom=(50, 50, 10, 10))


def test_microenvironments_background_is_registered(trained):
    """The drawn window samples the image where the cells are: tissue (dark) under cells, white outside."""
    a = sg.pl.microenvironments(trained, scale="micro", image_alpha=1.0)
    im = a.get_images()[0]
    arr = np.asarray(im.get_array())
    x0, x1, y1, y0 = im.get_extent()
    xy = trained.tables["table"].obsm[Keys.tiling()["cell_spatial"]] * 0.5  # µm
    col = ((xy[:, 0] - x0) / (x1 - x0) * arr.shape[1]).astype(int)
    row = ((xy[:, 1] - y0) / (y1 - y0) * arr.shape[0]).astype(int)
    under_cells = arr[row, col].mean(axis=1)
    assert np.median(under_cells) < 200  # the disc is (180, 90, 160); the background 245
    assert arr[0, 0].mean() > 240


def test_microenvironments_before_clustering(section):
    sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    with pytest.raises(KeyError, match=r"run `sg.tl.microenvironments\(sdata, scale='micro'\)` first"):
        sg.pl.microenvironments(section)
    with pytest.raises(KeyError, match="run `sg.pp.tile` first"):
        sg.pl.microenvironments(make_section(n_cells=20, image_px=32))


def test_thumbnail_fallback_for_images_without_pyramid(trained):
    from sigmma_sc.pl._utils import data_bounds, draw_image

    params = trained.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    _, ax = plt.subplots()
    bounds = data_bounds(trained.tables["table"].obsm[Keys.tiling()["cell_spatial"]] * 0.5)
    draw_image(ax, trained, params, image_key="he", bounds_um=bounds, max_pixels=8)  # forces the strided path
    im = ax.get_images()[0]
    corner = im.get_transform().transform([[0.0, 0.0]])
    expected = ax.transData.transform([[0.0, 0.0]])  # the image's pixel (0, 0) is at the origin of 'global'
    assert np.allclose(corner, expected, atol=1e-6)


def test_composition_from_sdata_and_table(trained, tmp_path):
    ax = sg.pl.composition(trained, groupby="cell_type", save=tmp_path / "comp.png")
    assert isinstance(ax, Axes)
    comp = sg.tl.microenvironment_composition(trained, groupby="cell_type")
    assert len(ax.patches) == comp.size
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["stroma", "tumour"]
    tops = {round(p.get_y() + p.get_height(), 6) for p in ax.patches if p.get_height() > 0}
    assert max(tops) == pytest.approx(1.0)
    assert (tmp_path / "comp.png").exists()
    counts = sg.tl.microenvironment_composition(trained, scale="macro", groupby="cell_type", normalize=False)
    ax2 = sg.pl.composition(counts, horizontal=True, palette={"stroma": "grey", "tumour": "red"})
    assert len(ax2.patches) == counts.size
    assert ax2.get_xlabel() == "fraction of cells"


def test_expression_violin_and_spatial(trained, tmp_path):
    fig = sg.pl.expression(trained, ["GENE0", "GENE1"], save=tmp_path / "violin.png")
    assert isinstance(fig, Figure)
    axes = _data_axes(fig)
    assert [a.get_title() for a in axes] == ["GENE0", "GENE1"]
    n_groups = trained.tables["table"].obs["sigmma_microenv_micro"].nunique()
    assert len(axes[0].get_xticklabels()) == n_groups
    ax = sg.pl.expression(trained, "GENE0", kind="spatial", show_image=True, save=tmp_path / "spatial.png")
    assert isinstance(ax, Axes)  # one panel: its Axes
    axes = _data_axes(ax.figure)
    assert len(axes) == 1
    assert len(ax.figure.axes) == 2  # one colorbar
    assert all(c.get_rasterized() for c in axes[0].collections)
    assert (tmp_path / "violin.png").exists()
    assert (tmp_path / "spatial.png").exists()
    groups = list(trained.tables["table"].obs["sigmma_microenv_micro"].cat.categories[:2])
    ax = sg.pl.expression(trained, "GENE2", groups=groups)
    assert [t.get_text() for t in ax.get_xticklabels()] == groups
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        sg.pl.expression(trained, ["NOT_A_GENE"])
    with pytest.raises(ValueError, match="kind"):
        sg.pl.expression(trained, "GENE0", kind="heatmap")


def test_expression_values_are_log_normalised(trained):
    from sigmma_sc.pl._expression import gene_values

    cells = trained.tables["table"]
    v = gene_values(cells, ["GENE3"])
    X = np.asarray(cells.X)
    expected = np.log1p(X[:, 3] / X.sum(1) * 1e4)
    assert np.allclose(v["GENE3"].to_numpy(), expected)


def test_training_curves(trained, model, tmp_path):
    ax = sg.pl.training_curves(model, save=tmp_path / "train.png")
    assert isinstance(ax, Axes)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "train" in labels
    assert "validation" in labels
    assert len(ax.get_lines()[0].get_xdata()) == len(model.history)
    ax2 = sg.pl.training_curves(trained)
    assert np.allclose(ax2.get_lines()[0].get_ydata(), ax.get_lines()[0].get_ydata())
    assert (tmp_path / "train.png").exists()
    assert {"train chance", "validation chance"} <= set(labels)
    chance = next(line for line in ax.get_lines() if line.get_label() == "validation chance")
    assert np.allclose(chance.get_ydata(), [h["val_chance"] for h in model.history])
    kept = f"kept: epoch {model.diagnostics['best_epoch']}"  # the epoch the selection criterion kept
    assert kept in labels
    ranks = sg.pl.training_curves(model, kind="retrieval")
    rank_labels = [line.get_label() for line in ranks.get_lines()]
    assert {"validation partner rank", "chance", kept} <= set(rank_labels)
    assert np.allclose(ranks.get_lines()[0].get_ydata(), [h["val_rank"] for h in model.history])
    edges = sg.pl.training_curves(model, kind="edges")
    edge_labels = {line.get_label() for line in edges.get_lines()}
    assert {"meso: fraction sampled", "macro: mean probability"} <= edge_labels
    grads = sg.pl.training_curves(model, kind="gradients")
    assert grads.get_yscale() == "log"
    assert "all parameters (before clipping)" in {line.get_label() for line in grads.get_lines()}
    with pytest.raises(ValueError, match="kind"):
        sg.pl.training_curves(model, kind="weights")
    with pytest.raises(ValueError, match="no validation retrieval"):
        sg.pl.training_curves([{"epoch": 1, "train_loss": 1.0}], kind="retrieval")
    with pytest.raises(ValueError, match="no edge-addition statistics"):
        sg.pl.training_curves([{"epoch": 1, "train_loss": 1.0}], kind="edges")
    with pytest.raises(KeyError, match="run `sg.pp.tile` and `sg.tl.train_sigmma` first"):
        sg.pl.training_curves(make_section(n_cells=10, image_px=32))
    with pytest.raises(ValueError, match="history is empty"):
        sg.pl.training_curves([])


def test_retrieval_examples(trained, tmp_path):
    fig = sg.pl.retrieval_examples(trained, query_tiles=["tile_1", "tile_4"], k=3, save=tmp_path / "retr.png")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 4
    assert all(len(a.get_images()) == 1 for a in fig.axes)
    assert fig.axes[0].get_title().startswith("query (image)")
    assert "cos" in fig.axes[1].get_title()
    assert (tmp_path / "retr.png").exists()
    fig = sg.pl.retrieval_examples(trained, query="st", n_queries=1, k=2, split=None)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title().startswith("query (ST)")


def test_attention_matches_timm_attention_weights(tmp_path):
    """The recomputed class-token attention equals the weights of timm's non-fused attention path."""
    import torch

    from sigmma_sc.pl._attention import _as_hwc, _cls_attention

    vit, info = sg.nn.build_backbone("test_vit", pretrained=False)
    tile = np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)
    maps = _cls_attention(vit, _as_hwc(tile), block=-1, info=info)
    attn = vit.blocks[-1].attn
    grid = info.input_size // 16
    assert maps.shape == (attn.num_heads, grid, grid)
    seen = {}
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("w", o.detach()))
    x = torch.nn.functional.interpolate(
        torch.from_numpy(tile[None] / 255.0).float(), size=(info.input_size,) * 2, mode="bilinear", antialias=True
    )
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        vit.forward_features(x)
    handle.remove()
    ref = seen["w"][0, :, 0, vit.num_prefix_tokens :].reshape(attn.num_heads, grid, grid).numpy()
    assert np.allclose(maps, ref, atol=1e-5)
    assert np.allclose(maps.sum((1, 2)) + seen["w"][0, :, 0, : vit.num_prefix_tokens].sum(-1).numpy(), 1, atol=1e-5)


def test_attention_before_and_after(tmp_path):
    import copy

    import torch

    before, info = sg.nn.build_backbone("test_vit", pretrained=False)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.blocks[-1].attn.qkv.weight.mul_(3.0)
    tile = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=int)
    mask[10:20, 10:20], mask[30:45, 35:50] = 1, 2
    fig = sg.pl.attention({"pretrained": before, "fine-tuned": after}, tile, mask=mask, save=tmp_path / "attn.png")
    assert isinstance(fig, Figure)
    n_heads = before.blocks[-1].attn.num_heads
    panels = _data_axes(fig)
    assert len(panels) == 2 * (n_heads + 1)
    assert panels[0].get_ylabel() == "pretrained"
    assert panels[n_heads + 1].get_ylabel() == "fine-tuned"
    assert panels[1].get_title() == "head 1"
    assert len(panels[1].get_images()) == 2  # tile + attention overlay
    assert not np.allclose(panels[1].get_images()[1].get_array(), panels[n_heads + 2].get_images()[1].get_array())
    assert (tmp_path / "attn.png").exists()
    encoder = sg.nn.MultiCropEncoder(before, info)
    fig = sg.pl.attention(encoder, tile[..., 0], heads=[0])  # a one-channel tile, a MultiCropEncoder
    assert len(_data_axes(fig)) == 2
    with pytest.raises(ValueError, match="out of range"):
        sg.pl.attention(before, tile, heads=[99])
    cnn, _ = sg.nn.build_backbone("test_efficientnet", pretrained=False)
    with pytest.raises(TypeError, match="vision transformer"):
        sg.pl.attention(cnn, tile)
