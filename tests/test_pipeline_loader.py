"""The DALI view loader on CPU (``device="cpu"``): batches, stitching, scenes, epochs, ranks,
determinism, resume. GPU-only checks carry the ``gpu`` marker."""

import io
import multiprocessing
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, NO_AUGMENT, Augment
from pipeline.loader import ViewLoader
from pipeline.source import EpochPlan
from pipeline.views import DecodeCropViews, MOSViews, MultiCropViews, UniVIPViews
from tests.test_pipeline_shards import GREYS, constant_shards, grey_of_row, photo_shards

warnings.filterwarnings("ignore", message=".*external source.*not used.*")

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD  # range of a normalized image
SMALL_MOS = MOSViews(size=64)  # frames of 16 px: fast on CPU, the same geometry as 224
NO_AUG_MOS = MOSViews(size=64, single_augment=(NO_AUGMENT,) * 2, multi_augment=(NO_AUGMENT,) * 2)


def pixels(t: torch.Tensor) -> torch.Tensor:
    """Normalized ``[..., 3, H, W]`` -> 0..255 floats."""
    return (t * STD + MEAN) * 255


def check_image(t: torch.Tensor, shape) -> None:
    assert t.dtype == torch.float32 and tuple(t.shape) == tuple(shape)
    low, high = LOW.expand_as(t[..., :1, :1]), HIGH.expand_as(t[..., :1, :1])
    assert (t >= low - 1e-4).all() and (t <= high + 1e-4).all()


