"""The written zarr: tables annotate the right elements, every sigmma key round-trips, napari-spatialdata opens it.

The napari test runs napari-spatialdata's headless ``Interactive`` on ``$DISPLAY`` or on an Xvfb virtual display
it starts itself, adds the image, tiles and cells, colours them by table columns and checks screenshots (the image
and the cells are drawn, the cells on the image). It is skipped where napari-spatialdata is not installed
(``pip install -e ".[napari]"``) or no display can be had, and fails instead with ``SIGMMA_REQUIRE_NAPARI=1``
(``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _section import make_section
from scipy import sparse

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}
IMAGE, CELLS, CELL_TABLE = "he", "cell_circles", "table"
TILES = Keys.tiling(image_key=IMAGE)["shapes"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny section run through tile -> cell_graph -> train -> embed -> microenvironments, written to zarr."""
    progress, sg.settings.progress_bar = sg.settings.progress_bar, False
    sdata = make_section(n_cells=700, image_px=200, rotation_deg=8.0)
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    sg.pp.tile(sdata, image_key=IMAGE, tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    model = sg.tl.train_sigmma(sdata, epochs=2, **TINY)
    sg.tl.embed(sdata, model)
    sg.tl.microenvironments(sdata)
    path = tmp_path_factory.mktemp("zarr") / "section.zarr"
    sdata.write(path)
    sg.settings.progress_bar = progress
    return sdata, path


def _sigmma_keys(adata) -> dict[str, list[str]]:
    """Every key of ``adata`` that sigmma_sc wrote, per AnnData slot."""
    wrote = {
        "obs": [k for k in adata.obs.columns if k.startswith("sigmma") or k in _TILE_OBS],
        "obsm": [k for k in adata.obsm if "sigmma" in k],
        "obsp": [k for k in adata.obsp if k.startswith("sigmma")],
        "uns": [k for k in adata.uns if k == Keys.UNS],
    }
    return {slot: sorted(keys) for slot, keys in wrote.items()}


_TILE_OBS = (
    Keys.TILE_ID,
    Keys.REGION,
    Keys.N_CELLS,
    Keys.TISSUE_FRACTION,
    Keys.SPLIT,
    Keys.SPLIT_REGION,
    Keys.TILE_ROW,
    Keys.TILE_COL,
    Keys.TILE_X0,
    Keys.TILE_Y0,
)


def _assert_same(a, b, what: str) -> None:
    if isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_names=False, obj=what)
    elif sparse.issparse(a):
        assert sparse.issparse(b), what
        assert (a != b).nnz == 0, what
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, np.ndarray | list | tuple) and not isinstance(a, str):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), what
    else:
        assert a == b, what


def test_written_tables_annotate_their_elements(written):
    import spatialdata as sd
    from spatialdata.models import get_table_keys

    _, path = written
    back = sd.read_zarr(path)
    assert IMAGE in back.images
    assert {TILES, CELLS} <= set(back.shapes)

    region, region_key, instance_key = get_table_keys(back.tables[Keys.TILE_TABLE])
    assert (region, region_key, instance_key) == (TILES, Keys.REGION, Keys.TILE_ID)
    tiles = back.tables[Keys.TILE_TABLE]
    assert set(tiles.obs[instance_key]) <= set(back.shapes[TILES].index)

    region, _, instance_key = get_table_keys(back.tables[CELL_TABLE])
    assert region == CELLS
    assert set(back.tables[CELL_TABLE].obs[instance_key]) == set(back.shapes[CELLS].index)

    # tiles and cells share the image's coordinate system
    from spatialdata.transformations import get_transformation

    for name in (IMAGE, TILES, CELLS):
        assert "global" in get_transformation(back[name], get_all=True), name


