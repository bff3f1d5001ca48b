"""SigmmaModel: the image heads, the hierarchical ST encoder and the ST heads; fit, save and load."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils._json import jsonable
from .._utils._version import package_version
from ..nn._gnn import HierarchicalGraphEncoder
from ..nn._loss import ProjectionHead, multiscale_info_nce, uniformity_loss
from ..train._determinism import deterministic_on_cpu
from ..train._memory import inference_chunks
from ..train._trainer import Callback, Trainer
from ._bundle import TileBatch, TrainingBundle
from ._config import SigmmaConfig
from ._finetune import (
    as_tile_tensor,
    build_boundary_cache,
    build_image_encoder,
    encode_cached,
    encode_tiles,
    optimizer_groups,
    plan_boundary_cache,
)
from ._inference import (
    LinearProbe,
    RetrievalReference,
    inference_tiling,
    probes_from_dict,
    probes_to_dict,
    reference_from_dict,
)

#: upper clamp of a learned logit scale (CLIP's 100: a temperature of at least 0.01)
MAX_LOGIT_SCALE = 100.0
_FORMAT = "sigmma_sc.SigmmaModel"
_VERSION = 1


class SigmmaModel(nn.Module):
    """SIGMMA: multi-scale contrastive alignment of tile images and cell graphs (paper §3).

    Per scale ``s``: the cached backbone features of the tile (mean of the crop features, L2-normalised
    as in the paper's Suppl. D.1) go through an image projection head; the hierarchical graph encoder's
    pooled tile vector goes through an ST projection head; both land L2-normalised in a shared
    ``out_dim``-dimensional space where the loss is ``sum_s InfoNCE_sym(z_s^I, z_s^S)``.

    With ``config.finetune_blocks = N > 0`` the model also holds the backbone as :attr:`image_encoder`
    (a :class:`~sigmma_sc.nn.MultiCropEncoder` whose last ``N`` blocks train) and the image features are
    computed from the tile pixels (``TileBatch.tiles``) instead of read from the cache.

    Parameters
    ----------
    config
        Hyper-parameters (:class:`SigmmaConfig`). Parameters are initialised from ``config.seed``
        (without touching the global RNG).
    meta
        JSON-able information saved with the model (feature names, backbone, ...).
    image_encoder
        With fine-tuning, a prebuilt encoder (default: built from ``config.backbone``,
        ``config.backbone_pretrained``, ``config.backbone_weights`` and ``config.backbone_info``). Its
        feature width must equal ``config.image_dim``.

    Attributes
    ----------
    history
        One dict per trained epoch: ``epoch``, ``step`` (optimiser steps so far), ``train_loss``, ``val_loss``,
        their chance levels ``train_chance`` / ``val_chance`` (the loss of embeddings that carry no information:
        ``ln(batch)`` per scale), ``val_rank`` (mean normalised partner rank of the validation tiles, chance 0.5,
        ``partner_rank``), ``lr``, ``grad_norm`` (mean pre-clipping gradient norm), ``seconds`` and, with
        edge addition, per coarser scale ``s``: ``edge_sampled_{s}`` (fraction of candidate edges sampled on),
        ``edge_prob_{s}`` (mean edge probability), ``edge_candidates_{s}`` (candidates per batch) and
        ``edge_grad_{s}`` (gradient norm of the edge scorer).
    diagnostics
        Health of the trained model (``sigmma_sc.train._diagnostics.training_diagnostics``): the kept epoch
        (``best_epoch``, by ``select_by``), best validation loss and partner rank with their chance levels, mean
        pairwise cosine and participation ratio of the tile embeddings per scale, the
        warnings raised, and why training stopped.
    probes
        Name -> fitted :class:`~sigmma_sc.model.LinearProbe` of tile expression on image embeddings
        (:func:`sigmma_sc.tl.fit_probe`), saved with the model.
    reference
        ST embeddings of the training tiles (:func:`sigmma_sc.tl.attach_reference`), saved with the model, to
        retrieve the closest training tiles of a new slide's tiles.
    image_encoder
        The fine-tuned :class:`~sigmma_sc.nn.MultiCropEncoder`, or ``None`` (frozen backbone, cached features).
    """

    def __init__(
        self,
        config: SigmmaConfig,
        *,
        meta: Mapping[str, Any] | None = None,
        image_encoder: nn.Module | None = None,
    ):
        super().__init__()
        if image_encoder is None and config.finetune_blocks > 0:
            image_encoder = build_image_encoder(
                config.backbone,
                config.backbone_info,
                finetune_blocks=config.finetune_blocks,
                pretrained=config.backbone_pretrained,
                weights=config.backbone_weights,
                seed=config.seed,
            )
        if image_encoder is not None:
            if config.finetune_blocks < 1:
                raise ValueError("An `image_encoder` is only used with `config.finetune_blocks > 0`.")
            if image_encoder.info.num_features != config.image_dim:
                raise ValueError(
                    f"The backbone has {image_encoder.info.num_features} features but config.image_dim is "
                    f"{config.image_dim}."
                )
            config = dataclasses.replace(config, backbone_info=image_encoder.info.to_dict())
        self.config = config
        self.meta: dict[str, Any] = jsonable(dict(meta or {}))
        self.history: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}
        self.probes: dict[str, LinearProbe] = {}
        self.reference: RetrievalReference | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.st_encoder = HierarchicalGraphEncoder(
                config.n_features,
                hidden=config.hidden,
                out=config.hidden,
                layers_per_scale=config.layers_per_scale,
                dropout=config.dropout,
                tau_e=config.tau_e,
                edge_addition=config.edge_addition,
                use_graph=config.use_graph,
                scales=config.scales,
                graph=config.graph,
                edges=config.edges,
                edge_evaluation=config.edge_evaluation,
            )
            layers = config.head_layers
            self.image_heads = nn.ModuleDict(
                {s: ProjectionHead(config.image_dim, config.out_dim, config.dropout, layers) for s in config.scales}
            )
            self.st_heads = nn.ModuleDict(
                {s: ProjectionHead(config.hidden, config.out_dim, config.dropout, layers) for s in config.scales}
            )
        #: learned log logit scale (CLIP), only with ``config.learn_temperature``
        self.log_logit_scale = (
            nn.Parameter(torch.tensor(math.log(1.0 / config.temperature))) if config.learn_temperature else None
        )
        self.image_encoder = image_encoder  # after the heads: their initialisation does not depend on it

    @classmethod
    def from_bundle(cls, bundle: TrainingBundle, *, preset: str = "default", **config: Any) -> SigmmaModel:
        """A model sized for ``bundle`` (``n_features``, ``image_dim``; other fields from ``config``).

        ``preset`` names the starting values of the other fields (:meth:`SigmmaConfig.preset`: ``"default"``
        or ``"paper"`` for Table 3); ``config`` overrides them. The backbone fields (``backbone``,
        ``backbone_info``, ``backbone_pretrained``) default to how the bundle's cached features were computed
        (``bundle.meta``). With ``finetune_blocks > 0`` the backbone is built here (once) and ``image_dim`` is its
        feature width; the bundle then needs ``tiles`` (its cached features are not used).
        """
        meta_info = bundle.meta.get("backbone_info")
        same = "backbone" not in config or (meta_info or {}).get("name", bundle.meta.get("backbone")) == config["backbone"]
        if meta_info and same:
            config.setdefault("backbone_info", meta_info)
        if same and bundle.meta.get("backbone_pretrained") is not None and not config.get("backbone_weights"):
            # how the bundle's cached features were computed, so that sg.tl.embed accepts them
            config.setdefault("backbone_pretrained", bool(bundle.meta["backbone_pretrained"]))
        config.setdefault("backbone", bundle.meta.get("backbone") or SigmmaConfig.backbone)
        if int(config.get("finetune_blocks", 0)) > 0:
            if bundle.tiles is None:
                raise ValueError(
                    "Fine-tuning backbone blocks (finetune_blocks > 0) needs the tile images in the bundle "
                    "(`TrainingBundle(tiles=...)`, uint8 (T, C, H, W)); this bundle has none."
                )
            encoder = build_image_encoder(
                config["backbone"],
                config.get("backbone_info"),
                finetune_blocks=int(config["finetune_blocks"]),
                pretrained=config.get("backbone_pretrained", SigmmaConfig.backbone_pretrained),
                weights=config.get("backbone_weights"),
                seed=config.get("seed", SigmmaConfig.seed),
            )
            cfg = SigmmaConfig.preset(
                preset, n_features=bundle.n_features, image_dim=encoder.info.num_features, **config
            )
            return cls(cfg, meta=bundle.meta, image_encoder=encoder)
        if bundle.image_dim is None:
            raise ValueError("The bundle has no image features; compute them first (frozen backbone features).")
        cfg = SigmmaConfig.preset(preset, n_features=bundle.n_features, image_dim=bundle.image_dim, **config)
        return cls(cfg, meta=bundle.meta)

    @property
    def finetuned(self) -> bool:
        """Whether the model holds (and fine-tunes) its backbone."""
        return self.image_encoder is not None

    @property
    def scales(self) -> tuple[str, ...]:
        """Scales this model embeds."""
        return self.config.scales

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    # ------------------------------------------------------------------ differentiable forward passes
    def image_embeddings(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Image head outputs ``(B, out_dim)`` per scale (current mode, autograd on)."""
        missing = [s for s in self.scales if s not in features]
        if missing:
            raise ValueError(f"Image features are missing for scales {missing}.")
        return {s: self.image_heads[s](F.normalize(features[s].float(), dim=-1)) for s in self.scales}

    def _graph(self, batch: TileBatch) -> Any:
        return self.st_encoder(
            batch.x,
            batch.pos,
            batch.batch,
            batch.edge_index,
            batch.cand_meso,
            batch.cand_macro,
            num_tiles=batch.num_tiles,
            edge_sections=batch.edge_sections,
            candidates_in_blocks=batch.candidates_in_blocks,
        )

    def st_embeddings(self, batch: TileBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """ST tile embeddings ``(B, out_dim)`` and cell embeddings ``(n, out_dim)`` per scale (current mode)."""
        out = self._graph(batch)
        tiles = {s: self.st_heads[s](out.pooled[s]) for s in self.scales}
        cells = {s: self.st_heads[s](out.nodes[s]) for s in self.scales}
        return tiles, cells

    def batch_image_features(self, batch: TileBatch) -> dict[str, Tensor]:
        """Image features of a batch: cached (frozen backbone) or encoded from ``batch.tiles`` (fine-tuning)."""
        if self.image_encoder is not None:
            if batch.boundary is not None:  # the frozen part's cached output: only the trainable blocks run
                return encode_cached(self.image_encoder, batch.boundary, self.scales)
            if batch.tiles is None:
                raise ValueError(
                    "This model fine-tunes its backbone: batches need the tile images (`TileBatch.tiles`), "
                    "i.e. a bundle with `tiles`."
                )
            return encode_tiles(self.image_encoder, batch.tiles, self.scales)
        if batch.image_features is None:
            raise ValueError("Training needs image features; the bundle has none.")
        return batch.image_features

    def embed_batch(self, batch: TileBatch) -> dict[str, Tensor]:
        """Tile embeddings of both modalities, keys ``"image/{scale}"`` and ``"st/{scale}"``."""
        img = self.image_embeddings(self.batch_image_features(batch))
        st = self._graph(batch).pooled
        return {
            **{f"image/{s}": img[s] for s in self.scales},
            **{f"st/{s}": self.st_heads[s](st[s]) for s in self.scales},
        }

    def loss_temperature(self) -> float | Tensor:
        """The InfoNCE temperature of the loss: ``config.temperature``, or the learned one (a tensor, >= 0.01)."""
        if self.log_logit_scale is None:
            return self.config.temperature
        return 1.0 / self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @property
    def temperature(self) -> float:
        """The current InfoNCE temperature (learned with ``config.learn_temperature``, else the configured one)."""
        t = self.loss_temperature()
        return float(t.detach()) if isinstance(t, Tensor) else float(t)

    def loss_from_embeddings(self, emb: Mapping[str, Tensor]) -> Tensor:
        """``sum_s InfoNCE_sym(image/s, st/s)`` over the scales of the model, plus the uniformity term if any."""
        total, _ = multiscale_info_nce(
            {s: emb[f"image/{s}"] for s in self.scales},
            {s: emb[f"st/{s}"] for s in self.scales},
            self.loss_temperature(),
        )
        if self.config.uniformity > 0:
            for s in self.scales:
                for m in ("image", "st"):
                    total = total + 0.5 * self.config.uniformity * uniformity_loss(emb[f"{m}/{s}"])
        return total

    def forward(self, batch: TileBatch) -> Tensor:
        """Contrastive loss of a batch of tiles."""
        return self.loss_from_embeddings(self.embed_batch(batch))

    # ------------------------------------------------------------------ inference helpers
    def encode_image(
        self,
        features: Mapping[str, Tensor | np.ndarray] | TrainingBundle | None = None,
        *,
        tiles: Tensor | np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        """Image embeddings per scale; needs no ST input.

        Runs in eval mode under ``torch.inference_mode`` in chunks of ``batch_size`` tiles.

        Parameters
        ----------
        features
            Scale -> ``(T, D)`` cached backbone features (tensors or arrays), or a bundle (its
            ``image_features``; with a fine-tuned backbone its ``tiles``).
        tiles
            ``(T, C, H, W)`` tile images (``uint8`` or float in ``[0, 1]``), only for a fine-tuned model
            (:attr:`finetuned`), whose backbone changed so that cached frozen-backbone features no longer apply.
        batch_size
            Tiles per chunk (default ``config.batch_size``; 64 for tile images).

        Returns
        -------
        Scale -> ``(T, out_dim)`` float32, L2-normalised; on the CPU for a bundle or numpy/CPU input, else
        on the model's device.
        """
        if (features is None) == (tiles is None):
            raise ValueError("Pass either `features` (cached features or a bundle) or `tiles=` (tile images).")
        if isinstance(features, TrainingBundle):
            if self.finetuned:
                if features.tiles is None:
                    raise ValueError(
                        "This model fine-tuned its backbone (finetune_blocks="
                        f"{self.config.finetune_blocks}); it embeds tile images, but the bundle has no `tiles`."
                    )
                features, tiles = None, features.tiles
            elif features.image_features is None:
                raise ValueError("The bundle has no image features.")
            else:
                features = features.image_features
        if tiles is not None:
            if not self.finetuned:
                raise ValueError(
                    "This model was trained on cached frozen-backbone features and holds no backbone: compute the "
                    f"features of the tiles with backbone {self.config.backbone!r} (`sigmma_sc.nn.featurize` or "
                    "`sg.tl.featurize`) and pass them as `features`."
                )
            return self._encode_tile_images(as_tile_tensor(tiles), batch_size or 64)
        if self.finetuned:
            raise ValueError(
                f"This model fine-tuned the last {self.config.finetune_blocks} blocks of its backbone, so cached "
                "frozen-backbone features no longer match it: pass the tile images instead "
                "(`model.encode_image(tiles=...)` or a bundle with `tiles`)."
            )
        to_cpu = any(not isinstance(v, Tensor) for v in features.values()) or any(
            v.device.type == "cpu" for v in features.values()
        )
        feats = {s: torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v) for s, v in features.items()}
        n = next(iter(feats.values())).shape[0]
        bs = batch_size or self.config.batch_size
        device = self.device
        chunks: dict[str, list[Tensor]] = {s: [] for s in self.scales}
        with _eval(self), torch.inference_mode():
            for start in range(0, n, bs):
                part = {s: feats[s][start : start + bs].to(device) for s in feats if s in self.scales}
                for s, z in self.image_embeddings(part).items():
                    chunks[s].append(z.cpu() if to_cpu else z)
        return {s: torch.cat(v) if v else torch.zeros(0, self.config.out_dim) for s, v in chunks.items()}

    def _encode_tile_images(self, tiles: Tensor, batch_size: int) -> dict[str, Tensor]:
        device = self.device
        to_cpu = tiles.device.type == "cpu"
        chunks: dict[str, list[Tensor]] = {s: [] for s in self.scales}
        with _eval(self), torch.inference_mode():
            for part in tiles.split(batch_size):
                feats = encode_tiles(self.image_encoder, part.to(device, non_blocking=True), self.scales)
                for s, z in self.image_embeddings(feats).items():
                    chunks[s].append(z.cpu() if to_cpu else z)
        return {s: torch.cat(v) if v else torch.zeros(0, self.config.out_dim) for s, v in chunks.items()}

    def encode_st(
        self, data: TrainingBundle | TileBatch, *, batch_size: int | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """ST embeddings of tiles and cells per scale.

        Runs in eval mode (deterministic edges) under ``torch.inference_mode``. Cell embeddings are each
        cell's node embedding at that scale passed through the scale's ST projection head (for per-cell
        microenvironment clustering). A tile without cells gets the head's image of a zero vector.

        Parameters
        ----------
        data
            A bundle (every tile, in chunks of ``batch_size`` tiles; results on the CPU, cells in bundle
            order) or a :class:`TileBatch` (results on the model's device).
        batch_size
            Tiles per chunk (default ``config.batch_size``). On a CPU, chunks are made smaller where their
            estimated memory would exceed half of the free memory; the results do not depend on the chunks.

        Returns
        -------
        Scale -> ``(T, out_dim)`` tile embeddings and scale -> ``(N, out_dim)`` cell embeddings.
        """
        device = self.device
        with _eval(self), torch.inference_mode():
            if isinstance(data, TileBatch):
                return self.st_embeddings(data)
            bundle = data.to(device, tiles=False)
            bs = batch_size or self.config.batch_size
            tiles: dict[str, list[Tensor]] = {s: [] for s in self.scales}
            cells: dict[str, list[Tensor]] = {s: [] for s in self.scales}
            for idx in inference_chunks(self, bundle, torch.arange(bundle.n_tiles), bs):  # smaller if memory is short
                t, c = self.st_embeddings(bundle.select(idx))
                for s in self.scales:
                    tiles[s].append(t[s].cpu())
                    cells[s].append(c[s].cpu())
        return {s: torch.cat(v) for s, v in tiles.items()}, {s: torch.cat(v) for s, v in cells.items()}

    # ------------------------------------------------------------------ training
    def fit(
        self,
        bundle: TrainingBundle,
        *,
        epochs: int | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        callbacks: Sequence[Callback] | None = None,
    ) -> list[dict[str, Any]]:
        """Train on the bundle's training tiles; keep the weights of the best validation epoch.

        AdamW (``lr``, ``weight_decay``) with a per-step learning-rate schedule (linear warm-up over ``warmup``
        of the budget, then cosine decay, or the paper's StepLR), for ``config.steps`` optimiser steps or
        ``epochs`` epochs, whichever comes first, stopping early when the validation criterion
        (``config.select_by``: partner rank or loss) has not improved for ``config.patience`` steps; gradients are clipped to ``config.max_grad_norm``. Each epoch shuffles the
        training tiles (seeded generator) into batches of :meth:`SigmmaConfig.batch_for` tiles (a last partial
        batch is kept if it has at least 2 tiles), optionally accumulated over ``micro_batch`` tiles with GradCache
        (cross-micro-batch negatives kept); on CUDA out-of-memory the micro-batch is halved and the step
        retried. With ``config.finetune_blocks > 0`` the image side is encoded from the bundle's tile images
        at every step (bf16 autocast on CUDA) and the trainable backbone blocks get ``config.backbone_lr``.
        A step has no device-to-host synchronisation (batches are indexed on the host, losses are summed on
        the device and read once per epoch). The validation loss and partner rank (eval mode, deterministic
        edges) are computed after every epoch and the weights of the best epoch by ``config.select_by`` are
        restored at the end (without validation tiles: the last weights).
        The whole bundle is moved to the device once. Seeded and deterministic on CPU; the global RNG
        state of the caller is left untouched.

        Parameters
        ----------
        bundle
            Training data with image features (with fine-tuning: tile images) and a train/val split.
        epochs
            Epoch budget (default ``config.epochs``); with ``resume`` the run continues up to this number.
        device
            Torch device (``None``: ``sigmma_sc.settings.device``, else CUDA when available, else CPU).
        seed
            Training seed (shuffling, dropout, Gumbel noise; default ``config.seed``).
        checkpoint_dir
            Directory for ``last.pt``, written atomically after every epoch (model, optimiser, scheduler,
            RNG states, history, best weights).
        resume
            Continue from ``checkpoint_dir/last.pt``; reaches the same weights and history as an
            uninterrupted run with the same seed.
        progress
            Show a progress bar (also subject to ``sigmma_sc.settings.progress_bar``).
        callbacks
            :class:`~sigmma_sc.train.Callback` hooks that observe the run (loss curves, edge-sampler
            statistics, validation retrieval; :class:`~sigmma_sc.train.Trainer` runs the loop).

        Returns
        -------
        The training history, also stored in :attr:`history` (health checks in :attr:`diagnostics`).
        """
        history = Trainer(
            self,
            bundle,
            epochs=self.config.epochs if epochs is None else epochs,
            steps=self.config.steps,
            device=device,
            seed=self.config.seed if seed is None else seed,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            callbacks=callbacks,
        ).fit()
        self.history = history
        self.meta = jsonable({**bundle.meta, **self.meta})
        self.training_bundle = bundle.to(bundle.device, tiles=False)  # sg.tl.embed reuses it for the same inputs
        return history

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: the model at ``config.lr``, trainable backbone blocks at ``config.backbone_lr``."""
        return optimizer_groups(self, self.image_encoder, self.config.lr, self.config.backbone_lr)

    def plan_boundary_cache(self, n_tiles: int, device: torch.device) -> dict[str, Any]:
        """Fine-tuning: where the frozen backbone part's outputs of ``n_tiles`` tiles are cached (or an error)."""
        cfg = self.config
        return plan_boundary_cache(
            self.image_encoder, n_tiles, self.scales, mode=cfg.finetune_cache, cache_dir=cfg.cache_dir, device=device
        )

    def build_boundary_cache(self, tiles: Tensor, tile_idx: Tensor, plan: Mapping[str, Any]) -> Any:
        """Fine-tuning: the frozen backbone part run once over the tiles ``tile_idx`` (see :meth:`fit`)."""
        return build_boundary_cache(self.image_encoder, tiles, tile_idx, self.scales, plan, device=self.device)

    # ------------------------------------------------------------------ inference on new slides
    @property
    def tiling(self) -> dict[str, Any]:
        """Tiling and image modality the model was trained with (see :func:`~sigmma_sc.model.inference_tiling`)."""
        return inference_tiling(self.meta, self.config.backbone_info)

    def add_probe(self, probe: Any, name: str = "expression", *, check: np.ndarray | None = None) -> LinearProbe:
        """Attach a fitted expression probe (a :class:`~sigmma_sc.metrics.ProbeResult` or a :class:`LinearProbe`).

        Parameters
        ----------
        probe
            The probe; a ``ProbeResult`` is collapsed into one affine map.
        name
            Key in :attr:`probes` (replaces a probe of that name).
        check
            Features on which the collapsed map must reproduce the probe's predictions.

        Returns
        -------
        The stored :class:`LinearProbe`.
        """
        lp = probe if isinstance(probe, LinearProbe) else LinearProbe.from_probe_result(probe, check=check)
        # image features a new slide gives: the model's image embeddings, its fine-tuned encoder's pooled features,
        # or the frozen backbone's (sg.tl.fit_probe chooses among them on validation tiles)
        forms = [("X_sigmma_", "_image"), ("sigmma_backbone_", "")] + ([("X_sigmma_", "_encoder")] if self.finetuned else [])
        scales = {k[len(a) : len(k) - len(b)] for k in lp.embedding_keys for a, b in forms
                  if k.startswith(a) and k.endswith(b)}  # fmt: skip
        if len(scales) != len(lp.embedding_keys) or not scales <= set(self.scales):
            raise ValueError(
                f"A probe saved with the model must read image features of this model's scales {list(self.scales)}: "
                f"X_sigmma_{{scale}}_image, sigmma_backbone_{{scale}}"
                + (" or X_sigmma_{scale}_encoder" if self.finetuned else "")
                + f"; got {lp.embedding_keys}."
            )
        self.probes[str(name)] = lp
        return lp

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> None:
        """Write the model to one file, atomically.

        Config, weights (with fine-tuning: the whole backbone), meta, history, probes and retrieval reference,
        as plain python and tensors (``torch.load(weights_only=True)`` reads it).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "sigmma_sc_version": package_version(),
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "meta": self.meta,
            "history": self.history,
            "diagnostics": self.diagnostics,
            "probes": probes_to_dict(self.probes),
            "reference": None if self.reference is None else self.reference.to_dict(),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = None) -> SigmmaModel:
        """Read a model written by :meth:`save` (in eval mode, on ``map_location`` or the CPU)."""
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a saved SigmmaModel.")
        config = SigmmaConfig.from_dict(d["config"])
        encoder = None
        if config.finetune_blocks > 0:  # the architecture only: every backbone weight is in the state dict
            encoder = build_image_encoder(
                config.backbone,
                config.backbone_info,
                finetune_blocks=config.finetune_blocks,
                pretrained=False,
                weights=None,
                seed=config.seed,
            )
        model = cls(config, meta=d.get("meta"), image_encoder=encoder)
        model.load_state_dict(d["state_dict"])
        model.history = list(d.get("history") or [])
        model.diagnostics = dict(d.get("diagnostics") or {})
        model.probes = probes_from_dict(d.get("probes"))
        model.reference = reference_from_dict(d.get("reference"))
        model.eval()
        return model.to(map_location) if map_location is not None else model

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return (
            f"SigmmaModel(scales={list(c.scales)}, n_features={c.n_features}, image_dim={c.image_dim}, "
            f"hidden={c.hidden}, out_dim={c.out_dim}, use_graph={c.use_graph}, edge_addition={c.edge_addition}, "
            + (f"graph={c.graph!r}, " if c.graph != "hierarchical" else "")
            + (f"edges={c.edges!r}, " if c.edges != "spatial" else "")
            + (f"fine-tuned {c.backbone!r} ({c.finetune_blocks} blocks), " if self.finetuned else "")
            + f"{n} parameters, {len(self.history)} epochs trained)"
        )


class _eval:
    """Context manager: eval mode inside (deterministic arithmetic on the CPU), the previous mode restored after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()
        param = next(self.module.parameters(), None)
        self.det = deterministic_on_cpu("cpu" if param is None else param.device)
        self.det.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.det.__exit__(*exc)
        self.module.train(self.was_training)