def collect(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if n is not None and i + 1 == n:
            break
    return out


def source_image(loader, row) -> np.ndarray:
    img = Image.open(io.BytesIO(loader.index.read_jpeg(row).tobytes()))
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


# -------------------------------------------------------------------------- the three sets


def test_mos_batch():
    b = 4
    with ViewLoader(photo_shards(), SMALL_MOS, batch_size=b, seed=0) as loader:
        assert len(loader) == 12 // b
        for batch in collect(loader):
            for k in ("single1", "single2", "multi1", "multi2"):
                check_image(batch[k], (b, 3, 64, 64))
            assert batch["index"].dtype == torch.int64 and batch["index"].unique().numel() == b
            for v in (1, 2):
                layout, members = batch[f"layout{v}"], batch[f"members{v}"]
                assert members.dtype == torch.int64 and members.shape == (b, layout.num_crops)
                cell = torch.tensor(layout.cell_of_crop)
                assert torch.equal(members, (torch.arange(b)[:, None] + cell) % b)  # eq. 5


def test_stitched_images_contain_their_members():
    """Every sample is a distinct flat grey: each object crop of a stitched image must show
    the grey of the sample that ``members`` names, over many batches (layouts)."""
    shards = constant_shards()
    grey = grey_of_row(shards)
    b, layouts_seen = 4, set()
    with ViewLoader(shards, NO_AUG_MOS, batch_size=b, seed=3) as loader:
        for _ in range(6):
            for batch in loader:
                rows = batch["index"]
                for v in (1, 2):
                    assert torch.allclose(
                        pixels(batch[f"single{v}"]).mean((1, 2, 3)),
                        torch.tensor(grey[rows]).float(),
                        atol=2,
                    )
                    layout = batch[f"layout{v}"]
                    layouts_seen.add((layout.grid, layout.scales))
                    img = pixels(batch[f"multi{v}"])
                    for k, (x0, y0, x1, y1) in enumerate(layout.crop_boxes):
                        cell = img[:, :, y0:y1, x0:x1]
                        want = torch.tensor(grey[rows[batch[f"members{v}"][:, k]]]).float()
                        assert (cell - want[:, None, None, None]).abs().max() <= 3
    assert len(layouts_seen) >= 4  # several grids and scales were exercised
    assert set(GREYS) == set(grey.tolist())


def test_univip_batch_and_instance_crops():
    b, k = 3, 4
    views = UniVIPViews(size=64, instance_size=32)
    with ViewLoader(photo_shards(), views, batch_size=b, seed=1) as loader:
        for batch in collect(loader):
            check_image(batch["scene1"], (b, 3, 64, 64))
            check_image(batch["scene2"], (b, 3, 64, 64))
            check_image(batch["instances"], (b, k, 3, 32, 32))
            scenes, inst = batch["scene_boxes"], batch["instance_boxes"]
            assert scenes.dtype == inst.dtype == torch.int64 and inst.shape == (b, k, 4)
            for i, row in enumerate(batch["index"].tolist()):
                w, h = int(loader.index.width[row]), int(loader.index.height[row])
                s = scenes[i]
                assert (s[:, :2] >= 0).all() and (s[:, 2] <= w).all() and (s[:, 3] <= h).all()
                ov = torch.cat([s[:, :2].max(0).values, s[:, 2:].min(0).values])
                assert (ov[:2] < ov[2:]).all()
                assert (inst[i, :, :2] >= ov[:2]).all() and (inst[i, :, 2:] <= ov[2:]).all()
                # proposals that fit the overlap come first, in rank order (Algorithm 1)
                props = loader.index.read_boxes(row)
                fit = [
                    p
                    for p in props.tolist()
                    if p[0] >= ov[0] and p[1] >= ov[1] and p[2] <= ov[2] and p[3] <= ov[3]
                ]
                assert inst[i, : min(k, len(fit))].tolist() == fit[:k]


def test_univip_without_fitting_proposals_fills_the_overlap():
    """Flat images have one proposal (the whole image) that no overlap contains: all K
    instances are random fill-up boxes inside the overlap."""
    views = UniVIPViews(size=32, instance_size=16, k=4)
    with ViewLoader(constant_shards(), views, batch_size=3, seed=2) as loader:
        assert all(len(loader.index.read_boxes(r)) <= 1 for r in range(len(loader.index)))
        for _ in range(3):
            for batch in loader:
                s, inst = batch["scene_boxes"], batch["instance_boxes"]
                ov0, ov1 = s[:, :, :2].max(1).values, s[:, :, 2:].min(1).values  # [B, 2]
                assert (ov0 < ov1).all()
                assert (inst[..., :2] >= ov0[:, None]).all() and (
                    inst[..., 2:] <= ov1[:, None]
                ).all()
                assert (inst[..., 2:] > inst[..., :2]).all()
                check_image(batch["instances"], (3, 4, 3, 16, 16))


def test_crops_are_cut_from_the_original_image_and_flipped():
    """Without photometric augmentation an instance crop equals the resized box of the
    decoded image; with flip probability 1 the same draw comes out mirrored."""
    plain = UniVIPViews(
        size=64, instance_size=32, scene_augment=(NO_AUGMENT,) * 2, instance_augment=NO_AUGMENT
    )
    flipped = UniVIPViews(
        size=64,
        instance_size=32,
        scene_augment=(Augment(flip=1, jitter=0, grayscale=0),) * 2,
        instance_augment=Augment(flip=1, jitter=0, grayscale=0),
    )
    with (
        ViewLoader(photo_shards(), plain, batch_size=4, seed=7) as a,
        ViewLoader(photo_shards(), flipped, batch_size=4, seed=7) as f,
    ):
        batch, mirror = next(iter(a)), next(iter(f))
        assert torch.equal(batch["instance_boxes"], mirror["instance_boxes"])
        assert not batch["flips"].any() and mirror["flips"].all()
        assert torch.allclose(batch["instances"], mirror["instances"].flip(-1), atol=1e-5)
        assert torch.allclose(batch["scene1"], mirror["scene1"].flip(-1), atol=1e-5)
        for i, row in enumerate(batch["index"].tolist()):
            src = source_image(a, row)
            for j, (x0, y0, x1, y1) in enumerate(batch["instance_boxes"][i].tolist()):
                ref = Image.fromarray(src[y0:y1, x0:x1]).resize((32, 32), Image.BILINEAR)
                got = pixels(batch["instances"][i, j]).permute(1, 2, 0).numpy()
                assert np.abs(got - np.asarray(ref, np.float32)).mean() < 6


def test_multicrop_batch():
    views = MultiCropViews(global_size=48, local_size=24, num_global=3, num_local=2)
    with ViewLoader(photo_shards(), views, batch_size=4, seed=2) as loader:
        for batch in collect(loader):
            crops = batch["crops"]
            assert len(crops) == 5
            for c in crops[:3]:
                check_image(c, (4, 3, 48, 48))
            for c in crops[3:]:
                check_image(c, (4, 3, 24, 24))
            boxes = batch["boxes"]
            assert boxes.shape == (4, 5, 4) and boxes.dtype == torch.int64
            w = torch.tensor(loader.index.width)[batch["index"]]
            assert (boxes[..., 2] <= w[:, None]).all() and (boxes[..., :2] >= 0).all()


# --------------------------------------------------------------- epochs, ranks, resume


def test_epochs_remainder_and_position():
    views = DecodeCropViews(size=32)
    with ViewLoader(photo_shards(), views, batch_size=5, seed=4) as loader:  # 12 = 2 * 5 + 2
        plan = EpochPlan(12, 5, 1, 4)
        assert len(loader) == 2 and loader.state_dict() == {"epoch": 0, "batch": 0}
        for epoch in range(3):
            loader.set_epoch(epoch)
            rows = [b["index"].tolist() for b in loader]
            assert len(rows) == 2 and loader.state_dict() == {"epoch": epoch + 1, "batch": 0}
            assert sum(rows, []) == plan.order(epoch)[:10].tolist()
        assert collect(loader, 1)[0]["index"].tolist()[:2] == plan.order(3)[:2].tolist()
        assert loader.state_dict() == {"epoch": 3, "batch": 1}
        loader.set_epoch(3)  # the current epoch: position kept
        assert loader.state_dict() == {"epoch": 3, "batch": 1}
        assert len(collect(loader)) == 1  # the rest of epoch 3
        loader.set_epoch(7)
        assert loader.state_dict() == {"epoch": 7, "batch": 0}
        loader.load_state_dict({"epoch": 2, "batch": 2})  # the end of an epoch = next start
        assert loader.state_dict() == {"epoch": 3, "batch": 0}
        with pytest.raises(ValueError, match="invalid loader state"):
            loader.load_state_dict({"epoch": 0, "batch": 3})


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(world):
    b = 2
    loaders = [
        ViewLoader(
            photo_shards(), DecodeCropViews(size=16), batch_size=b, rank=r, world_size=world, seed=9
        )
        for r in range(world)
    ]
    try:
        assert len({len(x) for x in loaders}) == 1
        plan = EpochPlan(12, b, world, 9)
        for epoch in range(2):
            per_rank = [sum((x["index"].tolist() for x in ld), []) for ld in loaders]
            flat = sum(per_rank, [])
            assert len(flat) == len(set(flat)) == len(loaders[0]) * b * world
            assert set(flat) == set(plan.order(epoch)[: plan.batches * b * world].tolist())
    finally:
        for ld in loaders:
            ld.close()


def test_deterministic_and_exact_resume():
    views = MOSViews(size=32)
    with ViewLoader(photo_shards(), views, batch_size=4, seed=11) as a:
        ref = collect(a) + collect(a)  # epochs 0 and 1
    with ViewLoader(photo_shards(), views, batch_size=4, seed=11) as b:
        again = collect(b) + collect(b)
    with ViewLoader(photo_shards(), views, batch_size=4, seed=11) as c:
        c.load_state_dict({"epoch": 0, "batch": 2})
        resumed = collect(c) + collect(c)
    with ViewLoader(photo_shards(), views, batch_size=4, seed=12) as d:
        other = collect(d)
    assert len(ref) == 6 and len(resumed) == 4

    def same(x, y):
        return all(
            torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x
        )

    assert all(same(x, y) for x, y in zip(ref, again))
    assert all(same(x, y) for x, y in zip(ref[2:], resumed))
    assert not same(ref[0], other[0])


def test_worker_processes_give_the_same_batches_and_stop_on_close():
    views = UniVIPViews(size=32, instance_size=16)
    with ViewLoader(photo_shards(), views, batch_size=3, seed=5, workers=0) as a:
        ref = collect(a) + collect(a)  # two epochs
    before = set(multiprocessing.active_children())
    loader = ViewLoader(photo_shards(), views, batch_size=3, seed=5, workers=2)
    got = collect(loader) + collect(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    assert not set(multiprocessing.active_children()) - before
    assert len(got) == len(ref) == 8
    for x, y in zip(ref, got):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))


