"""MOS losses: soft targets, soft contrastive, the three-term sum, and the DDP key gather."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.losses.contrastive import soft_contrastive
from train.losses.mos import MOSLoss, global_members, global_single_members, soft_targets


def single(batch_size):
    return torch.arange(batch_size)[:, None]


def cyclic(batch_size, objects, shift=0):
    """Cyclic stitching (appendix B): image i holds samples i + shift, ..., i + shift + objects - 1."""
    return torch.tensor(
        [[(i + shift + j) % batch_size for j in range(objects)] for i in range(batch_size)]
    )


def reference_targets(members_q, members_k):
    """Shared-sample counts with explicit loops over pairs of cells, rows normalised."""
    rows = []
    for mq in members_q.tolist():
        counts = [sum(a == b for a in mq for b in mk) for mk in members_k.tolist()]
        total = sum(counts)
        rows.append([c / total if total else 0.0 for c in counts])
    return torch.tensor(rows)


# ----------------------------------------------------------------------------------- targets


def test_single_vs_single_is_identity():
    assert torch.equal(soft_targets(single(5), single(5)), torch.eye(5))


def test_stitched_vs_single_by_hand_with_multiplicity():
    stitched = torch.tensor([[0, 1], [1, 2], [2, 2]])  # the last image holds sample 2 twice
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(soft_targets(stitched, single(3)), expected)
    # the other way: sample 2 sits in image 1 once and in image 2 twice
    expected_t = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1 / 3, 2 / 3]])
    torch.testing.assert_close(soft_targets(single(3), stitched), expected_t)


def test_stitched_vs_stitched_by_hand_with_multiplicity():
    q = torch.tensor([[0, 1], [1, 2], [2, 2]])
    k = torch.tensor([[0, 0], [1, 2], [2, 0]])
    # row 0 (0,1): k0 (0,0) 2 pairs, k1 (1,2) 1 pair, k2 (2,0) 1 pair
    # row 1 (1,2): k0 none, k1 2 pairs, k2 1 pair
    # row 2 (2,2): k0 none, k1 2 pairs, k2 2 pairs
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 2 / 3, 1 / 3], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(soft_targets(q, k), expected)


def test_paper_appendix_b_cyclic_example():
    # figure 5: 9 samples, 3 objects per image; the second image of view 1, (1, 2, 3), overlaps
    # the five view-2 images (8,0,1), (0,1,2), (1,2,3), (2,3,4), (3,4,5) by 1, 2, 3, 2, 1 objects
    view1 = cyclic(9, 3)  # image i = (i, i+1, i+2)
    view2 = cyclic(9, 3, shift=-1)  # image i = (i-1, i, i+1)
    targets = soft_targets(view1, view2)
    torch.testing.assert_close(targets, reference_targets(view1, view2))
    row = targets[1] * 9  # 9 overlapping pairs in all
    positives = {j: round(float(row[j])) for j in range(9) if row[j] > 0}
    assert positives == {0: 1, 1: 2, 2: 3, 3: 2, 4: 1}


def test_soft_targets_random_rows_sum_to_one_and_match_loops():
    gen = torch.Generator().manual_seed(0)
    for grid_q, grid_k in [(2, 2), (3, 1), (1, 2), (4, 4)]:
        q = torch.randint(0, 6, (7, grid_q * grid_q), generator=gen)
        k = torch.randint(0, 6, (5, grid_k * grid_k), generator=gen)
        k[:, 0] = torch.arange(5)  # keys cover samples 0..4; queries may miss them all
        targets = soft_targets(q, k)
        torch.testing.assert_close(targets, reference_targets(q, k))
        sums = targets.sum(dim=1)
        has_overlap = (q[:, :, None] < 5).any(dim=(1, 2))
        torch.testing.assert_close(sums[has_overlap], torch.ones(int(has_overlap.sum())))


def test_no_overlap_row_is_zero_not_nan():
    targets = soft_targets(torch.tensor([[7, 8], [0, 1]]), single(3))
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets[0], torch.zeros(3))
    torch.testing.assert_close(targets[1], torch.tensor([0.5, 0.5, 0.0]))


@pytest.mark.parametrize(
    "members, message",
    [
        (torch.arange(3), r"\[B, M\]"),
        (torch.zeros(3, 1, dtype=torch.int32), "int64"),
        (torch.tensor([[-1]]), "non-negative"),
    ],
)
def test_soft_targets_rejects_bad_members(members, message):
    with pytest.raises(ValueError, match=message):
        soft_targets(members, single(3))


# ------------------------------------------------------------------------------ contrastive


def test_soft_contrastive_tiny_case_by_hand():
    q = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    k = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # (1, 0) and (0, 1)
    tau = 0.5  # logits 2 and 0
    loss = soft_contrastive(q, k, torch.tensor([[0.5, 0.5]]), tau)
    log_z = math.log(math.exp(2.0) + 1.0)
    expected = -(0.5 * (2.0 - log_z) + 0.5 * (0.0 - log_z))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_contrastive_equals_cross_entropy_for_one_hot_targets():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 8, generator=gen), torch.randn(9, 8, generator=gen)
    labels = torch.tensor([3, 0, 8, 8, 1, 5])
    tau = 0.2
    logits = torch.tensor(
        [[F.cosine_similarity(q[i], k[j], dim=0).item() / tau for j in range(9)] for i in range(6)]
    )
    expected = F.cross_entropy(logits, labels)
    loss = soft_contrastive(q, k, F.one_hot(labels, 9).float(), tau)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_soft_contrastive_skips_rows_without_positive():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    targets = torch.eye(3)
    targets[1] = 0.0
    both = soft_contrastive(q[[0, 2]], k, targets[[0, 2]], 0.2)
    assert soft_contrastive(q, k, targets, 0.2).item() == pytest.approx(both.item(), abs=1e-6)
    assert soft_contrastive(q, k, torch.zeros(3, 3), 0.2).item() == 0.0


def test_soft_contrastive_keys_are_stop_gradient():
    q = torch.randn(4, 5, requires_grad=True)
    k = torch.randn(4, 5, requires_grad=True)
    soft_contrastive(q, k, torch.eye(4), 0.2).backward()
    assert k.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_soft_contrastive_rejects_bad_shapes():
    with pytest.raises(ValueError, match="columns"):
        soft_contrastive(torch.randn(2, 3), torch.randn(4, 3), torch.ones(2, 3), 0.2)
    with pytest.raises(ValueError, match=r"\[Bq, D\]"):
        soft_contrastive(torch.randn(2, 3), torch.randn(4, 5), torch.ones(2, 4), 0.2)


# ------------------------------------------------------------------------------- three terms


def reference_direction(q, k, members_q, members_k, tau):
    """2 tau * mean_i -sum_j t_ij log softmax_j(cos(q_i, k_j) / tau), with explicit loops."""
    targets = reference_targets(members_q, members_k).tolist()
    total = 0.0
    for i in range(q.shape[0]):
        logits = [F.cosine_similarity(q[i], k[j], dim=0).item() / tau for j in range(k.shape[0])]
        log_z = math.log(sum(math.exp(x) for x in logits))
        total += -sum(t * (x - log_z) for t, x in zip(targets[i], logits, strict=True))
    return 2 * tau * total / q.shape[0]


def make_views(batch_size=4, grid=2, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = {n: torch.randn(batch_size, dim, generator=gen) for n in ("m1", "m2", "s1", "s2")}
    proj = {n: torch.randn(batch_size, dim, generator=gen) for n in ("m1", "m2", "s1", "s2")}
    members = {
        "m1": cyclic(batch_size, grid * grid),
        "m2": torch.stack(
            [torch.randperm(batch_size, generator=gen)[: grid * grid] for _ in range(batch_size)]
        ),
        "s": single(batch_size),
    }
    return feats, proj, members


NAMES = {"m1": "multi1", "m2": "multi2", "s1": "single1", "s2": "single2"}


def call(loss_fn, p, z, members):
    """The loss on short-named test tensors; single views share the ``s`` members."""
    view_members = {"multi1": members["m1"], "multi2": members["m2"]}
    view_members["single1"] = view_members["single2"] = members["s"]
    return loss_fn(
        {NAMES[n]: v for n, v in p.items()}, {NAMES[n]: v for n, v in z.items()}, view_members
    )


def symmetric(**kwargs):
    """Every view through both branches, both directions per term, MoCo v3's 2 tau factor."""
    return MOSLoss(form="symmetric", scale_by_2tau=True, **kwargs)