def test_every_sigmma_key_round_trips(written):
    import spatialdata as sd

    sdata, path = written
    back = sd.read_zarr(path)
    for table_key in (Keys.TILE_TABLE, CELL_TABLE):
        before, after = sdata.tables[table_key], back.tables[table_key]
        keys = _sigmma_keys(before)
        assert keys == _sigmma_keys(after), table_key
        assert keys["uns"] == [Keys.UNS]
        for k in keys["obs"]:
            _assert_same(before.obs[k], after.obs[k], f"{table_key}.obs[{k!r}]")
        for k in keys["obsm"]:
            _assert_same(np.asarray(before.obsm[k]), np.asarray(after.obsm[k]), f"{table_key}.obsm[{k!r}]")
        for k in keys["obsp"]:
            _assert_same(before.obsp[k], after.obsp[k], f"{table_key}.obsp[{k!r}]")
        _assert_same(before.uns[Keys.UNS], after.uns[Keys.UNS], f"{table_key}.uns['sigmma']")
    _assert_same(sdata.tables[Keys.TILE_TABLE].X, back.tables[Keys.TILE_TABLE].X, "tile table .X (summed counts)")

    # the keys the docs promise (docs/outputs.md) are all there
    tiles, cells = back.tables[Keys.TILE_TABLE], back.tables[CELL_TABLE]
    for s in SCALES:
        for key in (Keys.BACKBONE.format(scale=s), Keys.embedding()["image"][s], Keys.embedding()["st"][s]):
            assert key in tiles.obsm
        assert Keys.embedding()["cell"][s] in cells.obsm
        assert isinstance(cells.obs[Keys.microenvironments()[s]].dtype, pd.CategoricalDtype)
    for s in ("micro", "meso"):
        assert Keys.tiling()["cell_blocks"][s] in cells.obs
    assert {Keys.CELL_TILE, Keys.tiling()["cell_blocks"]["micro"]} <= set(cells.obs)
    assert {Keys.tiling()["cell_spatial"], Keys.FEATURES} <= set(cells.obsm)
    assert {Keys.graph()["connectivities"], Keys.graph()["distances"]} <= set(cells.obsp)
    assert {"tile", "backbone", "training", "embed"} <= set(tiles.uns[Keys.UNS])
    assert {"cell_graph", "embed", "microenvironments"} <= set(cells.uns[Keys.UNS])
    assert len(tiles.uns[Keys.UNS]["training"]["history"]["train_loss"]) == 2


def test_ci_runs_the_readme_command_with_the_napari_extra():
    """.ci/run's test line is README's "Run the tests" command (after the venv), napari extra and Xvfb included."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = re.search(r"## Run the tests\n\n```bash\n(.+?)\n```", readme, re.DOTALL).group(1)
    ci = (root / ".ci" / "run").read_text()
    line = ci.split("# --- README test command")[1].splitlines()[1]
    assert command.endswith(" && " + line), (command, line)
    assert '".[test,napari]"' in line
    assert "xvfb" in ci
    assert "SIGMMA_REQUIRE_NAPARI=1" in ci


# --- napari ------------------------------------------------------------------------------------------------


def _process_events(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def _process_until(condition, timeout: float = 120.0) -> None:
    """Run the Qt event loop until ``condition()`` holds (napari-spatialdata loads layers in a thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("napari-spatialdata did not finish in time")
        _process_events(0.05)


def _add(interactive, element: str, timeout: float = 120.0):
    """Add ``element`` as a layer, as a double-click in the SpatialData panel does, and wait for it.

    napari-spatialdata loads one element at a time in a thread and ignores requests while it is busy
    ("Please wait for the current operation to finish"), so the request is repeated until the layer is there.
    """
    deadline = time.monotonic() + timeout
    while interactive.get_layer(element) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"napari-spatialdata did not add {element!r}")
        interactive.add_element(element, "global")
        _process_events(0.5)
    return interactive.get_layer(element)


