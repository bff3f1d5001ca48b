"""Projection heads and the symmetric multi-scale InfoNCE loss (paper §3.3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """MLP projection into the shared space: Linear -> LeakyReLU -> Dropout -> Linear -> L2-normalise.

    Parameters
    ----------
    in_channels
        Input width.
    out_channels
        Width of the shared space (also the hidden width).
    dropout
        Dropout after the activation.
    layers
        ``2``: Linear, LeakyReLU, dropout, Linear (the paper's head); ``1``: one linear map.

    Shapes
    ------
    - input: ``(B, in_channels)``
    - output: ``(B, out_channels)``, unit L2 norm per row
    """

    def __init__(self, in_channels: int, out_channels: int = 512, dropout: float = 0.1, layers: int = 2):
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"`layers` must be 1 or 2, got {layers}.")
        if layers == 1:
            self.net = nn.Sequential(nn.Linear(in_channels, out_channels))
        else:
            self.net = nn.Sequential(
                nn.Linear(in_channels, out_channels),
                nn.LeakyReLU(),
                nn.Dropout(dropout),
                nn.Linear(out_channels, out_channels),
            )

    def reset_parameters(self) -> None:
        """Re-initialise both linear layers."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Project and L2-normalise."""
        return F.normalize(self.net(x), dim=-1)


def info_nce(z_a: Tensor, z_b: Tensor, temperature: float | Tensor = 0.01) -> Tensor:
    r"""Symmetric InfoNCE between paired rows of ``z_a`` and ``z_b`` (paper §3.3).

    ``0.5 * (CE(z_a z_b^T / tau, arange) + CE(z_b z_a^T / tau, arange))``; row ``i`` of each is the
    positive of row ``i`` of the other and every other row of the batch is a negative. The inputs are
    expected L2-normalised (cosine similarity). Computed in float32.

    Parameters
    ----------
    z_a, z_b
        ``(B, D)`` paired embeddings.
    temperature
        Softmax temperature ``tau`` (paper Table 3: 0.01); a scalar tensor for a learned temperature.

    Returns
    -------
    Scalar loss.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"Paired embeddings must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}.")
    logits = z_a.float() @ z_b.float().T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def multiscale_info_nce(
    image: Mapping[str, Tensor], st: Mapping[str, Tensor], temperature: float | Tensor = 0.01
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum over scales of :func:`info_nce` (``L = L_micro + L_meso + L_macro``).

    Parameters
    ----------
    image, st
        Scale -> ``(B, D)`` embeddings of the two modalities (the same scales in both).
    temperature
        Softmax temperature.

    Returns
    -------
    The total loss and the per-scale losses.
    """
    parts = {s: info_nce(image[s], st[s], temperature) for s in image}
    return torch.stack(list(parts.values())).sum(), parts


def uniformity_loss(z: Tensor, t: float = 2.0) -> Tensor:
    r"""Uniformity of L2-normalised embeddings on the sphere (Wang & Isola 2020).

    "Understanding contrastive representation learning through alignment and uniformity on the hypersphere":
    ``log mean_{i != j} exp(-t ||z_i - z_j||^2)``: lowest when the rows spread evenly over the sphere, 0 when they
    all coincide (collapse). Computed in float32.

    Parameters
    ----------
    z
        ``(B, D)`` L2-normalised embeddings.
    t
        Scale of the Gaussian potential (the paper's 2).

    Returns
    -------
    Scalar loss (``0`` for fewer than 2 rows).
    """
    n = z.shape[0]
    if n < 2:
        return z.sum() * 0.0
    sq = torch.pdist(z.float()).pow(2)  # the n (n - 1) / 2 distinct pairs
    return torch.logsumexp(-t * sq, dim=0) - torch.log(torch.tensor(float(sq.numel()), device=z.device))

