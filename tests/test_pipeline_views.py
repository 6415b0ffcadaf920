"""View-set planning, epoch plans and the mosaic stitching: numpy/torch only, no DALI."""

import random

import numpy as np
import pytest
import torch

from pipeline.augment import BYOL_VIEW1, BYOL_VIEW2, NO_AUGMENT, Augment, draw_photometric
from pipeline.layout import sample_layout, stitch_layout
from pipeline.source import EpochPlan
from pipeline.stitching import stitch_mosaic, stitch_multiscale
from pipeline.views import (
    MOSViews,
    MultiCropViews,
    UniVIPViews,
    crop_windows,
    frame_windows,
    view_set,
)
from pipeline.views.mos import _mosaic_frames

# ------------------------------------------------------------------------------ augmentation


def test_draw_photometric_identity_and_always():
    rng = np.random.default_rng(0)
    p = draw_photometric(NO_AUGMENT, 50, rng)
    assert np.array_equal(p.colour, np.tile([1, 1, 1, 0], (50, 1)).astype(np.float32))
    assert (p.window == 1).all() and not p.solarize.any() and not p.flip.any()

    always = Augment(flip=1, jitter=1, grayscale=1, blur=1, solarize=1)
    p = draw_photometric(always, 200, rng)
    assert p.flip.all() and p.solarize.all()
    assert (p.colour[:, 2] == 0).all()  # grayscale: saturation 0
    assert (np.abs(p.colour[:, 0] - 1) <= 0.4).all() and (np.abs(p.colour[:, 1] - 1) <= 0.4).all()
    assert (np.abs(p.colour[:, 3]) <= 36).all() and np.abs(p.colour[:, 3]).max() > 20  # degrees
    assert ((p.sigma >= 0.1) & (p.sigma <= 2.0)).all()
    assert np.array_equal(p.window, 2 * np.ceil(3 * p.sigma).astype(int) + 1)


def test_draw_photometric_rates_and_per_crop_augments():
    rng = np.random.default_rng(1)
    p = draw_photometric(BYOL_VIEW2, 20000, rng)
    assert abs(p.flip.mean() - 0.5) < 0.02
    assert abs((p.window > 1).mean() - 0.1) < 0.01
    assert abs(p.solarize.mean() - 0.2) < 0.01
    assert abs((p.colour[:, 2] == 0).mean() - 0.2) < 0.01
    jittered = (p.colour[:, 0] != 1) | (p.colour[:, 3] != 0)
    assert abs(jittered.mean() - 0.8) < 0.02
    # a tuple gives every crop its own augmentation
    q = draw_photometric((BYOL_VIEW1, NO_AUGMENT) * 500, None, rng)
    assert (q.window[1::2] == 1).all() and (q.window[0::2] > 1).all()


def test_augment_validation():
    with pytest.raises(ValueError, match="blur"):
        Augment(blur=1.5)
    with pytest.raises(ValueError, match="sigma"):
        Augment(sigma=(2.0, 1.0))
    with pytest.raises(ValueError, match="unknown Augment keys"):
        Augment.from_dict({"blurr": 0.5})
    assert Augment.from_dict({"blur": 0.5, "sigma": [0.2, 1.0]}) == Augment(
        blur=0.5, sigma=(0.2, 1.0)
    )


# ------------------------------------------------------------------------------- windows


def test_frame_windows_split_flip_and_margin():
    box = np.array([[10, 20, 50, 100]])  # x 10..50, y 20..100
    # a 2x2 split tiles the box
    w = frame_windows(np.repeat(box, 4, 0), np.zeros(4, bool), 2, [0, 0, 1, 1], [0, 1, 0, 1])
    assert np.allclose(
        w, [[20, 10, 60, 30], [20, 30, 60, 50], [60, 10, 100, 30], [60, 30, 100, 50]]
    )
    # flipped: output column 0 shows the right half, reversed
    f = frame_windows(np.repeat(box, 2, 0), np.ones(2, bool), 2, 0, [0, 1])
    assert np.allclose(f, [[20, 50, 60, 30], [20, 30, 60, 10]])
    # a margin of m output pixels of a frame of side c widens by m * (sub-window / c)
    m = frame_windows(box, [False], 1, 0, 0, margin=5, size=20)
    assert np.allclose(m, [[20 - 20, 10 - 10, 100 + 20, 50 + 10]])
    assert np.allclose(crop_windows(box, [True]), [[20, 50, 100, 10]])