def _colour_by(viewer, view_widget, layer, column: str) -> None:
    """Select ``layer`` and double-click ``column`` in the View panel's observation list."""
    from qtpy.QtCore import Qt

    viewer.layers.selection.active = layer
    # the View panel's model holds napari's public proxy of the layer, hence the comparison by name
    _process_until(lambda: getattr(view_widget.model.layer, "name", None) == layer.name)
    items = view_widget.obs_widget.findItems(column, Qt.MatchExactly)
    assert items, f"{column!r} not offered for {layer.name!r}"
    view_widget.obs_widget.itemDoubleClicked.emit(items[0])


def _skip(reason: str) -> None:
    """Skip, or fail where the napari test must run (``SIGMMA_REQUIRE_NAPARI=1``, as ``.ci/run`` sets)."""
    if os.environ.get("SIGMMA_REQUIRE_NAPARI") == "1":
        pytest.fail(f"SIGMMA_REQUIRE_NAPARI=1 but the napari test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def display(tmp_path_factory):
    """``(display, Xvfb log)`` for napari's OpenGL canvas: ``$DISPLAY`` if set, else an Xvfb started here, else skip.

    Qt's ``offscreen`` platform has no OpenGL context, which napari's canvas needs, so a virtual X server is
    used (Debian/Ubuntu: the packages in ``.ci/run``: ``xvfb``, the ``libxcb-*`` libraries of Qt's xcb plugin and
    Mesa's software OpenGL).
    """
    try:
        import napari_spatialdata  # noqa: F401
    except ImportError:
        _skip('napari-spatialdata is not installed (pip install -e ".[napari]")')
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"], None
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        _skip("napari needs an OpenGL display: set DISPLAY or install Xvfb")
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    # a free display number and a wait for its socket (-displayfd proved unreliable under pytest: "Cannot write
    # display number to fd")
    number = next(n for n in range(99, 199) if not Path(f"/tmp/.X{n}-lock").exists())
    proc = subprocess.Popen(
        [xvfb, f":{number}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    deadline = time.monotonic() + 60
    while not Path(f"/tmp/.X11-unix/X{number}").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is not None or not Path(f"/tmp/.X11-unix/X{number}").exists():
        proc.kill()
        _skip(f"Xvfb did not start: {log.read_text()[-300:]}")
    yield f":{number}", log
    proc.terminate()
    proc.wait(timeout=30)


def test_zarr_opens_in_napari_spatialdata(display, written):
    """napari runs in a child process (this file run as a script), so Qt and X stay out of pytest's process."""
    _, path = written
    number, log = display
    env = {**os.environ, "DISPLAY": number, "QT_QPA_PLATFORM": "xcb"}
    out = subprocess.run(
        [sys.executable, __file__, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0 and 'Could not load the Qt platform plugin "xcb"' in out.stderr:
        _skip(
            "Qt's xcb platform plugin cannot load (missing libxcb-* libraries, see the `display` fixture): "
            + " | ".join(line for line in out.stderr.splitlines() if "qt." in line.lower() or "xcb" in line)[-600:]
        )
    xvfb = log.read_text()[-2000:] if log is not None else ""
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:] + "\nXvfb: " + xvfb
    assert "napari-spatialdata: ok" in out.stdout, out.stdout[-5000:]


def _napari_check(path: str) -> None:
    """Open the zarr with napari-spatialdata's headless ``Interactive`` and colour tiles and cells by table columns."""
    import napari
    import spatialdata as sd
    from napari.layers import Image, Points, Shapes
    from napari_spatialdata import Interactive, QtAdataViewWidget

    back = sd.read_zarr(path)
    interactive = Interactive(back, headless=True)
    viewer = napari.current_viewer()

    image = _add(interactive, IMAGE)
    tiles = _add(interactive, TILES)
    cells = _add(interactive, CELLS)
    assert isinstance(image, Image), type(image)
    assert isinstance(tiles, Shapes), type(tiles)
    assert isinstance(cells, Points), type(cells)  # napari-spatialdata shows circles as points
    assert len(tiles.data) == back.tables[Keys.TILE_TABLE].n_obs
    # the tables napari-spatialdata links to the layers are ours
    assert tiles.metadata["adata"].n_obs == back.tables[Keys.TILE_TABLE].n_obs
    assert Keys.TILE_TABLE in tiles.metadata["table_names"]
    assert CELL_TABLE in cells.metadata["table_names"]

    view = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, QtAdataViewWidget))

    _colour_by(viewer, view, tiles, Keys.SPLIT)
    _process_until(lambda: Keys.SPLIT in tiles.features.columns)
    n_splits = back.tables[Keys.TILE_TABLE].obs[Keys.SPLIT].nunique()
    assert len(np.unique(np.asarray(tiles.face_color), axis=0)) == n_splits

    key = Keys.microenvironments()["micro"]
    _colour_by(viewer, view, cells, key)
    _process_until(lambda: key in cells.features.columns)
    n_envs = back.tables[CELL_TABLE].obs[key].nunique()
    n_colours = len(np.unique(np.asarray(cells.face_color), axis=0))
    assert n_colours == n_envs, (n_colours, n_envs)

    _assert_drawn(viewer, image, tiles, cells)
    # `napari x.zarr` finds two readers (napari's builtin one too) and asks; docs/napari.md gives --plugin
    from napari.plugins._npe2 import get_readers

    readers = get_readers(path)
    assert "napari-spatialdata" in readers, readers
    print(f"readers for {path}: {sorted(readers)}", flush=True)

    viewer.close()
    print("napari-spatialdata: ok", flush=True)


def _assert_drawn(viewer, image, tiles, cells) -> None:
    """Screenshots: the image and the cells are drawn (pixels differ from the empty canvas), the cells on the image.

    One layer visible at a time, same camera; a pixel is "drawn" where it differs from the canvas with no layer.
    """
    layers = (image, tiles, cells)
    print(f"layers: {[(layer.name, type(layer).__name__) for layer in viewer.layers]}", flush=True)
    viewer.reset_view()

    def shot(visible) -> np.ndarray:
        for layer in viewer.layers:
            layer.visible = visible is not None and layer.name == visible.name
        _process_events(0.5)
        return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(np.int16)

    empty = shot(None)
    shots = {layer.name: shot(layer) for layer in layers}
    if os.environ.get("SIGMMA_NAPARI_SHOTS"):  # to look at them: a folder for PNGs
        from PIL import Image as PILImage

        for name, pixels in {"empty": empty, **shots}.items():
            PILImage.fromarray(pixels.astype(np.uint8)).save(f"{os.environ['SIGMMA_NAPARI_SHOTS']}/{name}.png")
    drawn = {name: np.abs(pixels - empty).max(-1) > 12 for name, pixels in shots.items()}
    for layer in viewer.layers:
        layer.visible = True
    fractions = {name: round(float(mask.mean()), 4) for name, mask in drawn.items()}
    print(f"drawn canvas fractions: {fractions}", flush=True)
    on_image, on_cells, on_tiles = drawn[image.name], drawn[cells.name], drawn[tiles.name]
    # measured on the 700-cell test section: image 0.19, tiles 0.10, cells 0.11 of a narrow (docked) canvas
    assert on_image.mean() > 0.1, fractions
    assert on_tiles.mean() > 0.03, fractions
    assert on_cells.mean() > 0.03, fractions
    assert shots[image.name][on_image].std() > 20  # the image's content (grey tissue on white glass), not a flat fill
    colours, counts = np.unique(shots[cells.name][on_cells], axis=0, return_counts=True)
    assert (counts > 0.005 * on_cells.sum()).sum() >= 3, "cells not drawn in their microenvironment colours"
    rows, cols = np.nonzero(on_image)
    box = np.zeros_like(on_image)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    for name, mask in ((cells.name, on_cells), (tiles.name, on_tiles)):
        inside = float((mask & box).sum() / mask.sum())
        assert inside > 0.95, f"only {inside:.0%} of the drawn {name} pixels lie on the image"


if __name__ == "__main__":
    _napari_check(sys.argv[1])
