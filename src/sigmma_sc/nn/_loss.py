"""Projection heads, the symmetric multi-scale InfoNCE loss and GradCache accumulation (paper §3.3)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def grad_cache_backward(
    encode: Callable[[Any], Mapping[str, Tensor]],
    chunks: Sequence[Any],
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    *,
    gather: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> Tensor:
    """Backpropagate a full-batch contrastive loss computed over micro-batches (GradCache).

    Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited setup":
    (1) embed every micro-batch without autograd; (2) concatenate, compute the full-batch loss
    (all cross-micro-batch negatives included) and its gradient w.r.t. the embeddings;
    (3) re-embed each micro-batch with autograd and backpropagate the cached embedding gradient
    (``emb.backward(grad)``). The torch RNG state (CPU and CUDA) is saved before each micro-batch in
    (1) and restored in (3), so dropout masks and Gumbel noise are identical in both passes; the RNG
    state after the call is the one after pass (1). Parameter gradients are accumulated into
    ``.grad`` exactly as one backward of the full batch would (up to float rounding). Modules whose
    forward has side effects (BatchNorm running statistics) would see them twice.

    Parameters
    ----------
    encode
        Maps one chunk to a dict of embeddings ``key -> (B_chunk, D)``, rows in chunk order.
    chunks
        The micro-batches, in the order their rows are concatenated.
    loss_fn
        Maps the dict of concatenated embeddings ``key -> (B, D)`` to the scalar loss.
    gather
        Distributed training: a differentiable map from this rank's concatenated embeddings to those of the
        global batch (:func:`~sigmma_sc.nn.gather_embeddings`), applied before ``loss_fn``; the cached gradient
        is then taken w.r.t. this rank's rows (``chunks`` are this rank's shard).

    Returns
    -------
    The detached full-batch loss.
    """
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            cached.append({k: v.detach() for k, v in encode(chunk).items()})
    after = _rng_state()
    keys = list(cached[0])
    full = {k: torch.cat([c[k] for c in cached]).requires_grad_(requires_grad=True) for k in keys}
    loss = loss_fn(full if gather is None else gather(full))
    # backward (not autograd.grad on the embeddings): parameters of the loss itself (a learned temperature)
    # get their gradient here, the embeddings' gradients land in the leaves' .grad
    loss.backward()
    grads = [full[k].grad for k in keys]
    sizes = [c[keys[0]].shape[0] for c in cached]
    split = {k: (g.split(sizes) if g is not None else [None] * len(sizes)) for k, g in zip(keys, grads, strict=True)}
    for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
        _set_rng_state(state)
        emb = encode(chunk)
        pairs = [(emb[k], split[k][i]) for k in keys if split[k][i] is not None and emb[k].requires_grad]
        if pairs:
            torch.autograd.backward([e for e, _ in pairs], [g for _, g in pairs])
    _set_rng_state(after)
    return loss.detach()