@pytest.mark.parametrize("seed", range(6))
def test_mos_frames_tile_each_crop(seed):
    """Every crop's frames (margins removed) tile its box; frames of a crop share parameters."""
    views = MOSViews()
    rng = np.random.default_rng(seed)
    layouts = views.plan_batch(rng)
    plan = views.plan_sample(300, 200, None, rng, layouts)
    c, g = views.frame_size, views.frame_grid
    assert {k: v.shape for k, v in plan.windows.items()} == {
        "single1": (1, 4),
        "single2": (1, 4),
        "multi1": (g * g, 4),
        "multi2": (g * g, 4),
    }
    for v, layout in enumerate(layouts, 1):
        crop, q, row, col = _mosaic_frames(layout, c, g)
        sides = [
            side for side, n in zip(layout.crop_sizes, layout.crops_per_cell) for _ in range(n)
        ]
        assert np.bincount(crop).tolist() == [(side // c) ** 2 for side in sides]
        win = plan.windows[f"multi{v}"].astype(np.float64)
        margin = views._margin(views.multi_augment[v - 1])
        p = plan.photometric[f"multi{v}"]
        for k in range(layout.num_crops):
            f = crop == k
            assert (p.colour[f] == p.colour[f][0]).all() and (p.flip[f] == p.flip[f][0]).all()
            ws, n, flip = win[f], q[f][0], p.flip[f][0]
            assert ((ws[:, 1] > ws[:, 3]) == flip).all()
            # without the margin, the sub-windows of crop k form an n x n grid of equal cells
            shrink = 1 + 2 * margin / c
            sh, sw = (ws[:, 2] - ws[:, 0]) / shrink, np.abs(ws[:, 3] - ws[:, 1]) / shrink
            assert np.allclose(sh, sh[0]) and np.allclose(sw, sw[0])
            top = ws[:, 0] + sh * margin / c
            left = np.minimum(ws[:, 1], ws[:, 3]) + sw * margin / c
            src_col = n - 1 - col[f] if flip else col[f]
            assert np.allclose(top, top.min() + row[f] * sh[0], atol=1e-3)
            assert np.allclose(left, left.min() + src_col * sw[0], atol=1e-3)
    # the layout goes to the loader with the sample
    assert plan.extras["layout"].shape == (2, 1 + views.max_cells)
    assert [views.decode_layout(c) for c in plan.extras["layout"]] == list(layouts)


def test_univip_and_multicrop_plans():
    rng = np.random.default_rng(3)
    u = UniVIPViews()
    boxes = np.array([[10, 10, 80, 90], [100, 50, 200, 150], [0, 0, 64, 64]], np.int32)
    plan = u.plan_sample(320, 240, boxes, rng, None)
    assert plan.windows["scene1"].shape == (1, 4) and plan.windows["instance"].shape == (4, 4)
    b = plan.extras["boxes"]
    assert b.shape == (6, 4) and b.dtype == np.int32
    ov = np.concatenate([np.maximum(b[0, :2], b[1, :2]), np.minimum(b[0, 2:], b[1, 2:])])
    assert (b[2:, :2] >= ov[:2]).all() and (b[2:, 2:] <= ov[2:]).all()

    m = MultiCropViews(num_global=3)
    banks = {bank.name: bank.frames for bank in m.banks()}
    assert banks == {"global1": 2, "global2": 1, "local": 6}
    plan = m.plan_sample(320, 240, None, rng, None)
    assert plan.extras["boxes"].shape == (9, 4)
    assert MultiCropViews.byol().banks()[-1].name == "global2"


def test_banks_hold_only_the_operators_they_need():
    banks = {b.name: b for b in MOSViews().banks()}
    assert banks["single1"].blur and not banks["single1"].solarize  # Table 6: blur 0.1, sol 0
    assert banks["single2"].blur and banks["single2"].solarize
    assert banks["multi1"].margin == banks["multi2"].margin == 6  # ceil(3 * 2.0)
    assert banks["multi1"].frames == 16 and banks["multi1"].size == 56
    plain = MOSViews(grid_choices=(2,), scale_choices=(1,))  # Table 6: four 112-px views
    assert {b.name: (b.size, b.frames, b.margin) for b in plain.banks()}["multi1"] == (112, 4, 0)
    assert MOSViews(size=32).frame_size == 8
    assert not MultiCropViews(global_augment=(NO_AUGMENT,)).banks()[0].photometric


def test_view_set_validation():
    with pytest.raises(ValueError, match="divisible"):
        MOSViews(size=30)
    with pytest.raises(ValueError, match="single_augment needs 2"):
        MOSViews(single_augment=(BYOL_VIEW1,))
    with pytest.raises(ValueError, match="scale"):
        UniVIPViews(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="num_local"):
        MultiCropViews(num_local=-1)
    with pytest.raises(ValueError, match="valid: .*mos.*multicrop.*univip"):
        view_set("simclr")
    assert view_set("mos", size=32).size == 32
    # from a config file: lists and dicts
    m = MOSViews(multi_augment=[{"blur": 0.5}, {"solarize": 0.3}], grid_choices=[2])
    assert m.multi_augment == (Augment(blur=0.5), Augment(solarize=0.3)) and m.grid_choices == (2,)
    assert UniVIPViews(instance_augment={"blur": 0.0}).instance_augment == Augment()


# ----------------------------------------------------------------------------- stitching


@pytest.mark.parametrize("b", [1, 3, 4, 7])
@pytest.mark.parametrize("seed", range(4))
def test_stitch_mosaic_equals_stitch_multiscale(b, seed):
    layout = sample_layout(16, (1, 2), (1, 2), rng=random.Random(seed))
    c, g = 4, 4
    frames = torch.randn(b, g * g, 3, c, c)
    images, members = stitch_mosaic(frames, layout)
    # reference: cut the crops out of each sample's mosaic, stitch with stitch_multiscale
    mosaic = frames.reshape(b, g, g, 3, c, c).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 16, 16)
    cells, cs = [], layout.cell_size
    for j, s in enumerate(layout.scales):
        cy, cx = divmod(j, layout.grid)
        cell = mosaic[:, :, cy * cs : (cy + 1) * cs, cx * cs : (cx + 1) * cs]
        h = cs // s
        cells.append(
            cell.reshape(b, 3, s, h, s, h).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, 3, h, h)
        )
    ref_images, ref_members = stitch_multiscale(cells, layout.grid)
    assert torch.equal(images, ref_images) and torch.equal(members, ref_members)