def _rss_mb() -> float:
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_no_host_memory_growth_across_epochs():
    """Batches are fresh tensors that die with their last reference; the pipeline is reused
    from epoch to epoch: after warm-up the process does not grow with the epochs."""
    with ViewLoader(photo_shards(), MOSViews(size=32), batch_size=4, seed=0) as loader:
        pipe = None
        for epoch in range(40):
            for _ in loader:
                pass
            if epoch == 0:
                pipe = loader._pipe
            if epoch == 10:
                warm = _rss_mb()
        assert loader._pipe is pipe  # built once
        assert _rss_mb() - warm < 25


def test_invalid_arguments():
    with pytest.raises(ValueError, match="do not fill one global batch"):
        ViewLoader(photo_shards(), SMALL_MOS, batch_size=7, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ViewLoader(photo_shards(), SMALL_MOS, batch_size=2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="view set"):
        ViewLoader(photo_shards(), "mos", batch_size=2)
    with pytest.raises(ValueError, match="device"):
        ViewLoader(photo_shards(), SMALL_MOS, batch_size=2, device="mps")
    with pytest.raises(FileNotFoundError):
        ViewLoader(photo_shards() / "missing", SMALL_MOS, batch_size=2)


@pytest.mark.gpu
def test_gpu_memory_is_released_across_epochs():
    with ViewLoader(photo_shards(), MOSViews(), batch_size=4, seed=0, device="cuda") as loader:
        for _ in range(2):
            for _ in loader:
                pass
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for _ in range(5):
            for _ in loader:
                pass
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= base


@pytest.mark.gpu
@pytest.mark.parametrize(
    "views", [MOSViews(), UniVIPViews(), MultiCropViews()], ids=["mos", "univip", "multicrop"]
)
def test_gpu_views_match_cpu_views(views):
    """The same plans on the GPU (mixed decoder, GPU operators): same shapes and indices,
    pixels within decoder/resampling differences."""
    with (
        ViewLoader(photo_shards(), views, batch_size=4, seed=0, device="cuda") as g,
        ViewLoader(photo_shards(), views, batch_size=4, seed=0, device="cpu") as c,
    ):
        for bg, bc in zip(g, c):
            for key, value in bc.items():
                if isinstance(value, torch.Tensor):
                    other = bg[key]
                    assert other.device.type == "cuda" and other.shape == value.shape
                    if value.is_floating_point():
                        assert (other.cpu() - value).abs().mean() < 0.1
                    else:
                        assert torch.equal(other.cpu(), value)
