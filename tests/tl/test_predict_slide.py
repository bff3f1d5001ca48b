"""New image-only slides: probes and reference saved with the model, ``sg.tl.predict_slide`` and ``sigmma predict``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

import sigmma_sc as sg
from sigmma_sc._cli import main
from sigmma_sc._constants import Keys

TINY = {"backbone": "test_vit", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}
SVS = SHARED_DATA / "he-images" / "cmu1_small_region.svs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small synthetic section, a briefly trained model with a probe and a reference, saved; its H&E file."""
    progress, sg.settings.progress_bar = sg.settings.progress_bar, False
    root = tmp_path_factory.mktemp("predict")
    path = sg.datasets.synthetic_xenium(
        root / "run", n_cells=1200, n_genes=30, seed=0, transcripts=False, morphology=False, labels=False
    )
    sdata = sg.io.xenium(path)
    sg.pp.tile(sdata, image_key="he", tile_size_um=96.0, pixel_size_um=2.0)
    sg.pp.cell_graph(sdata, n_comps=16)
    model = sg.tl.train_sigmma(sdata, epochs=2, input_size=32, **TINY)
    sg.tl.embed(sdata, model)
    probe = sg.tl.fit_probe(sdata, model, n_genes=8)
    sg.tl.attach_reference(sdata, model)
    model.save(root / "model.pt")
    he = next(p for p in path.iterdir() if p.name.endswith("he_image.ome.tif"))
    yield {"sdata": sdata, "model": model, "probe": probe, "model_path": root / "model.pt", "he": he}
    sg.settings.progress_bar = progress


def test_model_records_tiling_probe_and_reference(trained):
    model = sg.model.SigmmaModel.load(trained["model_path"])
    assert model.tiling["tile_size_um"] == 96.0
    assert model.tiling["pixel_size_um"] == 2.0
    assert model.tiling["image_channels"] == 3
    assert model.tiling["input_size"] == 32
    lp = model.probes["expression"]
    assert lp.genes == trained["probe"].genes
    assert lp.scores["n_eval"] == len(trained["probe"].tiles["test"])
    ref = model.reference
    tiles = trained["sdata"].tables[Keys.TILE_TABLE]
    assert len(ref.names) == int((tiles.obs[Keys.SPLIT] == "train").sum())
    assert np.array(model.meta["stain_reference"]["stain_matrix"]).shape == (3, 2)


def test_predict_on_the_training_image_reproduces_the_probe(trained):
    """The training section's own H&E, image only, in its coordinate system: same tiles, same features."""
    import spatialdata as sd

    src = trained["sdata"]
    image_only = sd.SpatialData(images={"he": src.images["he"]})
    image_only.attrs[Keys.UNS] = {"um_per_unit": dict(src.attrs[Keys.UNS]["um_per_unit"])}
    out = sg.tl.predict_slide(image_only, trained["model"], retrieve=2)
    new, old = out.tables[Keys.TILE_TABLE], src.tables[Keys.TILE_TABLE]
    pos_old = {(r, c): i for i, (r, c) in enumerate(zip(old.obs[Keys.TILE_ROW], old.obs[Keys.TILE_COL], strict=True))}
    pairs = [(i, pos_old[(r, c)]) for i, (r, c) in enumerate(zip(new.obs[Keys.TILE_ROW], new.obs[Keys.TILE_COL],
                                                                  strict=True)) if (r, c) in pos_old]  # fmt: skip
    assert len(pairs) >= 0.8 * old.n_obs
    a, b = np.array(pairs).T
    key = Keys.embedding()["image"]["macro"]
    assert np.allclose(new.obsm[key][a], old.obsm[key][b], atol=1e-4)
    probe = trained["probe"]
    expected = probe.predict(np.hstack([old.obsm[k] for k in probe.embedding_keys])[b])
    assert list(new.var_names) == probe.genes
    assert np.allclose(new.X[a], expected, atol=1e-3)
    assert np.allclose(new.obsm[Keys.PREDICTED_EXPRESSION].to_numpy()[a], expected, atol=1e-3)
    assert new.obsm["sigmma_retrieved"].shape == (new.n_obs, 2)
    assert set(new.obs["sigmma_top_hit"]) <= set(out.tables[Keys.TILE_TABLE].uns["sigmma_retrieved"]["names"])
    assert new.uns[Keys.UNS]["predict"]["model_tiling"]["tile_size_um"] == 96.0


def test_cli_predict_on_a_pyramidal_tiff(trained, tmp_path):
    import spatialdata as sd

    out = tmp_path / "pred.zarr"
    args = ["-q", "predict", "--model", str(trained["model_path"]), "--slide", str(trained["he"]), "--out", str(out)]
    assert main([*args, "--retrieve", "3"]) == 0
    back = sd.read_zarr(out)
    tiles = back.tables[Keys.TILE_TABLE]
    assert list(tiles.var_names) == trained["probe"].genes
    assert np.isfinite(tiles.X).all()
    assert tiles.obsm["sigmma_retrieved"].shape == (tiles.n_obs, 3)
    shapes_key = tiles.uns["spatialdata_attrs"]["region"]
    assert len(back.shapes[shapes_key]) == tiles.n_obs  # tiles annotated by the table (napari-spatialdata)
    assert "he_overview" in back.images
    with pytest.raises(SystemExit, match="exists"):
        main(args)
    with pytest.raises(SystemExit, match="no such file"):
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "none.pt"),
                "--slide",
                str(trained["he"]),
                "--out",
                str(tmp_path / "x.zarr"),
            ]
        )


