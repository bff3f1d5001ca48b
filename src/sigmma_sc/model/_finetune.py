"""Backbone fine-tuning parts of :class:`SigmmaModel`: building the image encoder and encoding tile pixels."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..nn._image_encoder import MultiCropEncoder, build_backbone


def build_image_encoder(
    backbone: str,
    backbone_info: Mapping[str, Any] | None,
    *,
    finetune_blocks: int,
    pretrained: bool,
    weights: str | None,
    seed: int,
) -> MultiCropEncoder:
    """The fine-tunable :class:`~sigmma_sc.nn.MultiCropEncoder` of a model.

    A random initialisation is drawn from ``seed`` (reproducible; the caller's RNG is untouched). ``input_size``/``mean``/``std`` of ``backbone_info`` (e.g. a smaller crop
    size the cached features were computed at) override the backbone's defaults.
    """
    model, info = build_backbone(backbone, pretrained=pretrained and weights is None, weights=weights, seed=seed)
    if backbone_info:
        if "num_features" in backbone_info and int(backbone_info["num_features"]) != info.num_features:
            raise ValueError(
                f"`backbone_info` describes a backbone with {backbone_info['num_features']} features but "
                f"{backbone!r} has {info.num_features}."
            )
        given = {k: backbone_info[k] for k in ("input_size", "mean", "std") if k in backbone_info}
        if given:
            info = dataclasses.replace(
                info,
                **{k: int(v) if k == "input_size" else tuple(float(x) for x in v) for k, v in given.items()},
            )
    return MultiCropEncoder(model, info, finetune_blocks=finetune_blocks)


def encode_tiles(encoder: MultiCropEncoder, tiles: Tensor, scales: Sequence[str]) -> dict[str, Tensor]:
    """Float32 multi-crop features of ``(B, C, H, W)`` tiles (bf16 autocast on CUDA; autograd as the caller's)."""
    cuda = tiles.device.type == "cuda"
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        feats = encoder(tiles, scales)
    return {s: f.float() for s, f in feats.items()}


def as_tile_tensor(tiles: Tensor | np.ndarray) -> Tensor:
    """``(T, C, H, W)`` tile images as a tensor (``uint8`` 0..255 or float in ``[0, 1]``), validated."""
    t = torch.as_tensor(np.asarray(tiles) if not isinstance(tiles, Tensor) else tiles)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"`tiles` must have shape (T, C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}.")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"`tiles` must be uint8 (0..255) or float in [0, 1], got {t.dtype}.")
    return t


def optimizer_groups(model: torch.nn.Module, encoder: MultiCropEncoder | None, lr: float, backbone_lr: float) -> list:
    """AdamW parameter groups: the trainable heads/GNN at ``lr`` (group 0), the trainable backbone at ``backbone_lr``.

    Frozen parameters (``requires_grad=False``) are left out, so the optimiser never touches them.
    """
    backbone = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
    ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr})
    return groups
