"""What a trained model carries to predict on new slides: linear expression probes and a retrieval reference.

Both are plain numbers (tensors, strings, floats), so they are saved with the weights and read back with
``torch.load(weights_only=True)``; nothing here imports anndata, spatialdata or scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LinearProbe:
    """A fitted tile-expression probe as one affine map: ``y = x @ weight + bias``.

    A PCA (+ scaler) + ridge probe is linear in its input features, so it collapses exactly into one
    ``(D, n_genes)`` matrix and a bias (:meth:`from_probe_result`).

    Attributes
    ----------
    genes
        Predicted genes (columns).
    weight
        ``(D, n_genes)`` float64.
    bias
        ``(n_genes,)`` float64.
    embedding_keys
        Tile-table ``.obsm`` keys whose concatenation is ``x`` (e.g. ``['X_sigmma_macro_image']``).
    protocol
        ``'paper'`` (``log1p`` of counts normalised to ``target_sum``) or ``'hest'`` (``log1p`` of summed counts).
    target_sum
        Paper protocol: the total count tiles were normalised to.
    tiling
        ``tile_size_um`` and ``pixel_size_um`` of the tiles it was fitted on.
    scores
        Held-out scores of the fit (:meth:`sigmma_sc.metrics.ProbeResult.summary`).
    """

    genes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    embedding_keys: list[str]
    protocol: str = "paper"
    target_sum: float | None = None
    tiling: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if self.weight.ndim != 2 or self.weight.shape[1] != len(self.genes) or self.bias.shape != (len(self.genes),):
            raise ValueError(
                f"A probe needs weight (D, {len(self.genes)}) and bias ({len(self.genes)},); got "
                f"{self.weight.shape} and {self.bias.shape}."
            )

    @classmethod
    def from_probe_result(cls, probe: Any, *, check: np.ndarray | None = None) -> LinearProbe:
        """Collapse a fitted :class:`~sigmma_sc.metrics.ProbeResult` (PCA/scaler + ridge) into one affine map.

        Parameters
        ----------
        probe
            A probe from :func:`sigmma_sc.metrics.linear_probe` fitted on ``.obsm`` keys.
        check
            Optional ``(n, D)`` features on which the collapsed map must reproduce ``probe.predict``.

        Returns
        -------
        The probe as plain arrays.
        """
        if not getattr(probe, "embedding_keys", None):
            raise ValueError(
                "The probe was fitted on an array; fit it on tile-table `.obsm` keys (e.g. 'X_sigmma_macro_image') "
                "so that new slides' features can be found."
            )
        reducer = probe.reducer
        if reducer is None:
            raise ValueError("The probe holds no fitted feature transform.")
        d = int(getattr(reducer, "n_features_in_", 0)) or None
        if d is None:
            raise ValueError("Cannot tell the probe's input width.")
        zero = np.zeros((1, d))
        offset = reducer.transform(zero)  # (1, k)
        linear = reducer.transform(np.eye(d)) - offset  # (D, k): the transform is affine
        coef = np.asarray(probe.coef, dtype=np.float64)
        weight = linear @ coef.T
        bias = (offset @ coef.T).ravel() + np.asarray(probe.intercept, dtype=np.float64)
        if probe.protocol == "hest":
            bias = bias + np.asarray(probe.train_mean, dtype=np.float64)
        out = cls(
            genes=[str(g) for g in probe.genes],
            weight=weight,
            bias=bias,
            embedding_keys=list(probe.embedding_keys),
            protocol=str(probe.protocol),
            target_sum=None if probe.target_sum is None else float(probe.target_sum),
            tiling={k: float(v) for k, v in (probe.tiling or {}).items()},
            scores={k: float(v) for k, v in probe.summary().items()},
        )
        if check is not None and len(check):
            if not np.allclose(out.predict(check), probe.predict(check), rtol=1e-6, atol=1e-6):
                raise ValueError("The probe's feature transform is not affine; it cannot be saved with the model.")
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted expression ``(n, n_genes)`` of features ``x`` ``(n, D)`` (the probe's target scale).

        Parameters
        ----------
        x
            Features built like the fit's: the ``embedding_keys`` concatenated in order.

        Returns
        -------
        ``(n, n_genes)`` float64.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"The probe takes {self.weight.shape[0]}-dimensional features ({'+'.join(self.embedding_keys)}); "
                f"got shape {x.shape}."
            )
        return x @ self.weight + self.bias

    def to_dict(self) -> dict[str, Any]:
        """Plain python and tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "genes": list(self.genes),
            "weight": torch.from_numpy(self.weight.copy()),
            "bias": torch.from_numpy(self.bias.copy()),
            "embedding_keys": list(self.embedding_keys),
            "protocol": self.protocol,
            "target_sum": self.target_sum,
            "tiling": dict(self.tiling),
            "scores": dict(self.scores),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearProbe:
        """Inverse of :meth:`to_dict`."""
        return cls(
            genes=list(d["genes"]),
            weight=torch.as_tensor(d["weight"]).numpy(),
            bias=torch.as_tensor(d["bias"]).numpy(),
            embedding_keys=list(d["embedding_keys"]),
            protocol=str(d.get("protocol", "paper")),
            target_sum=d.get("target_sum"),
            tiling=dict(d.get("tiling") or {}),
            scores=dict(d.get("scores") or {}),
        )


