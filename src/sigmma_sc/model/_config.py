"""Hyper-parameters of a SIGMMA model (paper Table 3 defaults)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._constants import SCALES
from .._utils._json import jsonable

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class SigmmaConfig:
    """Architecture and training hyper-parameters; round-trips through JSON.

    Defaults follow the paper's Table 3 (Suppl. D): hidden/out 512, 2 GNN layers, dropout 0.1,
    InfoNCE temperature 0.01, AdamW (lr 1e-4, weight decay 1e-3), StepLR (step 100 epochs, gamma 0.1),
    100 epochs, effective batch 1280 tiles.

    Attributes
    ----------
    n_features
        Node feature width ``F`` (Table 3: 384 for STEM features).
    image_dim
        Width of the cached backbone features ``D`` (1024 for UNI, 1280 for EfficientNet-Lite0).
    hidden
        Width of the GNN layers and of the pooled ST vectors.
    out_dim
        Width of the shared embedding space (projection heads).
    layers_per_scale
        SAGE layers per scale.
    dropout
        Dropout of the GNN and the projection heads.
    temperature
        InfoNCE temperature.
    tau_e
        Gumbel-sigmoid temperature of the edge sampler (not given in the paper; 1.0).
    scales
        Scales trained and embedded (a subset of ``("micro", "meso", "macro")``; one scale = Table 5 ablation).
    use_graph
        Cell graph + GNN (``False``: BLEEP-style MLP on the mean node features).
    edge_addition
        Stochastic edge addition (``False``: fixed block-restricted kNN graphs).
    lr, weight_decay
        AdamW parameters.
    epochs
        Training epochs.
    step_size, gamma
        StepLR: multiply the learning rate by ``gamma`` every ``step_size`` epochs.
    batch_size
        Tiles per optimiser step; all of them are each other's negatives.
    micro_batch
        Tiles per forward pass under GradCache accumulation (``None``: the whole batch at once).
    backbone
        Name of the image backbone (a :func:`~sigmma_sc.nn.build_backbone` name): the one the cached features
        were computed with, or the one fine-tuned.
    backbone_info
        Its :class:`~sigmma_sc.nn.BackboneInfo` as a dict (optional; with fine-tuning, its ``input_size``,
        ``mean`` and ``std`` override the backbone's defaults).
    finetune_blocks
        Backbone blocks to fine-tune. ``0`` (default): frozen backbone, training on the bundle's cached
        ``image_features``. ``N > 0``: the model holds the backbone, its last ``N`` blocks (and final norm /
        head conv) train with the heads and the GNN, and the image side is encoded from the bundle's ``tiles``
        at every step (bf16 autocast on CUDA).
    backbone_pretrained
        With fine-tuning: start from the backbone's pretrained weights (``False``: random initialisation).
    backbone_weights
        With fine-tuning: a local state-dict file for the ``backbone`` architecture (overrides
        ``backbone_pretrained``).
    backbone_lr
        Learning rate of the fine-tuned backbone parameters (the heads and the GNN use ``lr``).
    precision
        Arithmetic of the training and validation steps on CUDA (ignored on the CPU, which is always float32):
        ``"fp32"`` (default, full float32), ``"tf32"`` (TensorFloat-32 matmuls, float32 storage) or ``"bf16"``
        (bf16 autocast of the forward pass, with TF32 for the remaining float32 matmuls; attention pooling and
        the loss stay in float32). The backbone of a fine-tuned model always runs under bf16 autocast on CUDA.
    seed
        Seed of the parameter initialisation (and the default training seed).
    """

    n_features: int
    image_dim: int
    hidden: int = 512
    out_dim: int = 512
    layers_per_scale: int = 2
    dropout: float = 0.1
    temperature: float = 0.01
    tau_e: float = 1.0
    scales: tuple[str, ...] = SCALES
    use_graph: bool = True
    edge_addition: bool = True
    lr: float = 1e-4
    weight_decay: float = 1e-3
    epochs: int = 100
    step_size: int = 100
    gamma: float = 0.1
    batch_size: int = 1280
    micro_batch: int | None = None
    backbone: str = "efficientnet_lite0"
    backbone_info: dict[str, Any] | None = field(default=None)
    finetune_blocks: int = 0
    backbone_pretrained: bool = True
    backbone_weights: str | None = None
    backbone_lr: float = 1e-5
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        given = (self.scales,) if isinstance(self.scales, str) else tuple(self.scales)
        if not given or set(given) - set(SCALES):
            raise ValueError(f"`scales` must be a non-empty subset of {SCALES}, got {given!r}.")
        self.scales = tuple(s for s in SCALES if s in given)
        for name in ("n_features", "image_dim", "hidden", "out_dim", "layers_per_scale", "epochs", "step_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.batch_size < 2:
            raise ValueError(f"`batch_size` must be >= 2 (in-batch negatives), got {self.batch_size}.")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"`micro_batch` must be None or >= 1, got {self.micro_batch}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if self.temperature <= 0 or self.tau_e <= 0:
            raise ValueError("`temperature` and `tau_e` must be positive.")
        if int(self.finetune_blocks) < 0:
            raise ValueError(f"`finetune_blocks` must be >= 0, got {self.finetune_blocks}.")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("`lr` and `backbone_lr` must be positive.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.backbone_weights is not None:
            self.backbone_weights = str(self.backbone_weights)
        if self.backbone_info is not None:  # plain types: read back from zarr it holds numpy arrays
            self.backbone_info = jsonable(dict(self.backbone_info))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SigmmaConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"Unknown SigmmaConfig fields: {sorted(unknown)}.")
        d = dict(d)
        if "scales" in d:
            d["scales"] = tuple(d["scales"])
        return cls(**d)

    def to_json(self) -> str:
        """JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> SigmmaConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))
