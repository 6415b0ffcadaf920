"""UniVIP losses: scene, scene-instance, Sinkhorn, instance (OT) and their sum."""

import inspect
import math

import pytest
import torch

from train.losses.byol import byol_loss
from train.losses.univip import (
    DEFAULT_COSINE_MARGINALS,
    DEFAULT_EPS,
    DEFAULT_ITERS,
    DEFAULT_SCENE_FORM,
    SCENE_FORMS,
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
    loss = scene_loss(p1, p2, z1, z2, form="cosine")
    assert loss.item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)) = (2 - sqrt(2)) + (2 + 2)
    loss = scene_loss(p1, p2, z1, z2, form="mse")
    assert loss.item() == pytest.approx(6 - math.sqrt(2), abs=1e-6)


@pytest.mark.parametrize(
    ("target", "mse", "cosine"),
    [
        ([3.0, 0.0], 0.0, -1.0),  # parallel
        ([0.0, 0.5], 2.0, 0.0),  # orthogonal
        ([-2.0, 0.0], 4.0, 1.0),  # opposite
    ],
)
def test_scene_forms_on_hand_made_pairs(target, mse, cosine):
    p, z = torch.tensor([E1, E1]), torch.tensor([target, target])
    # both directions see the same pair: the symmetric loss is twice the per-pair value
    assert scene_loss(p, p, z, z).item() == pytest.approx(2 * mse, abs=1e-6)  # default: mse
    assert scene_loss(p, p, z, z, form="cosine").item() == pytest.approx(2 * cosine, abs=1e-6)
    assert scene_instance_loss(p, z, z).item() == pytest.approx(2 * mse, abs=1e-6)
    assert scene_instance_loss(p, z, z, form="cosine").item() == pytest.approx(2 * cosine, abs=1e-6)


