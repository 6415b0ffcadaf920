"""Baseline losses: BYOL and MoCo v3."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses.byol import byol_loss, normalized_mse
from train.losses.mocov3 import infonce, mocov3_loss


def test_normalized_mse_by_hand():
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    z = torch.tensor([[0.0, 5.0], [2.0, 2.0], [0.0, -1.0]])
    # 2 - 2 cos: orthogonal 2, parallel 0, opposite 4
    torch.testing.assert_close(normalized_mse(p, z), torch.tensor([2.0, 0.0, 4.0]))


def test_byol_loss_by_hand_and_symmetric():
    p1, p2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    z1, z2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # L(p1, z2) = 2 - 2 * 1 = 0; L(p2, z1) = 2 - 2 / sqrt(2)
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx(2 - math.sqrt(2), abs=1e-6)
    assert byol_loss(p2, p1, z2, z1).item() == pytest.approx(2 - math.sqrt(2), abs=1e-6)


def test_byol_targets_are_stop_gradient():
    p1, p2, z1, z2 = (torch.randn(4, 3, requires_grad=True) for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


def test_infonce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    r = 1 / math.sqrt(2)
    # row 0 logits (2, 2r), positive 0; row 1 logits (0, 2r), positive 1
    row0 = -(2.0 - math.log(math.exp(2.0) + math.exp(2 * r)))
    row1 = -(2 * r - math.log(1.0 + math.exp(2 * r)))
    expected = 2 * tau * (row0 + row1) / 2
    assert infonce(q, k, tau).item() == pytest.approx(expected, abs=1e-6)


def test_mocov3_loss_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 8, generator=gen) for _ in range(4))
    tau = 0.2

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
        return 2 * tau * F.cross_entropy(logits, torch.arange(5))

    expected = ctr(q1, k2) + ctr(q2, k1)
    assert mocov3_loss(q1, q2, k1, k2, tau).item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="row by row"):
        infonce(q1, k1[:3])


def test_mocov3_loss_goes_down():
    gen = torch.Generator().manual_seed(1)
    q1, q2 = (torch.randn(8, 16, generator=gen).requires_grad_(True) for _ in range(2))
    k1, k2 = (torch.randn(8, 16, generator=gen) for _ in range(2))
    opt = torch.optim.SGD([q1, q2], lr=1.0)
    first = mocov3_loss(q1, q2, k1, k2).item()
    for _ in range(20):
        loss = mocov3_loss(q1, q2, k1, k2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mocov3_loss(q1, q2, k1, k2).item() < 0.7 * first
