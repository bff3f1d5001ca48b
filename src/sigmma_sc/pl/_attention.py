"""``sg.pl.attention``: class-token-to-patch attention of each head of a ViT block, over the tile (paper Fig. 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._utils import save_figure

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def attention(
    backbone: Any,
    tile_image: np.ndarray,
    *,
    block: int = -1,
    heads: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Class-token-to-patch attention of each head of a ViT block, overlaid on the tile (paper Fig. 6).

    The tile is resized to the backbone's input size and normalised as the backbone expects; a forward
    hook on ``backbone.blocks[block].attn`` captures the block's input tokens, and the attention weights
    ``softmax(q k^T / sqrt(d))`` are recomputed from the module's ``qkv`` projection (timm's fused
    attention does not return them). Row ``i`` of the figure shows the tile and the class token's
    attention to every patch for each head of model ``i``, min-max scaled per head; pass the backbone
    before and after fine-tuning to compare them.

    Parameters
    ----------
    backbone
        A timm vision transformer (e.g. from :func:`sigmma_sc.nn.build_backbone`), a module holding one
        as ``.backbone`` (:class:`~sigmma_sc.nn.MultiCropEncoder`), or several of these as a list or a
        dict label -> model (one row each).
    tile_image
        The tile, ``(C, H, W)`` or ``(H, W, C)``, uint8 or float in ``[0, 1]`` (1 channel is replicated),
        e.g. from :func:`sigmma_sc.data.iter_tile_images`.
    block
        Transformer block whose attention is shown (default: the last).
    heads
        Heads to show (default: all).
    labels
        Row labels (default: the dict keys, ``'model 1'``, ... or the backbone's name).
    mask
        Optional ``(H, W)`` cell mask or label image of the tile, drawn as a blue contour on every panel
        (the paper overlays the Xenium cell segmentation).
    alpha
        Opacity of the attention maps.
    cmap
        Colormap of the attention maps.
    figsize
        Figure size in inches (default: 1.8 inch per panel).
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (several panels).
    """
    import matplotlib.pyplot as plt

    models, names = _as_models(backbone, labels)
    img = _as_hwc(tile_image)
    maps = [_cls_attention(m, img, block=block, info=info) for m, info in models]
    n_heads = {m.shape[0] for m in maps}
    heads = list(range(min(n_heads))) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < min(n_heads)]
    if bad:
        raise ValueError(f"Heads {bad} out of range: the block has {min(n_heads)} heads.")
    nrows, ncols = len(maps), len(heads) + 1
    fig, axes = plt.subplots(
        nrows, ncols, figsize=figsize or (1.8 * ncols + 0.6, 1.9 * nrows + 0.3), squeeze=False, layout="constrained"
    )
    h, w = img.shape[:2]
    shown = img if img.shape[2] == 3 else np.repeat(img, 3, axis=2)
    mappable = None
    for r, (att, name) in enumerate(zip(maps, names, strict=True)):
        axes[r, 0].imshow(shown, extent=(0, w, h, 0))
        axes[r, 0].set_ylabel(name, fontsize="small")
        if r == 0:
            axes[r, 0].set_title("tile", fontsize="small")
        for c, head in enumerate(heads, start=1):
            a = att[head]
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            ax = axes[r, c]
            ax.imshow(shown, extent=(0, w, h, 0))
            mappable = ax.imshow(
                a, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear"
            )
            if r == 0:
                ax.set_title(f"head {head + 1}", fontsize="small")
        for ax in axes[r]:
            if mask is not None:
                _contour(ax, mask, (h, w))
            ax.set_xticks([])
            ax.set_yticks([])
    if mappable is not None:
        cb = fig.colorbar(mappable, ax=axes[:, -1].tolist(), shrink=0.8, pad=0.02)
        cb.set_label("attention (min-max per head)", fontsize="x-small")
        cb.ax.tick_params(labelsize="x-small")
    which = "last block" if block == -1 else f"block {block}"
    fig.suptitle(f"Class-token attention to patches, {which}", fontsize="medium")
    save_figure(fig, save)
    return fig


def _as_models(backbone: Any, labels: Sequence[str] | None) -> tuple[list[tuple[Any, Any]], list[str]]:
    if isinstance(backbone, Mapping):
        items, default = list(backbone.values()), [str(k) for k in backbone]
    elif isinstance(backbone, list | tuple):
        items, default = list(backbone), [f"model {i + 1}" for i in range(len(backbone))]
    else:
        items, default = [backbone], None
    if not items:
        raise ValueError("`backbone` is empty.")
    models = []
    for obj in items:
        info = getattr(obj, "info", None)
        module = obj.backbone if hasattr(obj, "backbone") and hasattr(obj.backbone, "blocks") else obj
        if not (hasattr(module, "blocks") and hasattr(module, "patch_embed")):
            raise TypeError(
                f"Expected a vision transformer with `blocks` and `patch_embed` (e.g. "
                f"`sg.nn.build_backbone('vit_small_patch16_224')[0]`), got {type(module).__name__}."
            )
        models.append((module, info))
    if labels is not None:
        if len(labels) != len(models):
            raise ValueError(f"Got {len(labels)} labels for {len(models)} models.")
        names = [str(x) for x in labels]
    elif default is not None:
        names = default
    else:
        info = models[0][1]
        names = [getattr(info, "name", None) or type(models[0][0]).__name__]
    return models, names