def test_scene_loss_equals_byol_loss_and_its_gradient():
    gen = torch.Generator().manual_seed(10)
    p1, p2 = (torch.randn(8, 32, generator=gen, requires_grad=True) for _ in range(2))
    z1, z2 = torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)
    ours, byol = scene_loss(p1, p2, z1, z2), byol_loss(p1, p2, z1, z2)
    torch.testing.assert_close(ours, byol, atol=1e-6, rtol=0)
    g_ours = torch.autograd.grad(ours, (p1, p2))
    g_byol = torch.autograd.grad(byol, (p1, p2))
    g_cos = torch.autograd.grad(scene_loss(p1, p2, z1, z2, form="cosine"), (p1, p2))
    for mine, ref, half in zip(g_ours, g_byol, g_cos, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(half, ref / 2, atol=1e-6, rtol=0)  # -cos: half the gradient
    out = UniVIPLoss()(p1, p2, z1, z2, p1, torch.randn(8, 2, 32), torch.randn(8, 2, 32))
    torch.testing.assert_close(out["scene"], byol, atol=1e-6, rtol=0)


def test_scene_form_rejects_unknown_names():
    x = torch.ones(1, 2)
    with pytest.raises(ValueError, match="choose one of: mse, cosine"):
        scene_loss(x, x, x, x, form="l2")
    with pytest.raises(ValueError, match="choose one of: mse, cosine"):
        scene_instance_loss(x, x, x, form="")
    with pytest.raises(ValueError, match="unknown scene form 'byol'"):
        UniVIPLoss(scene_form="byol")


@pytest.mark.parametrize(
    ("form", "expected"), [("cosine", -math.sqrt(2) / 2), ("mse", 4 - 2 * math.sqrt(2) / 2)]
)
def test_scene_instance_loss_by_hand_and_targets_detached(form, expected):
    inst = torch.tensor([[1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    # cosine: image 0: -(1/sqrt2) - (1/sqrt2); image 1: -(1) - (-1) = 0; batch mean per view
    # mse: the same with 2 - 2 cos per pair, 2 pairs per image: 4 - 2 * (cosine sum's negation)
    loss = scene_instance_loss(inst, z1, z2, form=form)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
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
    # cosine marginals: equal masses for all; raw: rows (1, 1), columns t . scene = (3, 0.5)
    scene = torch.tensor([[1.0, 1.0]], requires_grad=requires_grad)
    return o, t, scene


def test_instance_loss_by_hand():
    o, t, scene = _two_instance_case()
    scenes = (scene, scene, scene, scene)
    # near-exact OT matches each instance with itself: plan diag(1/2, 1/2), loss -(1/2 + 1/2)
    sharp = instance_loss(o, t, *scenes, eps=1e-3, cosine_marginals=True)
    assert sharp.item() == pytest.approx(-1.0, abs=1e-4)
    # huge eps: plan 1/4 everywhere, loss -(1 + 0 + 0 + 1) / 4
    flat = instance_loss(o, t, *scenes, eps=1e4, cosine_marginals=True)
    assert flat.item() == pytest.approx(-0.5, abs=1e-4)
    # raw marginals (default): rows (1/2, 1/2), columns (6/7, 1/7); exact OT keeps the diagonal
    # as full as it can, y = [[1/2, 0], [5/14, 1/7]], loss -(1/2 * 1 + 5/14 * 0 + 1/7 * 1)
    sharp_raw = instance_loss(o, t, *scenes, eps=1e-3)
    assert sharp_raw.item() == pytest.approx(-9 / 14, abs=1e-4)
    # huge eps: independent coupling, loss -(1/2 * 6/7 + 1/2 * 1/7) = -1/2 whatever the columns
    flat_raw = instance_loss(o, t, *scenes, eps=1e4, cosine_marginals=False)
    assert flat_raw.item() == pytest.approx(-0.5, abs=1e-4)


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


# the defaults spelled out, and the previous defaults (the paper's -cos, 0.05 / 100, cosine masses)
DEFAULT_OPTIONS = {
    "scene_form": "mse",
    "sinkhorn_eps": 0.1,
    "sinkhorn_iters": 50,
    "cosine_marginals": False,
}
OLD_OPTIONS = {
    "scene_form": "cosine",
    "sinkhorn_eps": 0.05,
    "sinkhorn_iters": 100,
    "cosine_marginals": True,
}


@pytest.mark.parametrize(
    ("kwargs", "options"),
    [({}, DEFAULT_OPTIONS), (OLD_OPTIONS, OLD_OPTIONS)],
    ids=["default", "old"],
)
def test_univip_loss_sums_terms_and_goes_down(kwargs, options):
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
    loss_fn = UniVIPLoss(**kwargs)
    form = options["scene_form"]
    sinkhorn_options = {
        "eps": options["sinkhorn_eps"],
        "iters": options["sinkhorn_iters"],
        "cosine_marginals": options["cosine_marginals"],
    }

    def run():
        return loss_fn(params["p1"], params["p2"], z1, z2, params["inst"], params["o"], t)

    out = run()
    assert set(out) == {"loss", "scene", "scene_instance", "instance"}
    assert out["scene"].item() == pytest.approx(
        scene_loss(params["p1"], params["p2"], z1, z2, form=form).item()
    )
    assert out["scene_instance"].item() == pytest.approx(
        scene_instance_loss(params["inst"], z1, z2, form=form).item()
    )
    expected_instance = instance_loss(
        params["o"], t, params["p1"], params["p2"], z1, z2, **sinkhorn_options
    )
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
    with pytest.raises(ValueError, match="sinkhorn_eps"):
        UniVIPLoss(sinkhorn_eps=-1.0)


# -------------------------------------------------------------------------------- defaults


def test_defaults_are_ota_sinkhorn_raw_marginals_and_byol_scene_form():
    # OTA (Ge et al., CVPR 2021): eps 0.1, 50 iterations; eq. 9-10 as written; ORL's 2 - 2 cos
    assert DEFAULT_EPS == 0.1 and DEFAULT_ITERS == 50
    assert DEFAULT_COSINE_MARGINALS is False and DEFAULT_SCENE_FORM == "mse"
    assert set(SCENE_FORMS) == {"mse", "cosine"}
    loss = UniVIPLoss()
    assert (loss.eps, loss.iters, loss.cosine_marginals, loss.scene_form) == (
        0.1,
        50,
        False,
        "mse",
    )
    expected = {
        sinkhorn: {"eps": 0.1, "iters": 50, "rounded": True},
        instance_loss: {"eps": 0.1, "iters": 50, "cosine_marginals": False},
        instance_marginals: {"cosine": False},
        scene_loss: {"form": "mse"},
        scene_instance_loss: {"form": "mse"},
    }
    for fn, defaults in expected.items():
        params = inspect.signature(fn).parameters
        assert {n: params[n].default for n in defaults} == defaults, fn.__name__


def test_univip_loss_options_reach_the_instance_term():
    gen = torch.Generator().manual_seed(11)
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=gen) for _ in range(4))
    o, t = torch.randn(4, 3, 8, generator=gen), torch.randn(4, 3, 8, generator=gen)
    raw = instance_loss(o, t, p1, p2, z1, z2, eps=0.1, iters=50, cosine_marginals=False)
    cos = instance_loss(o, t, p1, p2, z1, z2, eps=0.1, iters=50, cosine_marginals=True)
    assert abs(raw.item() - cos.item()) > 1e-3  # the option matters on these inputs
    out = UniVIPLoss()(p1, p2, z1, z2, p1, o, t)["instance"]
    assert out.item() == pytest.approx(raw.item(), abs=1e-7)
    out = UniVIPLoss(cosine_marginals=True)(p1, p2, z1, z2, p1, o, t)["instance"]
    assert out.item() == pytest.approx(cos.item(), abs=1e-7)


# --------------------------------------------------------------------- raw marginals (eq. 9-10)


def test_raw_marginals_all_clamped_to_zero_give_uniform_masses():
    o = torch.tensor([[E1, E2]], requires_grad=True)  # [1, 2, 2]
    t = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])
    f_o = torch.tensor([[1.0, 2.0]])
    away, along = torch.tensor([[-1.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    rows, _ = instance_marginals(o, t, f_o, f_o, away, away)
    torch.testing.assert_close(rows, torch.zeros(1, 2))  # o_m . (-1, -1) < 0: both clamp to 0
    # uniform rows, as the target scene (1, 1) gives both online instances equal mass
    loss = instance_loss(o, t, f_o, f_o, away, away)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(instance_loss(o, t, f_o, f_o, along, along).item())
    loss.backward()
    assert torch.isfinite(o.grad).all()


def _aligned_features(scale, seed=12, batch=4, k=3, dim=64):
    """Features all near one direction per image, norms about ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(batch, 1, dim, generator=gen), dim=-1)
    o, t = (scale * (base + 0.3 * torch.randn(batch, k, dim, generator=gen) / 8) for _ in range(2))
    scenes = [
        scale * (base[:, 0] + 0.3 * torch.randn(batch, dim, generator=gen) / 8) for _ in range(4)
    ]
    return o, t, scenes


def test_raw_marginals_are_scale_free_for_large_norms():
    o, t, scenes = _aligned_features(scale=1.0)
    small = instance_loss(o, t, *scenes)
    # norms 1e4: raw products about 1e8, far from the float32 limit; masses renormalised
    big = instance_loss(1e4 * o, 1e4 * t, *[1e4 * s for s in scenes])
    assert torch.isfinite(big)
    assert big.item() == pytest.approx(small.item(), abs=1e-5)
    rows, cols = instance_marginals(o, t, *scenes)
    rows_big, cols_big = instance_marginals(1e4 * o, 1e4 * t, *[1e4 * s for s in scenes])
    torch.testing.assert_close(rows_big, 1e8 * rows, rtol=1e-4, atol=0)
    torch.testing.assert_close(cols_big, 1e8 * cols, rtol=1e-4, atol=0)


def test_raw_marginals_do_not_overflow_under_fp16_autocast():
    o, t, scenes = _aligned_features(scale=300.0)  # products about 9e4 > fp16's 65504
    reference = instance_loss(o, t, *scenes)
    rows_ref, _ = instance_marginals(o, t, *scenes)
    assert rows_ref.max() > 65504
    # under autocast the heads' outputs are fp16 themselves
    half = [o.half(), t.half(), *[s.half() for s in scenes]]
    for inputs in ([o, t, *scenes], half):
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            rows, cols = instance_marginals(*inputs)
            loss = instance_loss(*inputs)
        assert rows.dtype == torch.float32
        assert torch.isfinite(rows).all() and torch.isfinite(cols).all()
        torch.testing.assert_close(rows, rows_ref, rtol=2e-3, atol=0)  # fp16 inputs: 1e-3 each
        assert torch.isfinite(loss)
        assert loss.item() == pytest.approx(reference.item(), abs=1e-2)  # fp16 cos, eq. 8 / 11
