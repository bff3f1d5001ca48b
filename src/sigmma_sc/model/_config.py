"""Hyper-parameters of a SIGMMA model: defaults that train a section of any size, and the paper's Table 3 preset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._constants import SCALES
from .._utils._json import jsonable
from ..nn._gnn import check_graph

PRECISIONS = ("fp32", "tf32", "bf16")
SCHEDULES = ("cosine", "step")
SELECT_BY = ("retrieval", "loss")
FINETUNE_CACHES = ("auto", "memory", "disk", "off")

#: The paper's Table 3 training settings (Suppl. D): AdamW lr 1e-4, StepLR, 100 epochs, full batches of 1280 tiles,
#: no warm-up, no early stopping, no gradient clipping. ``preset="paper"`` applies them.
PAPER_PRESET: dict[str, Any] = {
    "hidden": 512,
    "out_dim": 512,
    "dropout": 0.1,
    "temperature": 0.01,
    "lr": 1e-4,
    "weight_decay": 1e-3,
    "epochs": 100,
    "steps": None,
    "schedule": "step",
    "step_size": 100,
    "gamma": 0.1,
    "warmup": 0.0,
    "batch_size": 1280,
    "max_batch_fraction": 1.0,
    "patience": None,
    "max_grad_norm": None,
    "select_by": "loss",
}
PRESETS = ("default", "paper")


@dataclass
class SigmmaConfig:
    """Architecture and training hyper-parameters; round-trips through JSON.

    The architecture defaults follow the paper's Table 3 (hidden/out 512, 2 GNN layers, dropout 0.1, InfoNCE
    temperature 0.01). The training defaults do not: Table 3's full batches of 1280 tiles at lr 1e-4 for 100
    epochs give a section with a few hundred training tiles one optimiser step per epoch, 100 steps in all, and
    the model stays at chance (measured on the demo, see ``BENCHMARKS.md``). The defaults here are a budget in
    optimiser steps (``steps=1000``), batches of at most a quarter of the training tiles (``batch_size=256``,
    ``max_batch_fraction=0.25``), AdamW at lr 1e-3 with a linear warm-up over the first 5 % of the steps and a
    cosine decay, gradient-norm clipping at 1, and model selection and early stopping on validation retrieval
    (``select_by="retrieval"``, ``patience=300`` steps). They were chosen on validation tiles only
    (``benchmarks/train_defaults.py sweep``).
    ``sigmma_sc.model._config.PAPER_PRESET`` (``SigmmaConfig.preset("paper", ...)``) restores Table 3.

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
        Gumbel-sigmoid temperature of the edge sampler (not given in the paper; 1.0). It shapes the straight-through
        gradient only: the sampled edges are Bernoulli draws with the scorer's probability ``s_uv`` at any
        temperature (:class:`~sigmma_sc.nn.EdgeSampler`).
    edge_evaluation
        Edge weights at evaluation (embedding, validation): ``"threshold"`` (default: keep a candidate when
        ``s_uv > 0.5``, the most likely sample; an untrained scorer keeps an arbitrary half) or ``"expected"``
        (weight every candidate by ``s_uv``, the expected value of its training-time sample).
    scales
        Scales trained and embedded (a subset of ``("micro", "meso", "macro")``; one scale = Table 5 ablation).
    use_graph
        Cell graph + GNN (``False``: BLEEP-style MLP on the mean node features).
    edge_addition
        Stochastic edge addition (``False``: fixed block-restricted kNN graphs).
    graph
        ``"hierarchical"`` (default: micro -> meso -> macro graphs with the neighbour-patch constraint) or
        ``"tile"``: one GNN over the tile's plain kNN graph, pooled once (the paper's single-scale graph row of
        Table 5; needs ``scales=("macro",)`` and ``edge_addition=False``).
    edges
        The GNN's edges: ``"spatial"`` (default: the cell graphs), ``"none"`` (the no-edges control: the same GNN
        depth, attention pooling and heads with no edge at all, so no message passing), ``"rewired"`` (the
        rewired-edges control: every edge set's targets permuted at random inside its blocks, degrees kept) or
        ``"rewired_tile"`` (the same across the whole tile: no arrangement left in the graph; see
        :class:`~sigmma_sc.nn.HierarchicalGraphEncoder`). Needs ``use_graph=True``.
    lr, weight_decay
        AdamW parameters (``lr`` is the peak learning rate after warm-up).
    steps
        Budget of optimiser steps (``None``: no step budget, ``epochs`` decides). Training stops after
        ``steps`` steps or ``epochs`` epochs, whichever comes first, or earlier by early stopping.
    epochs
        Budget of passes over the training tiles (``None``: no epoch budget). The paper: 100.
    schedule
        Learning-rate schedule per optimiser step after the warm-up: ``"cosine"`` (decay to 1 % of ``lr`` at the
        end of the budget) or ``"step"`` (the paper's StepLR: multiply by ``gamma`` every ``step_size`` epochs).
    warmup
        Fraction of the step budget with a linear learning-rate warm-up from 0 (0: none).
    step_size, gamma
        ``schedule="step"``: multiply the learning rate by ``gamma`` every ``step_size`` epochs.
    batch_size
        Tiles per optimiser step; all of them are each other's negatives (cross-micro-batch negatives are kept
        under GradCache accumulation, see ``micro_batch``). Capped by ``max_batch_fraction``.
    max_batch_fraction
        The batch is at most this fraction of the training tiles (at least 8 tiles, or all of them if fewer),
        so that a small section still gets several optimiser steps per epoch. ``1.0``: full batches (paper).
    patience
        Early stopping: stop when the validation criterion (``select_by``) has not improved for this many
        optimiser steps (checked after every epoch; never during the warm-up). ``None``: train the whole budget.
        The weights of the best validation epoch are kept in either case.
    select_by
        The validation criterion that picks the kept weights and drives early stopping: ``"retrieval"``
        (default: the mean normalised rank of each validation tile's cross-modal partner,
        ``partner_rank``, 0 = perfect, 0.5 = chance) or ``"loss"`` (the
        validation InfoNCE, as the paper). The loss also rewards confident similarities, and on small sections it
        can rise while retrieval still improves (the model grows overconfident on the tiles it gets wrong), so
        selecting on it keeps near-initial weights there (``BENCHMARKS.md``, issue 14). Both are recorded in the
        history (``val_loss``, ``val_rank``).
    max_grad_norm
        Clip the global gradient norm of every step to this value (``None``: no clipping). The pre-clipping
        norm is recorded in the history (``grad_norm``).
    micro_batch
        Tiles per forward pass under GradCache accumulation (``None``: the whole batch at once, unless it would
        not fit: on a GPU, an out-of-memory error halves it and retries the step; on a CPU, where running out
        of memory kills the process, it is planned before training from the cells and edges of the tiles and
        the free memory, and logged). The micro-batch changes memory and time, not the model: every random
        draw (dropout, edge sampling) is the whole batch's, so a seed trains the same model (to float rounding)
        with any micro-batch.
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
    finetune_cache
        With fine-tuning: where the output of the backbone's frozen part (a CNN's feature map before its last
        blocks, a ViT's tokens before block ``L - finetune_blocks``) is cached, computed once per train/val tile
        before training so that a step runs only the trainable blocks, the heads and the GNN. ``"auto"`` (default):
        in memory when it takes at most half of the available memory, else memory-mapped on disk in ``cache_dir``;
        ``"memory"`` or ``"disk"`` force one; its size is logged first and training refuses (``MemoryError``, naming
        the fixes) when it fits nowhere. ``"off"``: no cache, every crop re-encoded through the whole backbone at
        every step (e.g. for augmentation). Same features and gradients either way (to float rounding).
    cache_dir
        Directory of a memory-mapped fine-tuning cache (default: the temporary directory); the file is unlinked
        as soon as it is mapped, so nothing is left behind.
    learn_temperature
        Learn the InfoNCE temperature (CLIP's logit scale, ``1 / temperature``, learned in log space from
        ``temperature`` and clamped to at most 100, i.e. a temperature of at least 0.01). ``False``: fixed.
    uniformity
        Weight of a uniformity term (Wang & Isola 2020: ``log mean exp(-2 ||z_i - z_j||^2)`` over the batch's
        pairs of tiles, per scale and modality) added to the loss, which spreads the embeddings over the sphere
        against dimensional collapse. ``0``: none.
    head_weight_decay
        AdamW weight decay of the projection heads (``None``: ``weight_decay``, as the rest of the model).
    head_layers
        Linear layers of each projection head: ``2`` (default: Linear, LeakyReLU, dropout, Linear) or ``1`` (one
        linear map).
    """

    n_features: int
    image_dim: int
    hidden: int = 512
    out_dim: int = 512
    layers_per_scale: int = 2
    dropout: float = 0.1
    temperature: float = 0.01
    tau_e: float = 1.0
    edge_evaluation: str = "threshold"
    scales: tuple[str, ...] = SCALES
    use_graph: bool = True
    edge_addition: bool = True
    graph: str = "hierarchical"
    edges: str = "spatial"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    steps: int | None = 1000
    epochs: int | None = None
    schedule: str = "cosine"
    warmup: float = 0.05
    step_size: int = 100
    gamma: float = 0.1
    batch_size: int = 256
    max_batch_fraction: float = 0.25
    patience: int | None = 300
    max_grad_norm: float | None = 1.0
    select_by: str = "retrieval"
    micro_batch: int | None = None
    backbone: str = "efficientnet_lite0"
    backbone_info: dict[str, Any] | None = field(default=None)
    finetune_blocks: int = 0
    backbone_pretrained: bool = True
    backbone_weights: str | None = None
    backbone_lr: float = 1e-5
    precision: str = "fp32"
    seed: int = 0
    finetune_cache: str = "auto"
    cache_dir: str | None = None
    learn_temperature: bool = False
    uniformity: float = 0.0
    head_weight_decay: float | None = None
    head_layers: int = 2

    def __post_init__(self) -> None:
        given = (self.scales,) if isinstance(self.scales, str) else tuple(self.scales)
        if not given or set(given) - set(SCALES):
            raise ValueError(f"`scales` must be a non-empty subset of {SCALES}, got {given!r}.")
        self.scales = tuple(s for s in SCALES if s in given)
        check_graph(
            self.graph, scales=self.scales, edge_addition=self.edge_addition, use_graph=self.use_graph, edges=self.edges
        )
        for name in ("n_features", "image_dim", "hidden", "out_dim", "layers_per_scale", "step_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.steps is None and self.epochs is None:
            raise ValueError("Give a training budget: `steps` (optimiser steps) or `epochs` (or both).")
        for name in ("steps", "epochs", "patience"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"`{name}` must be None or >= 1, got {value}.")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"`select_by` must be one of {SELECT_BY}, got {self.select_by!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"`warmup` must be a fraction in [0, 1), got {self.warmup}.")
        if not 0 < self.max_batch_fraction <= 1:
            raise ValueError(f"`max_batch_fraction` must be in (0, 1], got {self.max_batch_fraction}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"`max_grad_norm` must be None or positive, got {self.max_grad_norm}.")
        if self.batch_size < 2:
            raise ValueError(f"`batch_size` must be >= 2 (in-batch negatives), got {self.batch_size}.")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"`micro_batch` must be None or >= 1, got {self.micro_batch}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if self.edge_evaluation not in ("threshold", "expected"):
            raise ValueError(f"`edge_evaluation` must be 'threshold' or 'expected', got {self.edge_evaluation!r}.")
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
        if self.finetune_cache not in FINETUNE_CACHES:
            raise ValueError(f"`finetune_cache` must be one of {FINETUNE_CACHES}, got {self.finetune_cache!r}.")
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        if self.uniformity < 0:
            raise ValueError(f"`uniformity` must be >= 0 (0: no uniformity term), got {self.uniformity}.")
        if self.head_weight_decay is not None and self.head_weight_decay < 0:
            raise ValueError(f"`head_weight_decay` must be None or >= 0, got {self.head_weight_decay}.")
        if self.head_layers not in (1, 2):
            raise ValueError(f"`head_layers` must be 1 or 2, got {self.head_layers}.")

    @classmethod
    def preset(cls, name: str = "default", **fields_: Any) -> SigmmaConfig:
        """A config from a named preset, with ``fields_`` overriding it.

        ``"default"``: the dataclass defaults (a step budget with warm-up, cosine decay, early stopping and
        clipping). ``"paper"``: ``sigmma_sc.model._config.PAPER_PRESET`` (Table 3). Giving only ``epochs`` with the default preset
        turns the step budget off (``steps=None``), so ``epochs=40`` means 40 epochs.
        """
        if name not in PRESETS:
            raise ValueError(f"`preset` must be one of {PRESETS}, got {name!r}.")
        base = dict(PAPER_PRESET) if name == "paper" else {}
        if fields_.get("epochs") is not None and "steps" not in fields_:
            base["steps"] = None
        return cls(**(base | fields_))

    def batch_for(self, n_train: int) -> int:
        """Tiles per optimiser step for ``n_train`` training tiles (``batch_size`` capped by ``max_batch_fraction``)."""
        cap = max(int(self.max_batch_fraction * n_train), min(8, n_train))
        return max(2, min(int(self.batch_size), cap, n_train))

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