def _as_hwc(tile: np.ndarray) -> np.ndarray:
    """The tile as ``(H, W, C)`` float32 in ``[0, 1]``."""
    arr = np.asarray(tile)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"`tile_image` must be (C, H, W) or (H, W, C), got shape {arr.shape}.")
    if arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    return np.clip(arr / 255.0 if arr.max() > 1.0 else arr, 0.0, 1.0)


def _normalisation(module: Any, info: Any) -> tuple[int, int, tuple, tuple]:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    mean, std = _IMAGENET
    if info is not None:
        mean, std = tuple(info.mean), tuple(info.std)
    elif cfg.get("mean") is not None:
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    size = getattr(info, "input_size", None)
    if size is None:
        img_size = getattr(module.patch_embed, "img_size", None)
        size = cfg.get("input_size", (3, 224, 224))[-1] if img_size is None else img_size
    hs, ws = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    return int(hs), int(ws), mean, std


def _cls_attention(module: Any, img: np.ndarray, *, block: int, info: Any = None) -> np.ndarray:
    """Class-token (or, without one, mean-token) attention to each patch: ``(heads, grid_h, grid_w)``."""
    import torch
    import torch.nn.functional as F

    try:
        attn = module.blocks[block].attn
    except IndexError as e:
        raise IndexError(f"Block {block} out of range: the backbone has {len(module.blocks)} blocks.") from e
    if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise TypeError(
            f"Block {block}'s attention ({type(attn).__name__}) has no fused `qkv` projection; only timm ViT-style "
            "attention modules are supported."
        )
    hs, ws = _normalisation(module, info)[:2]
    mean, std = _normalisation(module, info)[2:]
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0)))[None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(hs, ws), mode="bilinear", antialias=True, align_corners=False)
    param = next(module.parameters())
    x = ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).to(param.device, param.dtype)

    captured: dict[str, torch.Tensor] = {}

    def hook(_mod, args, _out):
        captured["x"] = args[0].detach()

    handle = attn.register_forward_hook(hook)
    was = module.training
    try:
        module.eval()
        with torch.inference_mode():
            module.forward_features(x) if hasattr(module, "forward_features") else module(x)
            tokens = captured["x"]
            b, n, _ = tokens.shape
            heads = int(attn.num_heads)
            qkv = attn.qkv(tokens).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            q, k = getattr(attn, "q_norm", torch.nn.Identity())(q), getattr(attn, "k_norm", torch.nn.Identity())(k)
            scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
            weights = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)[0].float().cpu()  # (heads, n, n)
    finally:
        handle.remove()
        module.train(was)
    n_prefix = int(getattr(module, "num_prefix_tokens", 1))
    patch = module.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    gh, gw = hs // ph, ws // pw
    if n - n_prefix != gh * gw:
        raise ValueError(f"Expected {gh * gw} patch tokens after {n_prefix} prefix tokens, got {n - n_prefix}.")
    has_cls = getattr(module, "cls_token", None) is not None
    rows = weights[:, 0] if has_cls else weights[:, n_prefix:].mean(1)
    return rows[:, n_prefix:].reshape(heads, gh, gw).numpy()


def _contour(ax, mask: np.ndarray, hw: tuple[int, int]) -> None:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"`mask` must be a 2D (H, W) array, got shape {m.shape}.")
    h, w = hw
    edges = _label_edges(m)
    ys = (np.arange(m.shape[0]) + 0.5) * h / m.shape[0]
    xs = (np.arange(m.shape[1]) + 0.5) * w / m.shape[1]
    ax.contour(xs, ys, edges.astype(float), levels=[0.5], colors="#1f4fff", linewidths=0.6)


def _label_edges(m: np.ndarray) -> np.ndarray:
    """Foreground for a boolean mask; for a label image, the foreground minus the borders between cells."""
    fg = m > 0
    if m.dtype == bool or np.unique(m).size <= 2:
        return fg
    inner = fg.copy()
    inner[1:] &= m[1:] == m[:-1]
    inner[:-1] &= m[:-1] == m[1:]
    inner[:, 1:] &= m[:, 1:] == m[:, :-1]
    inner[:, :-1] &= m[:, :-1] == m[:, 1:]
    return inner
