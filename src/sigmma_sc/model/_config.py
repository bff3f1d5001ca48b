"""Hyper-parameters of a SIGMMA model (paper Table 3 defaults)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._constants import SCALES


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
        Name of the image backbone the features were computed with.
    backbone_info
        Its :class:`~sigmma_sc.nn.BackboneInfo` as a dict (optional).
    finetune_blocks
        Backbone blocks to fine-tune (only 0, frozen cached features, is supported by :meth:`SigmmaModel.fit`).
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