def test_mos_loss_paper_form_is_one_direction_per_term():
    """Section 3.2: m2s = H(q^, k), m2m = H(q^, k^), s2s = H(q, k'), summed (eq. 14), with
    q^ = multi2 and q = single1 (base branch), k = single1, k' = single2, k^ = multi1
    (momentum branch); a plain cross-entropy, no 2 tau factor."""
    tau = 0.2
    p, z, m = make_views(seed=7)
    loss_fn = MOSLoss(temperature=tau)
    assert loss_fn.query_views == ("single1", "multi2")
    assert loss_fn.key_views == ("single1", "single2", "multi1")
    only = {"single1": p["s1"], "multi2": p["m2"]}
    keys = {"single1": z["s1"], "single2": z["s2"], "multi1": z["m1"]}
    members = {"single1": m["s"], "single2": m["s"], "multi1": m["m1"], "multi2": m["m2"]}
    out = loss_fn(only, keys, members)
    # reference_direction carries MoCo v3's 2 tau; the paper's form does not
    d = lambda a, b, ma, mb: reference_direction(p[a], z[b], m[ma], m[mb], tau) / (2 * tau)  # noqa: E731
    expected = {
        "m2s": d("m2", "s1", "m2", "s"),
        "m2m": d("m2", "m1", "m2", "m1"),
        "s2s": d("s1", "s2", "s", "s"),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=1e-5), name
    assert out["loss"].item() == pytest.approx(sum(expected.values()), abs=1e-5)
    # PatchMix's weights: half on the two stitched terms
    half = MOSLoss(temperature=tau, weight_m2s=0.5, weight_m2m=0.5)(only, keys, members)
    assert half["loss"].item() == pytest.approx(
        0.5 * expected["m2s"] + 0.5 * expected["m2m"] + expected["s2s"], abs=1e-5
    )
    with pytest.raises(ValueError, match="needs views"):
        loss_fn({"single1": p["s1"]}, keys, members)
    with pytest.raises(ValueError, match="form"):
        MOSLoss(form="both")