def test_clear_errors(trained, tmp_path):
    import spatialdata as sd

    model = trained["model"]
    image_only = sd.SpatialData(images={"he": trained["sdata"].images["he"]})
    image_only.attrs[Keys.UNS] = {"um_per_unit": dict(trained["sdata"].attrs[Keys.UNS]["um_per_unit"])}
    # a slide tiled otherwise than the model
    sg.pp.tile(image_only, table_key=None, tile_size_um=64.0, pixel_size_um=2.0)
    before = set(image_only.tables[Keys.TILE_TABLE].obsm)
    with pytest.raises(ValueError, match=r"tiled with tile_size_um=64.*trained on 96 µm"):
        sg.tl.predict_slide(image_only, model)
    assert set(image_only.tables[Keys.TILE_TABLE].obsm) == before  # unchanged
    assert set(image_only.images) == {"he"}
    with pytest.raises(ValueError, match="no expression probe 'other'.*fit_probe"):
        sg.tl.predict_slide(trained["he"], model, probe="other")
    with pytest.raises(ValueError, match="Nothing to predict"):
        sg.tl.predict_slide(trained["he"], model, probe=None)
    bare = sg.model.SigmmaModel.load(trained["model_path"])
    bare.reference = None
    with pytest.raises(ValueError, match="no retrieval reference.*attach_reference"):
        sg.tl.predict_slide(trained["he"], bare, retrieve=2)
    bare.meta = {k: v for k, v in bare.meta.items() if k != "tile_size_um"}
    with pytest.raises(ValueError, match="does not record the tiling"):
        sg.tl.predict_slide(trained["he"], bare)
    dapi = sg.model.SigmmaModel.load(trained["model_path"])
    dapi.meta["image_channels"] = 1
    with pytest.raises(ValueError, match="1-channel image"):
        sg.tl.predict_slide(trained["he"], dapi)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide" * 20)
    with pytest.raises(ValueError, match="not a whole-slide image"):
        sg.tl.predict_slide(bad, model)
    with pytest.raises(ValueError, match="not embedded by this model"):
        sg.tl.fit_probe(image_only, model)


@pytest.mark.data
def test_cli_predict_on_the_aperio_slide(trained, tmp_path):
    import spatialdata as sd

    out = tmp_path / "cmu.zarr"
    args = ["-q", "predict", "--model", str(trained["model_path"]), "--slide", str(SVS), "--out", str(out)]
    assert main([*args, "--retrieve", "2", "--stain-normalize"]) == 0
    back = sd.read_zarr(out)
    tiles = back.tables[Keys.TILE_TABLE]
    assert back.attrs[Keys.UNS]["slide"]["mpp"] == pytest.approx([0.499, 0.499])
    assert 40 < tiles.n_obs < 150  # tissue tiles only: the slide's 12 x 16 grid of 96 µm tiles is 40% tissue
    assert list(tiles.var_names) == trained["probe"].genes
    assert np.isfinite(tiles.X).all()
    assert tiles.uns[Keys.UNS]["predict"]["stain_normalize"]


def _plain_tiff(path, *, pixel_size_um=None, n=512):
    """A tiled RGB TIFF (a pink disc on glass), with its pixel size recorded only when given."""
    import tifffile

    yy, xx = np.mgrid[0:n, 0:n]
    img = np.full((n, n, 3), 242, np.uint8)
    img[(xx - n / 2) ** 2 + (yy - n / 2) ** 2 < (0.35 * n) ** 2] = (190, 110, 170)
    kw = {}
    if pixel_size_um is not None:
        kw = {"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib", **kw)
    return path


def test_cli_errors_are_one_line_and_write_nothing(trained, tmp_path):
    """Unreadable file, slide without a pixel size, slide coarser than the model: a message with the fix."""
    out = tmp_path / "pred.zarr"

    def run(slide, *extra):
        return main(["-q", "predict", "--model", str(trained["model_path"]), "--slide", str(slide), "--out", str(out),
                     *extra])  # fmt: skip

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(SystemExit, match=r"^sigmma predict: .*not a whole-slide image"):
        run(bad)
    with pytest.raises(SystemExit, match=r"records no pixel size.*--pixel-size-um"):
        run(_plain_tiff(tmp_path / "nompp.tif"))
    coarse = _plain_tiff(tmp_path / "coarse.tif", pixel_size_um=8.0)
    with pytest.raises(SystemExit, match=r"8 µm/px, coarser than the 2 µm/px"):
        run(coarse)
    with pytest.raises(SystemExit, match="coarser"):  # an explicit pixel size is checked the same way
        run(_plain_tiff(tmp_path / "nompp2.tif"), "--pixel-size-um", "6")
    assert not out.exists()
