"""Trainer parts: schedules, heads, EMA, model composition, optimizers, checkpoints, synthetic data."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from train.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from train.methods import build_model
from train.models import Encoder, mlp, update_momentum
from train.optim import LARS, build_optimizer, param_groups, set_hyperparameters
from train.resolve import resolve_config
from train.schedules import build_schedules, cosine_schedule
from train.synthetic import SyntheticLoader

# ------------------------------------------------------------------------------ schedules


def test_cosine_schedule_by_hand():
    s = cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2)
    # warmup 0, 0.5; cosine over 4 steps: (1 + cos(pi t / 4)) / 2 for t = 0..3
    expected = [0.0, 0.5] + [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    np.testing.assert_allclose(s, expected)
    np.testing.assert_allclose(cosine_schedule(0.3, 0.3, 5), [0.3] * 5)
    m = cosine_schedule(0.992, 1.0, 1000)
    assert m[0] == 0.992 and m[-1] == pytest.approx(1.0, abs=1e-7) and np.all(np.diff(m) >= 0)
    assert len(cosine_schedule(1.0, 0.0, 3, warmup_steps=10)) == 3
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 0)


def test_build_schedules_uses_the_scaling_rule_and_steps():
    cfg = resolve_config(
        {
            "method": "mos",
            "data": {"batch_size": 512},
            "schedule": {"epochs": 3, "warmup_epochs": 1},
        }
    )
    s = build_schedules(cfg, steps_per_epoch=10)
    assert s.total_steps == 30
    assert max(s.lr) == pytest.approx(5e-4 * 512 / 256)  # lr = base_lr * batch / 256
    assert s.lr[0] == 0 and s.lr[10] == pytest.approx(max(s.lr))  # 10 warmup steps
    assert s.weight_decay[0] == pytest.approx(0.04)
    short = resolve_config({"method": "mos", "schedule": {"steps": 7}})
    assert build_schedules(short, steps_per_epoch=10).total_steps == 7
    with pytest.raises(ValueError, match="smaller than one global batch"):
        build_schedules(cfg, steps_per_epoch=0)


# -------------------------------------------------------------------------------- models


def test_mlp_from_sizes():
    proj = mlp(384, (4096, 4096, 256), last_bn=True)  # MOS / MoCo v3 projector
    kinds = [type(m).__name__ for m in proj]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert proj[-1].affine is False and proj[-2].bias is None
    pred = mlp(256, (4096, 256))  # BYOL predictor
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert pred[0].bias is None and pred[-1].bias is not None
    assert pred(torch.randn(4, 256)).shape == (4, 256)


def test_update_momentum_is_an_ema_of_the_pairs():
    online, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    update_momentum([(online, ema)], 1.0)
    assert torch.equal(ema.weight, before)
    update_momentum([(online, ema)], 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * before + 0.25 * online.weight.detach())
    update_momentum([(online, ema)], 0.0)
    assert torch.equal(ema.weight, online.weight)


def tiny_cfg(method="mos"):
    vit = method in ("mos", "mocov3")
    return resolve_config(
        {
            "method": method,
            "data": {"batch_size": 4, "size": 32, "instance_size": 16, "num_instances": 3},
            "model": {
                "backbone": "vit_tiny_patch16_224" if vit else "resnet18",
                **(
                    {"img_size": 32, "patch_size": 8, "backbone_kwargs": {"depth": 1}}
                    if vit
                    else {}
                ),
                "projector": [16, 16, 8] if vit else [16, 8],
                "predictor": [16, 8],
            },
        }
    )


def test_model_composition_and_target_is_a_frozen_copy():
    model, _ = build_model(tiny_cfg("mos"))
    assert isinstance(model.online, Encoder) and isinstance(model.target, Encoder)
    assert all(not p.requires_grad for p in model.target.parameters())
    for (n1, p1), (n2, p2) in zip(
        model.online.named_parameters(), model.target.named_parameters(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert model.momentum_pairs == [(model.online, model.target)]
    uni, _ = build_model(tiny_cfg("univip"))
    assert uni.extra["instance_map"].in_features == 3 * 8  # eq. 4: K * D -> D
    assert uni.extra["instance_map"].out_features == 8


def test_encoder_batches_equal_views_like_separate_calls():
    model, _ = build_model(tiny_cfg("mos"))
    model.eval()  # BN running statistics: the result does not depend on batch composition
    a, b, c = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)
    together = model.online.features([a, b, c])
    apart = [model.online.features([x])[0] for x in (a, b, c)]
    for t, s in zip(together, apart, strict=True):
        torch.testing.assert_close(t, s, rtol=1e-4, atol=1e-5)


def test_every_method_step_returns_its_terms_and_gradients_reach_the_online_branch():
    for method, batch in [
        ("mos", SyntheticLoader("mos", 4, size=32, num_samples=8)),
        (
            "univip",
            SyntheticLoader("univip", 4, size=32, instance_size=16, num_instances=3, num_samples=8),
        ),
        ("byol", SyntheticLoader("multicrop", 4, size=32, num_samples=8)),
        ("mocov3", SyntheticLoader("multicrop", 4, size=32, num_samples=8)),
    ]:
        model, _ = build_model(tiny_cfg(method))
        out = model(next(iter(batch)))
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        assert model.predictor[0].weight.grad is not None
        assert all(p.grad is None for p in model.target.parameters())
        if method == "univip":
            assert model.extra["instance_map"].weight.grad is not None


def test_unknown_backbone_is_a_clear_error():
    cfg = resolve_config({"method": "mos", "model": {"backbone": "vit_nonexistent_patch16"}})
    with pytest.raises(ValueError, match="unknown timm backbone 'vit_nonexistent_patch16'"):
        build_model(cfg)


# ----------------------------------------------------------------------------- optimizers


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    groups = param_groups(model)
    assert len(groups[0]["params"]) == 2 and len(groups[1]["params"]) == 4
    opt = build_optimizer(model, resolve_config({"method": "mos"}).optim)
    set_hyperparameters(opt, lr=0.1, weight_decay=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert len(param_groups(model, exclude_bias_norm=False)) == 1


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [{"params": [w], "lars_adapt": True}, {"params": [b], "lars_adapt": False}],
        lr=0.1,
        momentum=0.9,
        eta=0.001,
    )
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    w.grad = torch.tensor([0.0, 2.0])  # |g| = 2: trust = 0.001 * 5 / 2
    b.grad = torch.tensor([0.5])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.1 * 2.0 * 0.0025]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_atomic_keep_last_and_weights_only(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(
            {"format": 1, "step": step, "w": torch.ones(2) * step}, tmp_path, step, keep_last=2
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]
    assert latest_checkpoint(tmp_path).name == "step-00000004.pt"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": 99}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an ssl-cli pretraining checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_with_a_non_tensor_object_fails_weights_only(tmp_path):
    # the guarantee we rely on: arbitrary objects cannot sneak into a checkpoint we load
    save_checkpoint({"format": 1, "bad": object()}, tmp_path, 1, keep_last=1)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path))


def test_rng_round_trip_through_weights_only(tmp_path):
    state = capture_rng(torch.device("cpu"))
    save_checkpoint({"format": 1, "rng": [state]}, tmp_path, 1, keep_last=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    restore_rng(load_checkpoint(latest_checkpoint(tmp_path))["rng"][0], torch.device("cpu"))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ------------------------------------------------------------------------ synthetic loader


def test_synthetic_batches_follow_the_loader_contract():
    mos = next(iter(SyntheticLoader("mos", 6, size=32, num_samples=12)))
    for k in ("single1", "single2", "multi1", "multi2"):
        assert mos[k].shape == (6, 3, 32, 32) and mos[k].dtype == torch.float32
    for k in ("members1", "members2"):
        assert mos[k].dtype == torch.int64 and mos[k].shape[0] == 6
        assert 0 <= int(mos[k].min()) and int(mos[k].max()) < 6  # LOCAL indices
    assert mos["index"].shape == (6,) and mos["index"].dtype == torch.int64
    uni = next(
        iter(
            SyntheticLoader("univip", 2, size=32, instance_size=16, num_instances=4, num_samples=4)
        )
    )
    assert uni["scene1"].shape == (2, 3, 32, 32) and uni["instances"].shape == (2, 4, 3, 16, 16)
    mc = next(iter(SyntheticLoader("multicrop", 2, size=32, num_crops=3, num_samples=4)))
    assert len(mc["crops"]) == 3 and mc["crops"][0].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown view set 'dino'"):
        SyntheticLoader("dino", 2)


def test_synthetic_loader_resumes_exactly_and_splits_ranks():
    loader = SyntheticLoader("mos", 4, size=16, num_samples=16, seed=3)
    loader.set_epoch(1)
    full = list(loader)
    assert len(full) == len(loader) == 4 and loader.state_dict() == {"epoch": 1, "batch": 4}
    again = SyntheticLoader("mos", 4, size=16, num_samples=16, seed=3)
    again.load_state_dict({"epoch": 1, "batch": 2})
    rest = list(again)
    assert len(rest) == 2
    for a, b in zip(full[2:], rest, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
    # two ranks: disjoint samples, the same stitching layout (same M) at every step
    r0 = list(SyntheticLoader("mos", 2, rank=0, world_size=2, num_samples=8, size=16))
    r1 = list(SyntheticLoader("mos", 2, rank=1, world_size=2, num_samples=8, size=16))
    seen = torch.cat([b["index"] for b in r0 + r1])
    assert sorted(seen.tolist()) == list(range(8))
    for a, b in zip(r0, r1, strict=True):
        assert a["members1"].shape == b["members1"].shape
        assert a["members2"].shape == b["members2"].shape
        assert a["layout1"] == b["layout1"] and a["layout2"] == b["layout2"]


def test_synthetic_pool_serves_cached_batches():
    loader = SyntheticLoader("multicrop", 2, num_samples=8, size=8, pool=2)
    a, b, c, _ = list(loader)
    assert a is c and a is not b


def test_mos_counts_objects_not_views():
    from pipeline.layout import stitch_layout
    from train.losses.mos import object_members, soft_targets

    layout = stitch_layout(224, 2, (1, 2, 1, 1))  # cell 1 holds 4 small views of one sample
    b = 4
    per_crop = torch.tensor([[(i + j) % b for j in layout.cell_of_crop] for i in range(b)])
    assert per_crop.shape == (b, 7)
    objects = object_members({"members1": per_crop, "layout1": layout}, 1)
    assert objects.tolist() == [[(i + j) % b for j in range(4)] for i in range(b)]
    # stitched vs single: each of the four objects weighs 1/4, the subdivided cell included
    targets = soft_targets(objects, torch.arange(b)[:, None])
    assert torch.allclose(targets, torch.full((b, b), 0.25))
    # without a layout the members are taken as one per object already
    assert object_members({"members1": objects}, 1) is objects