def test_mos_loss_views_follow_the_weights():
    """A skipped term drops the views only it needs (table 4 ablations cost less)."""
    s2s_only = MOSLoss(weight_m2s=0, weight_m2m=0)
    assert s2s_only.query_views == ("single1",) and s2s_only.key_views == ("single2",)
    assert (
        symmetric().query_views
        == symmetric().key_views
        == (
            "single1",
            "single2",
            "multi1",
            "multi2",
        )
    )


def test_mos_loss_matches_loops_per_term():
    tau = 0.2
    p, z, m = make_views()
    out = call(symmetric(temperature=tau), p, z, m)
    d = lambda a, b, ma, mb: reference_direction(p[a], z[b], m[ma], m[mb], tau)  # noqa: E731
    expected = {
        "m2s": d("m1", "s2", "m1", "s") + d("m2", "s1", "m2", "s"),
        "m2m": d("m1", "m2", "m1", "m2") + d("m2", "m1", "m2", "m1"),
        "s2s": d("s1", "s2", "s", "s") + d("s2", "s1", "s", "s"),
    }
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, abs=1e-5), name
    assert out["loss"].item() == pytest.approx(sum(expected.values()), abs=1e-5)


def test_mos_loss_scale_and_weights():
    tau = 0.1
    p, z, m = make_views(seed=3)
    scaled = call(symmetric(temperature=tau), p, z, m)
    plain = call(MOSLoss(temperature=tau, form="symmetric"), p, z, m)
    for name in ("m2s", "m2m", "s2s"):
        assert scaled[name].item() == pytest.approx(2 * tau * plain[name].item(), rel=1e-5)
    s2s_only = call(symmetric(temperature=tau, weight_m2s=0, weight_m2m=0), p, z, m)
    assert s2s_only["m2s"].item() == 0.0 and s2s_only["m2m"].item() == 0.0
    assert s2s_only["loss"].item() == pytest.approx(scaled["s2s"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        MOSLoss(temperature=0.0)


def test_mos_loss_goes_down():
    p, z, m = make_views(batch_size=8, seed=4)
    params = {n: v.clone().requires_grad_(True) for n, v in p.items()}
    loss_fn = MOSLoss()  # the paper's form: only single1 and multi2 get gradient
    opt = torch.optim.SGD(params.values(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = call(loss_fn, params, z, m)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_global_members_without_process_group_is_identity():
    members = cyclic(4, 4)
    assert torch.equal(global_members(members, 4), members)
    assert torch.equal(global_single_members(4), single(4))


# ------------------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, form):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        p, z, m = torch.load(f"{out_dir}/inputs.pt")
        local = p["m1"].shape[0] // world
        rows = slice(rank * local, (rank + 1) * local)
        p_local = {n: v[rows].clone().requires_grad_(True) for n, v in p.items()}
        z_local = {n: v[rows] for n, v in z.items()}
        # members: this rank's stitched images of its own samples, local indices -> global
        m_local = {n: global_members(v[rows] - rank * local, local) for n, v in m.items()}
        assert torch.equal(m_local["s"], global_single_members(local))
        out = call(MOSLoss(form=form), p_local, z_local, m_local)
        out["loss"].backward()
        # this rank's one-hot targets against its own keys: placed at its columns
        single_local = soft_contrastive(p["s1"][rows], z["s2"][rows], torch.eye(local), 0.2)
        torch.save(
            {
                "out": {k: v.item() for k, v in out.items()},
                "grads": {n: v.grad for n, v in p_local.items()},
                "single": single_local.item(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("form", ["paper", "symmetric"])
def test_ddp_gather_matches_single_process(tmp_path, form):
    world, local = 2, 4
    batch = world * local
    p, z, _ = make_views(batch_size=batch, seed=5)
    # each rank stitches its own samples (cyclic and shifted), written here in global indices
    m = {
        "m1": torch.cat([cyclic(local, 4) + r * local for r in range(world)]),
        "m2": torch.cat([cyclic(local, 4, shift=1) + r * local for r in range(world)]),
        "s": single(batch),
    }
    torch.save((p, z, m), tmp_path / "inputs.pt")
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path), form), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    params = {n: v.clone().requires_grad_(True) for n, v in p.items()}
    full = call(MOSLoss(form=form), params, z, m)
    full["loss"].backward()
    for name in ("loss", "m2s", "m2m", "s2s"):  # DDP averages the per-rank losses
        ranks = sum(r["out"][name] for r in results) / world
        assert ranks == pytest.approx(full[name].item(), abs=1e-5), name
    used = {NAMES[n] for n in params} & set(MOSLoss(form=form).query_views)
    for name, value in params.items():  # DDP averages the per-rank gradients
        if NAMES[name] not in used:  # a view the base branch never sees has no gradient
            assert value.grad is None and all(r["grads"][name] is None for r in results)
            continue
        ranks = torch.cat([r["grads"][name] for r in results]) / world
        torch.testing.assert_close(ranks, value.grad, atol=1e-6, rtol=1e-4)
    single_full = soft_contrastive(p["s1"], z["s2"], torch.eye(batch), 0.2)
    ranks = sum(r["single"] for r in results) / world
    assert ranks == pytest.approx(single_full.item(), abs=1e-5)


def test_soft_targets_with_a_known_sample_bound_match_the_checked_path():
    members_q = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0], [2, 2, 3, 1]])
    members_k = torch.tensor([[3], [1], [0], [2]])
    checked = soft_targets(members_q, members_k)
    bounded = soft_targets(members_q, members_k, num_samples=8)  # any bound above the indices
    torch.testing.assert_close(bounded, checked)
