"""The written zarr: tables annotate the right elements, every sigmma key round-trips, napari-spatialdata opens it.

The napari test runs napari-spatialdata's headless ``Interactive`` on ``$DISPLAY`` or on an Xvfb virtual display
it starts itself; it is skipped where napari-spatialdata is not installed (``pip install -e ".[napari]"``) or no
display can be had.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from _section import make_section
from scipy import sparse

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}
IMAGE, CELLS, CELL_TABLE = "he", "cell_circles", "table"
TILES = Keys.tile_shapes(IMAGE)


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
        for key in (Keys.BACKBONE, Keys.EMB_IMAGE, Keys.EMB_ST):
            assert key.format(scale=s) in tiles.obsm
        assert Keys.EMB_CELL.format(scale=s) in cells.obsm
        assert isinstance(cells.obs[Keys.MICROENV.format(scale=s)].dtype, pd.CategoricalDtype)
    for s in ("micro", "meso"):
        assert Keys.block(s) in cells.obs
    assert {Keys.CELL_TILE, Keys.block("micro")} <= set(cells.obs)
    assert {Keys.CELL_SPATIAL, Keys.FEATURES} <= set(cells.obsm)
    assert {Keys.connectivities(), Keys.distances()} <= set(cells.obsp)
    assert {"tile", "backbone", "training", "embed"} <= set(tiles.uns[Keys.UNS])
    assert {"cell_graph", "embed", "microenvironments"} <= set(cells.uns[Keys.UNS])
    assert len(tiles.uns[Keys.UNS]["training"]["history"]["train_loss"]) == 2


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


@pytest.fixture(scope="module")
def display(tmp_path_factory):
    """``(display, Xvfb log)`` for napari's OpenGL canvas: ``$DISPLAY`` if set, else an Xvfb started here, else skip.

    Qt's ``offscreen`` platform has no OpenGL context, which napari's canvas needs, so a virtual X server is
    used (Debian/Ubuntu: ``apt-get install xvfb``; Qt's xcb plugin also needs ``libxcb-icccm4 libxcb-image0
    libxcb-keysyms1 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0``).
    """
    pytest.importorskip("napari_spatialdata")
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"], None
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("napari needs an OpenGL display: set DISPLAY or install Xvfb")
    read, write = os.pipe()
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)
    number = os.read(read, 16).decode().strip() if ready else ""
    os.close(read)
    if not number:
        proc.kill()
        pytest.skip("Xvfb did not start")
    yield f":{number}", log
    proc.terminate()
    proc.wait(timeout=30)


def test_zarr_opens_in_napari_spatialdata(written, display):
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
        pytest.skip("Qt's xcb platform plugin cannot load (missing libxcb-* libraries, see the `display` fixture)")
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

    key = Keys.MICROENV.format(scale="micro")
    _colour_by(viewer, view, cells, key)
    _process_until(lambda: key in cells.features.columns)
    n_envs = back.tables[CELL_TABLE].obs[key].nunique()
    n_colours = len(np.unique(np.asarray(cells.face_color), axis=0))
    assert n_colours == n_envs, (n_colours, n_envs)

    viewer.close()
    print("napari-spatialdata: ok", flush=True)


if __name__ == "__main__":
    _napari_check(sys.argv[1])