def test_stitch_mosaic_rejects_misaligned_frames():
    with pytest.raises(ValueError, match="frame grid"):
        stitch_mosaic(torch.zeros(2, 4, 3, 8, 8), stitch_layout(16, 2, (2, 1, 1, 1)))
    with pytest.raises(ValueError, match="square grid"):
        stitch_mosaic(torch.zeros(2, 3, 3, 8, 8), stitch_layout(16, 2, 1))


# ---------------------------------------------------------------------------- epoch plans


@pytest.mark.parametrize("n,batch,world", [(12, 3, 2), (12, 3, 3), (29, 4, 2), (7, 7, 1)])
def test_epoch_plan_ranks_disjoint_cover_and_defer_the_remainder(n, batch, world):
    plan = EpochPlan(n, batch, world, seed=5)
    g = batch * world
    assert plan.batches == n // g and plan.remainder == n % g
    previous_deferred: set[int] = set()
    for epoch in range(4):
        taken = [plan.rows(epoch, t, r) for t in range(plan.batches) for r in range(world)]
        rows = np.concatenate(taken)
        assert len(rows) == len(set(rows.tolist())) == plan.batches * g  # disjoint, no repeats
        order = plan.order(epoch)
        assert sorted(order.tolist()) == list(range(n))
        assert set(order[: len(previous_deferred)].tolist()) == previous_deferred  # served first
        deferred = set(order[plan.batches * g :].tolist())
        assert len(deferred) == plan.remainder and deferred.isdisjoint(rows.tolist())
        assert deferred.isdisjoint(previous_deferred)  # nobody waits more than one epoch
        previous_deferred = deferred


def test_epoch_plan_deterministic_and_random_access():
    a, b = EpochPlan(50, 4, 3, seed=1), EpochPlan(50, 4, 3, seed=1)
    for e in (0, 1, 2, 3):
        a.order(e)
    assert np.array_equal(a.order(3), b.order(3))  # sequential == direct
    assert np.array_equal(a.order(1), b.order(1))  # going back recomputes
    assert not np.array_equal(EpochPlan(50, 4, 3, seed=2).order(0), a.order(0))
    with pytest.raises(ValueError, match="do not fill one global batch"):
        EpochPlan(5, 3, 2, seed=0)
    with pytest.raises(IndexError):
        a.rows(0, a.batches, 0)
