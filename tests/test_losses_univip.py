"""UniVIP losses: scene, scene-instance, Sinkhorn, instance (OT) and their sum."""

import math

import pytest
import torch

from train.losses.univip import (
    UniVIPLoss,
    instance_cost,
    instance_loss,
    instance_marginals,
    scene_instance_loss,
    scene_loss,
    sinkhorn,
)

E1, E2 = [1.0, 0.0], [0.0, 1.0]


def normalised(x):
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, x / total, torch.full_like(x, 1.0 / x.shape[-1]))


def reference_sinkhorn(cost, a, b, eps, iters):
    """Textbook linear-domain Sinkhorn-Knopp on one [M, N] problem, float64, explicit loops."""
    m, n = len(a), len(b)
    kernel = [[math.exp(-cost[i][j] / eps) for j in range(n)] for i in range(m)]
    u, v = [1.0] * m, [1.0] * n
    for _ in range(iters):
        u = [a[i] / sum(kernel[i][j] * v[j] for j in range(n)) for i in range(m)]
        v = [b[j] / sum(kernel[i][j] * u[i] for i in range(m)) for j in range(n)]
    return torch.tensor([[u[i] * kernel[i][j] * v[j] for j in range(n)] for i in range(m)])


# ----------------------------------------------------------------------------- scene terms


def test_scene_loss_by_hand():
    p1, p2 = torch.tensor([E1]), torch.tensor([E2])
    z1, z2 = torch.tensor([[0.0, -3.0]]), torch.tensor([[2.0, 2.0]])
    # -cos(p1, z2) - cos(p2, z1) = -1/sqrt(2) - (-1)
    assert scene_loss(p1, p2, z1, z2).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_scene_instance_loss_by_hand_and_targets_detached():
    inst = torch.tensor([[1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    # image 0: -(1/sqrt2) - (1/sqrt2); image 1: -(1) - (-1) = 0; batch mean over each view
    loss = scene_instance_loss(inst, z1, z2)
    assert loss.item() == pytest.approx(-math.sqrt(2) / 2, abs=1e-6)
    loss.backward()
    assert inst.grad is not None and z1.grad is None and z2.grad is None


# -------------------------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("shape", [(16, 4, 4), (8, 3, 5), (1, 1, 1)])
def test_sinkhorn_marginals_match(shape, eps):
    gen = torch.Generator().manual_seed(0)
    batch, m, n = shape
    cost = 2 * torch.rand(shape, generator=gen)
    a, b = torch.rand(batch, m, generator=gen), 3 * torch.rand(batch, n, generator=gen)
    plan = sinkhorn(cost, a, b, eps=eps)
    assert plan.shape == shape and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(dim=2), normalised(a), atol=1e-4, rtol=0)  # rows: a
    torch.testing.assert_close(plan.sum(dim=1), normalised(b), atol=1e-4, rtol=0)  # columns: b


def test_sinkhorn_matches_textbook_iteration():
    gen = torch.Generator().manual_seed(1)
    cost = 2 * torch.rand(3, 4, 4, generator=gen)
    a, b = torch.rand(3, 4, generator=gen) + 0.1, torch.rand(3, 4, generator=gen) + 0.1
    plan = sinkhorn(cost, a, b, eps=0.5, iters=300)
    for i in range(3):
        ref = reference_sinkhorn(
            cost[i].tolist(), normalised(a[i]).tolist(), normalised(b[i]).tolist(), 0.5, 300
        )
        torch.testing.assert_close(plan[i], ref.float(), atol=1e-5, rtol=0)


def test_sinkhorn_limits_of_eps():
    cost = (1 - torch.eye(4))[None]  # matching i with i is free
    uniform = torch.ones(1, 4)
    sharp = sinkhorn(cost, uniform, uniform, eps=1e-3)  # near-exact OT: the permutation
    torch.testing.assert_close(sharp[0], torch.eye(4) / 4, atol=1e-4, rtol=0)
    a, b = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[4.0, 0.0, 1.0, 5.0]])
    flat = sinkhorn(cost, a, b, eps=1e4)  # no cost: independent coupling a b^T
    torch.testing.assert_close(flat[0], torch.outer(a[0] / 10, b[0] / 10), atol=1e-4, rtol=0)


def test_sinkhorn_small_eps_is_finite():
    gen = torch.Generator().manual_seed(2)
    cost = 2 * torch.rand(32, 4, 4, generator=gen)
    a, b = torch.rand(32, 4, generator=gen), torch.rand(32, 4, generator=gen)
    plan = sinkhorn(cost, a, b, eps=1e-3, iters=50)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=(1, 2)), torch.ones(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(dim=1), normalised(b), atol=1e-4, rtol=0)


