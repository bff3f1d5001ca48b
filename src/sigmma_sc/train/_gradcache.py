"""GradCache: a full-batch contrastive loss backpropagated over micro-batches (Gao et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


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
        global batch (:func:`~sigmma_sc.train.gather_embeddings`), applied before ``loss_fn``; the cached gradient
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
