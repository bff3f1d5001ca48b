"""The training bundle: every tensor SIGMMA trains on, pre-collated for on-device batching.

Pure torch. The data layer builds a :class:`TrainingBundle` from SpatialData; training can then run
on a bare GPU machine from ``TrainingBundle.load(path)`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._constants import GRID, SCALES, SPLITS
from ..nn._edges import block_ids

_FORMAT = "sigmma_sc.TrainingBundle"
_VERSION = 1
# meta fields that the sections of a cohort bundle must share (one node-feature space, one tiling, one backbone)
_CONCAT_MUST_MATCH = ("n_features", "features_key", "pca", "tile_size_um", "pixel_size_um", "backbone")


@dataclass(eq=False)
class TileBatch:
    """A batch of tiles gathered by :meth:`TrainingBundle.select`, re-indexed to batch-local rows.

    Unpacks as the 7-tuple ``(x, pos, batch, edge_index, cand_meso, cand_macro, image_features)``;
    ``num_tiles`` (tiles may have no cells) and ``tiles`` are attributes.

    Attributes
    ----------
    x
        ``(n, F)`` node features.
    pos
        ``(n, 2)`` positions inside the tile.
    batch
        ``(n,)`` position of each cell's tile in the requested ``tile_idx``.
    edge_index, cand_meso, cand_macro
        ``(2, .)`` edges in batch-local rows.
    image_features
        Scale -> ``(B, D)`` float32 features, or ``None``.
    num_tiles
        ``B``, the number of requested tiles.
    tiles
        ``(B, C, H, W)`` ``uint8`` tile images (fine-tuning), or ``None``.
    edge_sections
        ``(n_micro, n_meso, n_other)``: ``edge_index`` holds first the edges whose ends share a micro block,
        then those sharing only a meso block, then the others, or ``None`` (any order).
    candidates_in_blocks
        ``cand_meso`` pairs are known to share a meso block and ``cand_macro`` pairs a tile.
    boundary
        ``(B, n_crops, ...)`` cached outputs of the frozen part of a fine-tuned backbone (a bundle with a
        fine-tuning cache, :meth:`TrainingBundle.with_boundary_cache`), or ``None``.
    """

    x: Tensor
    pos: Tensor
    batch: Tensor
    edge_index: Tensor
    cand_meso: Tensor
    cand_macro: Tensor
    image_features: dict[str, Tensor] | None
    num_tiles: int
    tiles: Tensor | None = None
    edge_sections: tuple[int, int, int] | None = None
    candidates_in_blocks: bool = False
    boundary: Tensor | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(
            (self.x, self.pos, self.batch, self.edge_index, self.cand_meso, self.cand_macro, self.image_features)
        )


def _tensor(a: Any, dtype: torch.dtype, name: str) -> Tensor:
    if a is None:
        raise ValueError(f"`{name}` is required.")
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)
    if dtype.is_floating_point and not t.is_floating_point():
        raise ValueError(f"`{name}` must be floating point, got {t.dtype}.")
    if not dtype.is_floating_point and t.is_floating_point():
        raise ValueError(f"`{name}` must be integer, got {t.dtype}.")
    return t.to(dtype).contiguous()


def _edges(a: Any, name: str, n: int, device: torch.device) -> Tensor:
    if a is None:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    t = _tensor(a, torch.long, name)
    if t.ndim != 2 or t.shape[0] != 2:
        raise ValueError(f"`{name}` must have shape (2, E), got {tuple(t.shape)}.")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"`{name}` holds row indices outside [0, {n}).")
    return t


def _undirected_unique(ei: Tensor, n: int) -> Tensor:
    """Both directions of every pair, without self loops or duplicates, sorted by source row."""
    ei = torch.cat([ei, ei.flip(0)], dim=1)
    ei = ei[:, ei[0] != ei[1]]
    key = torch.unique(ei[0] * n + ei[1])
    return torch.stack([key // n, key % n])


def _tile_images(a: Any, t: int) -> Tensor:
    tiles = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)
    if tiles.dtype != torch.uint8:
        raise ValueError(f"`tiles` must be uint8 images (0..255), got {tiles.dtype}.")
    if tiles.ndim != 4 or tiles.shape[0] != t or tiles.shape[1] not in (1, 3):
        raise ValueError(
            f"`tiles` must have shape (T, C, H, W) with T = {t} and C in {{1, 3}}, got {tuple(tiles.shape)}."
        )
    if tiles.shape[2] < 4 or tiles.shape[3] < 4:
        raise ValueError(f"`tiles` must be at least 4x4 pixels, got {tiles.shape[2]}x{tiles.shape[3]}.")
    return tiles.contiguous()


def _ptr(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@dataclass(eq=False)
class TrainingBundle:
    """All tensors of a tiled section, with cells ordered by tile.

    Parameters
    ----------
    x
        ``(N, F)`` float32 node features.
    cell_ptr
        ``(T + 1,)`` int64; the cells of tile ``t`` are rows ``cell_ptr[t]:cell_ptr[t + 1]`` (may be empty).
    pos
        ``(N, 2)`` float32 position ``(x, y)`` of each cell inside its tile, as a fraction of the tile side, in ``[0, 1]``.
    edge_index
        ``(2, E)`` int64 kNN edges in global rows, both ends in the same tile; messages flow
        ``edge_index[0] -> edge_index[1]``.
    cand_meso, cand_macro
        ``(2, .)`` int64 candidate edges for stochastic edge addition (the k nearest cells of each cell
        in the same meso block / the same tile that are not kNN neighbours), or ``None``.
    image_features
        Scale -> ``(T, D)`` float32/float16 cached backbone features, or ``None`` (ST-only use).
    split
        ``(T,)`` int8: 0 train, 1 validation, 2 test, 3 unused (the ``'buffer'`` tiles of
        ``sg.pp.tile(split_buffer=...)``: embedded, never trained on or scored) (``None``: every tile is a training
        tile).
    tiles
        ``(T, C, H, W)`` ``uint8`` tile images (``C`` = 1 or 3, RGB 0..255 or one morphology channel), or
        ``None``. Only needed to fine-tune backbone blocks (``SigmmaConfig.finetune_blocks > 0``), where the
        image side is encoded from the pixels at every step instead of from ``image_features``.
    meta
        JSON-able information (feature names or key, backbone name, tile size in micrometres, ...). A cohort
        bundle (:meth:`concat`) lists its section names in ``meta['sections']``.
    section
        ``(T,)`` int64 index of each tile's section in ``meta['sections']`` (a cohort bundle), or ``None``
        (one section).

    Notes
    -----
    At construction the inputs are validated (``ValueError`` on inconsistent shapes, NaN, positions outside
    ``[0, 1]``, edges between tiles) and normalised:

    - kNN edges are stably sorted by tile, and inside a tile into those whose ends share a micro block, then
      those that share only a meso block, then the others (so a batch can slice, not mask, the edges of each scale);
    - each candidate set is made undirected (both directions), without self loops or duplicates;
    - kNN pairs that cross a micro block inside one meso block join ``cand_meso``, kNN pairs that cross a
      meso block join ``cand_macro`` (so with edge addition every kNN edge can still enter the graph of
      its scale, sampled rather than fixed);
    - ``cand_meso`` pairs that cross a meso block move to ``cand_macro``, and pairs in ``cand_meso`` are
      removed from ``cand_macro`` (a pair is a candidate at one scale only).

    The normalisation is idempotent, so ``save``/``load`` round-trips exactly.
    """

    x: Tensor
    cell_ptr: Tensor
    pos: Tensor
    edge_index: Tensor
    cand_meso: Tensor | None = None
    cand_macro: Tensor | None = None
    image_features: Mapping[str, Tensor] | None = None
    split: Tensor | None = None
    tiles: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    section: Tensor | None = None

    def __post_init__(self) -> None:
        self.x = _tensor(self.x, torch.float32, "x")
        if self.x.ndim != 2:
            raise ValueError(f"`x` must have shape (N, F), got {tuple(self.x.shape)}.")
        n = self.x.shape[0]
        if not torch.isfinite(self.x).all():
            raise ValueError("`x` (node features) holds NaN or infinite values.")
        self.cell_ptr = _tensor(self.cell_ptr, torch.long, "cell_ptr")
        ptr = self.cell_ptr
        if ptr.ndim != 1 or ptr.numel() < 2 or int(ptr[0]) != 0 or int(ptr[-1]) != n or bool((ptr.diff() < 0).any()):
            raise ValueError(
                f"`cell_ptr` must be a non-decreasing (T + 1,) vector from 0 to N = {n} (cells ordered by tile)."
            )
        t = ptr.numel() - 1
        self.pos = _tensor(self.pos, torch.float32, "pos")
        if self.pos.shape != (n, 2):
            raise ValueError(f"`pos` must have shape (N, 2) = ({n}, 2), got {tuple(self.pos.shape)}.")
        if not torch.isfinite(self.pos).all() or bool(((self.pos < 0) | (self.pos > 1)).any()):
            raise ValueError("`pos` must be finite and in [0, 1] (position inside the tile as a fraction of its side).")

        self._cell_tile = torch.repeat_interleave(torch.arange(t, device=ptr.device), ptr.diff())
        edge_index = _edges(self.edge_index, "edge_index", n, ptr.device)
        cands = {}
        for name in ("cand_meso", "cand_macro"):
            cands[name] = _undirected_unique(_edges(getattr(self, name), name, n, ptr.device), n)
        for name, ei in (("edge_index", edge_index), *cands.items()):
            if not bool((self._cell_tile[ei[0]] == self._cell_tile[ei[1]]).all()):
                raise ValueError(f"`{name}` links cells of different tiles; edges must stay within a tile.")
        ids = {s: block_ids(self.pos, self._cell_tile, GRID[s]) for s in ("micro", "meso")}
        src, dst = edge_index
        same = {s: ids[s][src] == ids[s][dst] for s in ids}
        group = 2 - same["meso"].long() - same["micro"].long()  # 0 same micro block, 1 same meso block, 2 other
        order = torch.sort(self._cell_tile[src] * 3 + group, stable=True).indices
        self.edge_index, self._knn_group = edge_index[:, order], group[order]
        same = {k: v[order] for k, v in same.items()}
        meso = _undirected_unique(
            torch.cat([cands["cand_meso"], self.edge_index[:, same["meso"] & ~same["micro"]]], 1), n
        )
        in_block = ids["meso"][meso[0]] == ids["meso"][meso[1]]
        macro = torch.cat([cands["cand_macro"], meso[:, ~in_block], self.edge_index[:, ~same["meso"]]], 1)
        macro = _undirected_unique(macro, n)
        meso = meso[:, in_block]
        macro = macro[:, ~torch.isin(macro[0] * n + macro[1], meso[0] * n + meso[1])]
        self.cand_meso, self.cand_macro = meso, macro

        if self.image_features is not None:
            feats = {}
            for s, f in self.image_features.items():
                if s not in SCALES:
                    raise ValueError(f"`image_features` keys must be scales {SCALES}, got {s!r}.")
                f = torch.as_tensor(np.asarray(f) if not isinstance(f, Tensor) else f)
                if f.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                    f = f.float()
                if f.ndim != 2 or f.shape[0] != t:
                    raise ValueError(
                        f"`image_features[{s!r}]` must have shape (T, D) with T = {t}, got {tuple(f.shape)}."
                    )
                if not torch.isfinite(f).all():
                    raise ValueError(f"`image_features[{s!r}]` holds NaN or infinite values.")
                feats[s] = f.contiguous()
            if len({f.shape[1] for f in feats.values()}) > 1:
                raise ValueError("`image_features` must have the same width D at every scale.")
            self.image_features = feats or None
        if self.tiles is not None:
            self.tiles = _tile_images(self.tiles, t)
        if self.split is None:
            self.split = torch.zeros(t, dtype=torch.int8, device=ptr.device)
        self.split = _tensor(self.split, torch.int8, "split")
        if self.split.shape != (t,) or bool(((self.split < 0) | (self.split > 3)).any()):
            raise ValueError(
                f"`split` must be a (T,) = ({t},) vector of 0 (train), 1 (val), 2 (test) or 3 (unused: buffer)."
            )
        try:
            json.dumps(self.meta)
        except TypeError as e:
            raise ValueError(f"`meta` must be JSON-able: {e}") from e
        if self.section is not None:
            self.section = _tensor(self.section, torch.long, "section")
            n_sections = len(self.meta.get("sections") or [])
            if self.section.shape != (t,) or bool(((self.section < 0) | (self.section >= n_sections)).any()):
                raise ValueError(
                    f"`section` must be a (T,) = ({t},) vector of indices into `meta['sections']` "
                    f"({n_sections} names)."
                )
        self._index()

    def _index(self) -> None:
        t = self.n_tiles
        self._cell_count = self.cell_ptr.diff()
        # (start, count) per tile of each edge section: the kNN edges of groups 0/1/2 and the candidates
        knn = torch.bincount(self._cell_tile[self.edge_index[0]] * 3 + self._knn_group, minlength=3 * t).view(t, 3)
        knn_start = (_ptr(knn.reshape(-1))[:-1]).view(t, 3)
        self._spans = {f"knn{g}": (knn_start[:, g].contiguous(), knn[:, g].contiguous()) for g in range(3)}
        for name in ("cand_meso", "cand_macro"):
            count = torch.bincount(self._cell_tile[getattr(self, name)[0]], minlength=t)
            self._spans[name] = (_ptr(count)[:-1], count)
        # host copies of the per-tile counts: `select` sizes its outputs from them without a device sync
        self._host_counts = {"cells": self._cell_count.cpu()} | {k: c.cpu() for k, (_, c) in self._spans.items()}

    # ------------------------------------------------------------------ properties
    @property
    def n_tiles(self) -> int:
        """Number of tiles ``T``."""
        return self.cell_ptr.numel() - 1

    @property
    def n_cells(self) -> int:
        """Number of cells ``N``."""
        return self.x.shape[0]

    @property
    def n_features(self) -> int:
        """Node feature width ``F``."""
        return self.x.shape[1]

    @property
    def image_dim(self) -> int | None:
        """Width ``D`` of the image features (``None`` without them)."""
        return None if not self.image_features else next(iter(self.image_features.values())).shape[1]

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.x.device

    def tiles_in(self, split: int | str) -> Tensor:
        """Indices of the tiles of a split (``0``/``"train"``, ``1``/``"val"``, ``2``/``"test"``)."""
        code = SPLITS.index(split) if isinstance(split, str) else int(split)
        return torch.nonzero(self.split == code).squeeze(1)

    # ------------------------------------------------------------------ device and batching
    def to(self, device: str | torch.device, *, tiles: bool = True) -> TrainingBundle:
        """A copy with every tensor on ``device`` (no re-validation).

        Parameters
        ----------
        device
            Target device.
        tiles
            Keep the tile images (``False``: the copy has ``tiles=None``, e.g. to train on cached features
            without moving the pixels to the GPU).
        """
        new = object.__new__(type(self))
        for k, v in self.__dict__.items():
            if k == "tiles" and not tiles:
                v = None
            elif k == "_host_counts":
                pass  # stays on the host
            elif isinstance(v, Tensor):
                v = v.to(device)
            elif isinstance(v, dict) and v and all(isinstance(x, Tensor) for x in v.values()):
                v = {kk: x.to(device) for kk, x in v.items()}
            elif k == "_spans":
                v = {kk: (a.to(device), c.to(device)) for kk, (a, c) in v.items()}
            new.__dict__[k] = v
        return new

    def _gather(self, span: str, edges: Tensor, tile_idx: Tensor, shift: Tensor, total: int) -> Tensor:
        start, count = (a[tile_idx] for a in self._spans[span])
        new_start = count.cumsum(0) - count
        ids = torch.repeat_interleave(start - new_start, count, output_size=total)
        ids = ids + torch.arange(total, device=ids.device)
        return edges[:, ids] + torch.repeat_interleave(shift, count, output_size=total)

    def select(self, tile_idx: Tensor | np.ndarray | list[int]) -> TileBatch:
        """Gather a batch of tiles on the bundle's device, re-indexed to batch-local rows.

        Vectorised (``repeat_interleave`` over the tile pointers; no loop over tiles). The output sizes are
        computed from host copies of the per-tile counts, so a CPU ``tile_idx`` (copied to the device
        asynchronously) selects without any device-to-host synchronisation.

        Parameters
        ----------
        tile_idx
            ``(B,)`` tile indices (any order; repeats allowed), preferably on the CPU.

        Returns
        -------
        A :class:`TileBatch` (unpacks as ``x, pos, batch, edge_index, cand_meso, cand_macro, image_features``;
        ``tiles`` holds the tile images when the bundle has them). Its kNN edges are ordered by section
        (``edge_sections``: same micro block, same meso block only, other) and its candidates are restricted
        to their blocks (``candidates_in_blocks``), so the graph encoder slices instead of masking.
        """
        host_idx = torch.as_tensor(tile_idx, dtype=torch.long).reshape(-1).cpu()
        totals = {k: int(c[host_idx].sum()) for k, c in self._host_counts.items()}
        if isinstance(tile_idx, Tensor) and tile_idx.device == self.device:
            tile_idx = tile_idx.long().reshape(-1)
        elif self.device.type == "cuda":
            tile_idx = host_idx.pin_memory().to(self.device, non_blocking=True)
        else:
            tile_idx = host_idx.to(self.device)
        b = tile_idx.numel()
        count = self._cell_count[tile_idx]
        new_start = count.cumsum(0) - count
        total = totals["cells"]
        shift = self.cell_ptr[tile_idx] - new_start  # global row = local row + shift
        batch = torch.repeat_interleave(torch.arange(b, device=self.device), count, output_size=total)
        rows = torch.arange(total, device=self.device) + shift[batch]
        feats = None
        if self.image_features is not None:
            feats = {s: f[tile_idx].float() for s, f in self.image_features.items()}
        return TileBatch(
            x=self.x[rows],
            pos=self.pos[rows],
            batch=batch,
            edge_index=torch.cat(
                [self._gather(f"knn{g}", self.edge_index, tile_idx, -shift, totals[f"knn{g}"]) for g in range(3)], 1
            ),
            cand_meso=self._gather("cand_meso", self.cand_meso, tile_idx, -shift, totals["cand_meso"]),
            cand_macro=self._gather("cand_macro", self.cand_macro, tile_idx, -shift, totals["cand_macro"]),
            image_features=feats,
            num_tiles=b,
            tiles=None if self.tiles is None else self.tiles[tile_idx],
            edge_sections=(totals["knn0"], totals["knn1"], totals["knn2"]),
            candidates_in_blocks=True,
            boundary=None if self._boundary_cache is None else self._boundary_cache.gather(host_idx, self.device),
        )

    _boundary_cache = None  # a fine-tuning cache (a class attribute, not a field: bundles have none unless given one)

    def with_boundary_cache(self, cache: Any) -> TrainingBundle:
        """A shallow copy whose batches carry the cache's frozen-backbone outputs (``TileBatch.boundary``).

        ``cache`` is a ``sigmma_sc.model._finetune.BoundaryCache`` (or ``None`` to drop one); the tensors are shared.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._boundary_cache = cache
        return new

    # ------------------------------------------------------------------ I/O
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and JSON-able values (``torch.load(weights_only=True)``-loadable)."""
        d = {
            "format": _FORMAT,
            "version": _VERSION,
            "x": self.x.cpu(),
            "cell_ptr": self.cell_ptr.cpu(),
            "pos": self.pos.cpu(),
            "edge_index": self.edge_index.cpu(),
            "cand_meso": self.cand_meso.cpu(),
            "cand_macro": self.cand_macro.cpu(),
            "image_features": None
            if self.image_features is None
            else {s: f.cpu() for s, f in self.image_features.items()},
            "split": self.split.cpu(),
            "meta": json.loads(json.dumps(self.meta)),
        }
        if self.tiles is not None:  # only when present: bundles without tiles stay readable by older versions
            d["tiles"] = self.tiles.cpu()
        if self.section is not None:  # likewise for the sections of a cohort bundle
            d["section"] = self.section.cpu()
        return d

    def save(self, path: str | Path) -> None:
        """Write the bundle to ``path`` atomically (``torch.save`` of :meth:`state_dict`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def load(
        cls, path: str | Path | Sequence[str | Path], map_location: str | torch.device | None = None
    ) -> TrainingBundle:
        """Read a bundle written by :meth:`save` (re-validated).

        Parameters
        ----------
        path
            A bundle file, or several (one per section): they are read one by one and joined with
            :meth:`concat`, sections named by their file stems.
        map_location
            Device of the returned bundle (default: the CPU).

        Returns
        -------
        The bundle.
        """
        if not isinstance(path, str | Path):
            paths = [Path(p) for p in path]
            if not paths:
                raise ValueError("No bundle files given.")
            names = [p.stem for p in paths]
            if len(set(names)) < len(names):
                names = [str(p) for p in paths]
            bundle = cls.concat([cls.load(p) for p in paths], names=names)
            return bundle.to(map_location) if map_location is not None else bundle
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a sigmma_sc training bundle.")
        d = {k: v for k, v in d.items() if k not in ("format", "version")}
        bundle = cls(**d)
        return bundle.to(map_location) if map_location is not None else bundle

    @classmethod
    def concat(cls, bundles: Sequence[TrainingBundle], *, names: Sequence[str] | None = None) -> TrainingBundle:
        """Join the bundles of several sections into one cohort bundle (tiles in order, splits kept).

        Parameters
        ----------
        bundles
            One bundle per section (a cohort bundle counts as its sections). Their node features must live in
            one space (same ``n_features``, ``features_key`` and recorded PCA) and their image features come
            from one backbone; the tile and pixel sizes must agree.
        names
            Section names (default: ``meta['sections']`` of cohort bundles, else ``section_0``, ...).

        Returns
        -------
        The cohort bundle, on the CPU: ``section`` gives each tile's index in ``meta['sections']``; meta fields
        that differ between sections (other than the checked ones) are set to ``None``.
        """
        bundles = list(bundles)
        if not bundles or not all(isinstance(b, TrainingBundle) for b in bundles):
            raise ValueError("`concat` needs a non-empty sequence of TrainingBundle objects.")
        if names is not None and len(names) != len(bundles):
            raise ValueError(f"Got {len(names)} names for {len(bundles)} bundles.")
        section_names: list[str] = []
        codes = []
        for i, b in enumerate(bundles):
            own = list(b.meta.get("sections") or []) if b.section is not None else []
            if own and names is None:
                offset = len(section_names)
                section_names += [str(n) for n in own]
                codes.append(b.section.cpu() + offset)
            else:
                section_names.append(str(names[i]) if names is not None else f"section_{i}")
                codes.append(torch.full((b.n_tiles,), len(section_names) - 1, dtype=torch.long))
        if len(set(section_names)) < len(section_names):
            raise ValueError(f"Section names must be unique, got {section_names}.")
        first = bundles[0].meta
        for key in _CONCAT_MUST_MATCH:
            values = [b.meta.get(key) for b in bundles]
            if any(v != values[0] for v in values[1:]):
                diff = dict(zip(section_names, values, strict=False)) if key != "pca" else "differs"
                raise ValueError(
                    f"The bundles disagree on {key!r} ({diff}); node features and tiling must be shared by the "
                    "cohort: build the bundles with shared node features (`sg.tl.train_sigmma` on the sections, or "
                    "`sg.pp.cell_graph(..., pca_from=...)` / one `.obsm` embedding) and one tiling and backbone."
                )
        widths = {n: b.n_features for n, b in zip(section_names, bundles, strict=False)}
        if len(set(widths.values())) > 1:
            raise ValueError(f"The bundles disagree on 'n_features' ({widths}); node features must share one space.")
        dims = {b.image_dim for b in bundles}
        if len(dims) > 1:
            raise ValueError(f"The bundles' image features have different widths {sorted(map(str, dims))}.")
        has_tiles = {b.tiles is not None for b in bundles}
        if len(has_tiles) > 1:
            raise ValueError("Some bundles have tile images and others not; build all with `include_tiles` alike.")
        bundles = [b.to("cpu") for b in bundles]
        offsets = torch.tensor([0] + [b.n_cells for b in bundles]).cumsum(0)
        ptr = [bundles[0].cell_ptr] + [b.cell_ptr[1:] + offsets[i] for i, b in enumerate(bundles) if i > 0]
        meta = {k: v for k, v in first.items() if all(b.meta.get(k) == v for b in bundles[1:])}
        meta |= {k: None for b in bundles for k in b.meta if k not in meta}
        meta["sections"] = section_names
        feats = None
        if bundles[0].image_features is not None:
            scales = [s for s in SCALES if all(s in b.image_features for b in bundles)]
            feats = {s: torch.cat([b.image_features[s] for b in bundles]) for s in scales}
        return cls(
            x=torch.cat([b.x for b in bundles]),
            cell_ptr=torch.cat(ptr),
            pos=torch.cat([b.pos for b in bundles]),
            edge_index=torch.cat([b.edge_index + offsets[i] for i, b in enumerate(bundles)], 1),
            cand_meso=torch.cat([b.cand_meso + offsets[i] for i, b in enumerate(bundles)], 1),
            cand_macro=torch.cat([b.cand_macro + offsets[i] for i, b in enumerate(bundles)], 1),
            image_features=feats,
            split=torch.cat([b.split for b in bundles]),
            tiles=torch.cat([b.tiles for b in bundles]) if bundles[0].tiles is not None else None,
            meta=meta,
            section=torch.cat(codes),
        )

    def __repr__(self) -> str:
        feats = "none" if self.image_features is None else f"{sorted(self.image_features)} x {self.image_dim}"
        if self.tiles is not None:
            feats += f", tile images {tuple(self.tiles.shape[1:])} uint8"
        counts = [int((self.split == i).sum()) for i in range(3)]
        return (
            f"TrainingBundle({self.n_tiles} tiles (train/val/test {counts[0]}/{counts[1]}/{counts[2]}), "
            f"{self.n_cells} cells x {self.n_features} features, {self.edge_index.shape[1]} kNN edges, "
            f"{self.cand_meso.shape[1]}/{self.cand_macro.shape[1]} meso/macro candidates, image features {feats}"
            + (f", {len(self.meta['sections'])} sections" if self.section is not None else "")
            + f", device {self.device})"
        )