def test_sinkhorn_zero_marginals():
    cost = 2 * torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    plan = sinkhorn(cost, a, b, eps=1e-3)
    assert torch.isfinite(plan).all()
    # image 0: all-zero a falls back to uniform rows
    torch.testing.assert_close(plan.sum(dim=2)[0], torch.full((4,), 0.25), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        plan.sum(dim=2)[1], torch.tensor([0.5, 0.0, 0.5, 0.0]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(plan.sum(dim=1)[1:], torch.full((2, 4), 0.25), atol=1e-4, rtol=0)


def test_sinkhorn_plan_has_no_gradient():
    cost = torch.rand(2, 3, 3, requires_grad=True)
    a = torch.rand(2, 3, requires_grad=True)
    plan = sinkhorn(cost, a, torch.rand(2, 3))
    assert not plan.requires_grad and plan.grad_fn is None


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        sinkhorn(torch.rand(1, 2, 2), torch.tensor([[1.0, -0.1]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"cost \[B, M, N\]"):
        sinkhorn(torch.rand(1, 2, 3), torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(torch.rand(1, 2, 2), torch.ones(1, 2), torch.ones(1, 2), eps=0.0)


# ---------------------------------------------------------------------------- instance term


def test_instance_cost_and_marginals_by_hand():
    o = torch.tensor([[E1, [1.0, 1.0]]])  # [1, 2, 2]
    t = torch.tensor([[[2.0, 0.0], E2]])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(instance_cost(o, t), torch.tensor([[[0.0, 1.0], [1 - r, 1 - r]]]))

    f_o1, f_o2 = torch.tensor([E1]), torch.tensor([E1])
    f_t1, f_t2 = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, -4.0]])
    # literal eq. 9: o_m . (f_t1 + f_t2) / 2 = o_m . (0, -1) -> (0, -1) -> relu (0, 0)
    # literal eq. 10: t_n . (f_o1 + f_o2) / 2 = t_n . (1, 0) -> (2, 0)
    rows, cols = instance_marginals(o, t, f_o1, f_o2, f_t1, f_t2, cosine=False)
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(cols, torch.tensor([[2.0, 0.0]]))
    # cosine: unit vectors, mean of unit scene vectors (0, 1) and (0, -1) is 0 -> rows 0
    f_t2 = torch.tensor([[1.0, 1.0]])  # mean of (0, 1) and (r, r) = (r/2, (1 + r)/2)
    rows, cols = instance_marginals(o, t, f_o1, f_o2, f_t1, f_t2, cosine=True)
    torch.testing.assert_close(rows, torch.tensor([[r / 2, r * (r / 2 + (1 + r) / 2)]]))
    torch.testing.assert_close(cols, torch.tensor([[1.0, 0.0]]))


def _two_instance_case(requires_grad=False):
    o = torch.tensor([[E1, E2]], requires_grad=requires_grad)  # [1, 2, 2]
    t = torch.tensor([[[3.0, 0.0], [0.0, 0.5]]], requires_grad=requires_grad)
    scene = torch.tensor([[1.0, 1.0]], requires_grad=requires_grad)  # equal masses for both
    return o, t, scene


def test_instance_loss_by_hand():
    o, t, scene = _two_instance_case()
    # near-exact OT matches each instance with itself: plan diag(1/2, 1/2), loss -(1/2 + 1/2)
    sharp = instance_loss(o, t, scene, scene, scene, scene, eps=1e-3)
    assert sharp.item() == pytest.approx(-1.0, abs=1e-4)
    # huge eps: plan 1/4 everywhere, loss -(1 + 0 + 0 + 1) / 4
    flat = instance_loss(o, t, scene, scene, scene, scene, eps=1e4)
    assert flat.item() == pytest.approx(-0.5, abs=1e-4)


def test_instance_loss_gradient_flows_to_online_only():
    gen = torch.Generator().manual_seed(4)
    o = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    t = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    scenes = [torch.randn(3, 8, generator=gen, requires_grad=True) for _ in range(4)]
    loss = instance_loss(o, t, *scenes, eps=1e-3)
    assert torch.isfinite(loss)
    loss.backward()
    assert o.grad is not None and torch.isfinite(o.grad).all() and o.grad.abs().sum() > 0
    assert t.grad is None and all(s.grad is None for s in scenes)


def test_instance_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, K, D\]"):
        instance_loss(torch.rand(2, 4, 3), torch.rand(2, 3, 3), *[torch.rand(2, 3)] * 4)


# ----------------------------------------------------------------------------------- total


def test_univip_loss_sums_terms_and_goes_down():
    gen = torch.Generator().manual_seed(5)
    batch, k, dim = 6, 4, 16
    params = {
        "p1": torch.randn(batch, dim, generator=gen),
        "p2": torch.randn(batch, dim, generator=gen),
        "inst": torch.randn(batch, dim, generator=gen),
        "o": torch.randn(batch, k, dim, generator=gen),
    }
    params = {n: v.requires_grad_(True) for n, v in params.items()}
    z1, z2 = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    t = torch.randn(batch, k, dim, generator=gen)
    loss_fn = UniVIPLoss()

    def run():
        return loss_fn(params["p1"], params["p2"], z1, z2, params["inst"], params["o"], t)

    out = run()
    assert set(out) == {"loss", "scene", "scene_instance", "instance"}
    assert out["scene"].item() == pytest.approx(
        scene_loss(params["p1"], params["p2"], z1, z2).item()
    )
    assert out["scene_instance"].item() == pytest.approx(
        scene_instance_loss(params["inst"], z1, z2).item()
    )
    expected_instance = instance_loss(params["o"], t, params["p1"], params["p2"], z1, z2)
    assert out["instance"].item() == pytest.approx(expected_instance.item(), abs=1e-6)
    total = out["scene"] + out["scene_instance"] + out["instance"]
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-6)

    opt = torch.optim.SGD(params.values(), lr=1.0)
    first = out["loss"].item()
    for _ in range(10):
        loss = run()["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert run()["loss"].item() < first - 0.5
    with pytest.raises(ValueError, match="eps"):
        UniVIPLoss(eps=-1.0)
