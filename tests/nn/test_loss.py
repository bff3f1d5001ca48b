import math

import pytest
import torch
import torch.nn.functional as F

from sigmma_sc.nn import ProjectionHead, info_nce, multiscale_info_nce
from sigmma_sc.train import grad_cache_backward


def test_projection_head_normalised():
    head = ProjectionHead(7, 5, dropout=0.2)
    z = head(torch.randn(4, 7))
    assert z.shape == (4, 5)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))
    head.reset_parameters()


def test_info_nce_matches_manual_and_is_symmetric():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    logits = a @ b.T / 0.1
    i2s = -torch.log_softmax(logits, 1).diag().mean()
    s2i = -torch.log_softmax(logits.T, 1).diag().mean()
    torch.testing.assert_close(info_nce(a, b, 0.1), 0.5 * (i2s + s2i))
    torch.testing.assert_close(info_nce(a, b, 0.1), info_nce(b, a, 0.1))
    assert info_nce(a, a, 0.01) < 1e-3  # perfectly aligned, distinct rows
    u = F.normalize(torch.ones(6, 4), dim=-1)
    torch.testing.assert_close(info_nce(u, u, 0.5), torch.tensor(math.log(6)))
    with pytest.raises(ValueError, match="same shape"):
        info_nce(a, b[:3])


def test_multiscale_loss_is_sum():
    torch.manual_seed(0)
    img = {s: F.normalize(torch.randn(5, 3), dim=-1) for s in ("micro", "macro")}
    st = {s: F.normalize(torch.randn(5, 3), dim=-1) for s in ("micro", "macro")}
    total, parts = multiscale_info_nce(img, st, 0.1)
    torch.testing.assert_close(total, parts["micro"] + parts["macro"])


class _Enc(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        return {"a": F.normalize(self.drop(self.a(x)), dim=-1), "b": F.normalize(self.b(x) + torch.rand(3), dim=-1)}


def _loss(emb):
    return info_nce(emb["a"], emb["b"], 0.1)


@pytest.mark.parametrize("chunk", [3, 4, 12])
def test_grad_cache_replays_rng_and_matches_reference(chunk):
    """With dropout and random noise, GradCache equals backward through the same per-chunk forward passes."""
    x = torch.randn(12, 4)
    chunks = list(x.split(chunk))
    enc = _Enc(0.5)
    torch.manual_seed(3)
    outs = [enc(c) for c in chunks]
    ref_loss = _loss({k: torch.cat([o[k] for o in outs]) for k in ("a", "b")})
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in enc.named_parameters()}
    state_ref = torch.get_rng_state()
    enc.zero_grad()
    torch.manual_seed(3)
    loss = grad_cache_backward(enc, chunks, _loss)
    torch.testing.assert_close(loss, ref_loss.detach())
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state_ref)  # RNG continues as after one pass