@dataclass
class RetrievalReference:
    """ST embeddings of a training section's tiles, to retrieve the closest training tiles of a new slide's tiles.

    Attributes
    ----------
    scale
        Scale of the embeddings.
    embeddings
        ``(N, out_dim)`` float32 ST tile embeddings.
    names
        Tile names (``'tile_12'``).
    xy
        ``(N, 2)`` tile origins ``x0, y0`` in the training section's coordinate system.
    section
        A label of the training section.
    """

    scale: str
    embeddings: np.ndarray
    names: list[str]
    xy: np.ndarray
    section: str = ""

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        if not (len(self.names) == self.embeddings.shape[0] == self.xy.shape[0]):
            raise ValueError("A retrieval reference needs one name, embedding and origin per tile.")

    def query(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``(n, k)`` and cosine similarities ``(n, k)`` of the ``k`` closest reference tiles of ``z``.

        Parameters
        ----------
        z
            ``(n, out_dim)`` image embeddings of the query tiles.
        k
            Hits per query.

        Returns
        -------
        ``(indices, scores)``, best first.
        """
        k = min(int(k), len(self.names))
        unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        ref = unit(np.nan_to_num(self.embeddings))
        q = unit(np.nan_to_num(np.asarray(z, dtype=np.float32)))
        idx = np.empty((len(q), k), dtype=np.int64)
        score = np.empty((len(q), k), dtype=np.float32)
        for start in range(0, len(q), 4096):
            sim = q[start : start + 4096] @ ref.T
            top = (
                np.argpartition(-sim, k - 1, axis=1)[:, :k]
                if k < sim.shape[1]
                else np.tile(np.arange(k), (len(sim), 1))
            )
            s = np.take_along_axis(sim, top, 1)
            order = np.argsort(-s, axis=1, kind="stable")
            idx[start : start + 4096] = np.take_along_axis(top, order, 1)
            score[start : start + 4096] = np.take_along_axis(s, order, 1)
        return idx, score

    def to_dict(self) -> dict[str, Any]:
        """Plain python and tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "scale": self.scale,
            "embeddings": torch.from_numpy(self.embeddings.copy()),
            "names": list(self.names),
            "xy": torch.from_numpy(self.xy.copy()),
            "section": self.section,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrievalReference:
        """Inverse of :meth:`to_dict`."""
        return cls(
            scale=str(d["scale"]),
            embeddings=torch.as_tensor(d["embeddings"]).numpy(),
            names=list(d["names"]),
            xy=torch.as_tensor(d["xy"]).numpy(),
            section=str(d.get("section", "")),
        )


def inference_tiling(meta: Mapping[str, Any], backbone_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The tiling and image modality a model was trained with, from its ``meta`` (missing entries are ``None``).

    Parameters
    ----------
    meta
        The model's ``meta`` (from its training bundle).
    backbone_info
        The model's ``config.backbone_info``.

    Returns
    -------
    ``tile_size_um``, ``pixel_size_um``, ``image_channels`` (3: brightfield RGB, 1: fluorescence), ``image_key``,
    ``backbone``, ``input_size``.
    """
    return {
        "tile_size_um": meta.get("tile_size_um"),
        "pixel_size_um": meta.get("pixel_size_um"),
        "image_channels": meta.get("image_channels"),
        "image_key": meta.get("image_key"),
        "backbone": meta.get("backbone"),
        "input_size": (backbone_info or {}).get("input_size"),
    }


def probes_to_dict(probes: Mapping[str, LinearProbe]) -> dict[str, Any]:
    """Serialisable form of a model's probes."""
    return {name: p.to_dict() for name, p in probes.items()}


def probes_from_dict(d: Mapping[str, Any] | None) -> dict[str, LinearProbe]:
    """Inverse of :func:`probes_to_dict`."""
    return {str(name): LinearProbe.from_dict(v) for name, v in (d or {}).items()}


def reference_from_dict(d: Mapping[str, Any] | None) -> RetrievalReference | None:
    """A saved retrieval reference, or ``None``."""
    return None if not d else RetrievalReference.from_dict(d)


__all__: Sequence[str] = ["LinearProbe", "RetrievalReference", "inference_tiling"]
