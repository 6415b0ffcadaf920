"""Object-level evaluation (``train.eval.objects``, ``pipeline.eval_objects``, ``ssl-cli eval
objects``): RoIAlign on ViT patch grids and ResNet C5, average precision against hand cases and
scikit-learn, the ground truth of a real ``shards build --annotations``, and the command end to
end on scenes of solid-colour objects composed here (a known answer: raw pixels separate them
perfectly, a random-init ViT well above chance)."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from cli.eval_cmds import eval_group
from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.eval_objects import NoGroundTruthError, ObjectLoader, read_ground_truth
from shards.build import build_shards
from shards.location import locate
from shards.process import BuildParams
from shards.proposals import SearchParams
from tests.conftest import photo
from tests.test_eval_cli import tiny_run
from tests.test_eval_loader import unlabelled_shards
from tests.test_pipeline_shards import _tmpdir
from tests.test_train_loop import tiny
from train.eval.objects import (
    PIXEL_SIZE,
    average_precision,
    crop_boxes,
    evaluate_objects,
    feature_map,
    mean_average_precision,
    pixel_features,
    random_backbone,
    roi_features,
    train_multilabel_probe,
    vit_token_grid,
)
from train.eval.probes import LinearProbeConfig
from train.resolve import resolve_config

warnings.filterwarnings("ignore", message=".*external source.*not used.*")

# COCO-style category ids, not contiguous (class index = position in sorted id order)
COLOURS = {
    3: ("red", (220, 30, 30)),
    7: ("green", (30, 190, 40)),
    11: ("blue", (30, 60, 220)),
    20: ("yellow", (235, 220, 40)),
}
FAST_PROBE = LinearProbeConfig(epochs=30)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and on a loaded 2-core machine the
    probes' many small steps with two spinning threads take 20-40x longer (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- scenes


def compose_scenes(root: Path, n: int, seed: int, wide: int = 0, **extra) -> Path:
    """``n`` scenes on crops of real photographs, 1-3 solid-colour rectangles (14-28 px) each,
    no overlap; ``wide`` of them 80 x 64 (the rest 64 x 64). Writes ``root/images/*.jpg`` and
    ``root/instances.json`` (COCO: tight float boxes). ``extra``: ``crowd`` (a crowd box on
    the first image), ``unlisted`` (an image without an entry), ``categories`` (replaces the
    list), ``no_objects`` (images listed, no annotation but crowd ones)."""
    rng = np.random.default_rng(seed)
    backgrounds = [photo(name, (160, 160)) for name in ("astronaut", "coffee", "chelsea")]
    (root / "images").mkdir(parents=True)
    ids = sorted(COLOURS)
    images, anns = [], []

    def annotate(image_id, box, cid, crowd=0):
        x0, y0, x1, y1 = box
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "category_id": int(cid),
                "iscrowd": crowd,
            }
        )

    for i in range(n):
        width, height = (80 if i < wide else 64), 64
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        y, x = rng.integers(0, 160 - 80, 2)
        img = bg[y : y + height, x : x + width].copy()
        placed = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(14, 29, 2))
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if any(
                not (box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1])
                for b in placed
            ):
                continue
            cid = ids[int(rng.integers(len(ids)))]
            img[y0 : y0 + h, x0 : x0 + w] = COLOURS[cid][1]
            placed.append(box)
            if not extra.get("no_objects"):
                annotate(100 + i, box, cid)
        if extra.get("no_objects") or (extra.get("crowd") and i == 0):
            annotate(100 + i, (0, 0, 30, 30), ids[0], crowd=1)
        name = f"scene{i:03d}.jpg"
        Image.fromarray(img).save(root / "images" / name, quality=92)
        images.append({"id": 100 + i, "file_name": name, "width": width, "height": height})
    if extra.get("unlisted"):
        Image.fromarray(backgrounds[0][:64, :64]).save(root / "images" / "unlisted.jpg")
    categories = extra.get("categories") or [{"id": c, "name": COLOURS[c][0]} for c in ids]
    doc = {"images": images, "annotations": anns, "categories": categories}
    (root / "instances.json").write_text(json.dumps(doc))
    return root


def build(root: Path) -> Path:
    out = root / "shards"
    build_shards(
        str(root / "images"),
        out,
        BuildParams(search=SearchParams(max_side=64), shard_size=16),
        layout="folder",
        workers=1,
        progress=False,
        log=lambda s: None,
        annotations=root / "instances.json",
    )
    return out


@functools.cache
def composed_shards() -> Path:
    """24 composed scenes (4 of them 80 x 64), a crowd box, an image the JSON does not list;
    built once per session."""
    root = compose_scenes(
        _tmpdir("ssl-objects-composed-"), 24, 0, wide=4, crowd=True, unlisted=True
    )
    return build(root)


def composed_doc() -> dict:
    return json.loads((composed_shards().parent / "instances.json").read_text())


@functools.cache
def generated_shards(split: str) -> Path:
    """Scenes of ``ssl-cli data scenes`` (:func:`shards.scenes.make_scenes`) from a folder of
    solid-colour class images, 64 px, 1-3 objects, none hidden (so a box holds its object's
    colour only): 24 train, 16 test; built with their annotations, once per session."""
    from shards.scenes import SceneParams, make_scenes

    base = _tmpdir("ssl-objects-generated-")
    for part in ("train", "test"):
        for _, (name, rgb) in COLOURS.items():
            (base / "src" / part / name).mkdir(parents=True)
            for i in range(2):
                image = np.full((64, 64, 3), rgb, np.uint8)
                Image.fromarray(image).save(base / "src" / part / name / f"{name}{i}.png")
    params = SceneParams(size=(64, 64), objects=(1, 3), object_size=(0.25, 0.45), min_visible=1.0)
    out = {}
    for part, count in (("train", 24), ("test", 16)):
        make_scenes(str(base / "src"), base / part, "folder", part, count, seed=0, params=params)
        out[part] = build(base / part)
    return out[split]


def invoke(*args):
    return CliRunner().invoke(eval_group, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------- RoIAlign


def test_roi_over_a_constant_region_returns_the_constant():
    # image 64 px, an 8 x 8 map: stride 8; cells rows 2..5, cols 1..4 of image 1 hold v
    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 8, 8)
    v = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0])
    fmap[1, :, 2:6, 1:5] = v[:, None, None]
    # a box half a cell inside the region on every side samples only its cells
    box = torch.tensor([[1.5 * 8, 2.5 * 8, 4.5 * 8, 5.5 * 8]])
    out = roi_features(fmap, box, torch.tensor([1]), image_size=64)
    torch.testing.assert_close(out, v[None], atol=1e-5, rtol=0)
    # the same box on image 0, or the region's exact edges (which blend in the neighbours), not
    other = roi_features(fmap, box, torch.tensor([0]), image_size=64)
    edges = roi_features(fmap, torch.tensor([[8.0, 16.0, 40.0, 48.0]]), torch.tensor([1]), 64)
    assert not torch.allclose(other, v[None], atol=1e-2)
    assert not torch.allclose(edges, v[None], atol=1e-2)


def test_roi_on_resnet_c5_reads_its_cells_and_the_whole_box_is_the_pooled_feature():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, pooled = feature_map(backbone, x)
        reference = backbone(x)
    assert fmap.shape == (2, 512, 2, 2)  # C5: stride 32
    torch.testing.assert_close(pooled, reference)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [48.0, 0.0, 64.0, 16.0], [0.0, 0.0, 64.0, 64.0]])
    owner = torch.tensor([0, 1, 1])
    out = roi_features(fmap, boxes, owner, image_size=64)
    torch.testing.assert_close(out[0], fmap[0, :, 0, 0])  # top-left cell
    torch.testing.assert_close(out[1], fmap[1, :, 0, 1])  # top-right cell (row 0, column 1)
    torch.testing.assert_close(out[2], pooled[1], atol=1e-5, rtol=1e-5)  # = global average


def test_vit_patch_tokens_land_on_their_grid_cell():
    # 32 px, patch 8: a 4 x 4 grid; a class token and 2 register tokens before the patches
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1, reg_tokens=2
    ).eval()
    assert vit.num_prefix_tokens == 3
    with torch.no_grad():
        vit.pos_embed.zero_()
    vit.blocks, vit.norm = nn.Sequential(), nn.Identity()  # tokens = patch projection + bias
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8:16, 24:32] = 1.0  # the patch of row 1, column 3
    with torch.no_grad():
        fmap, pooled = feature_map(vit, x)
        reference = vit(x)
    assert fmap.shape == (1, 192, 4, 4)
    bias = vit.patch_embed.proj.bias
    lit = [(r, c) for r in range(4) for c in range(4) if not torch.allclose(fmap[0, :, r, c], bias)]
    assert lit == [(1, 3)]
    torch.testing.assert_close(pooled, reference)
    # the same on tokens written by hand: token P + r*gw + c -> cell (r, c), prefix dropped
    tokens = torch.arange(2 + 6, dtype=torch.float32).reshape(1, 8, 1)  # 2 prefix, 2 x 3 grid
    grid = vit_token_grid(tokens, 2, (2, 3))
    assert grid[0, 0].tolist() == [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
    with pytest.raises(ValueError, match="prefix tokens"):
        vit_token_grid(tokens, 1, (2, 3))


def test_pixel_features_of_a_solid_box_are_its_colour():
    images = torch.zeros(1, 3, 32, 32)
    images[0, :, 4:20, 10:26] = torch.tensor([0.3, -1.0, 2.0])[:, None, None]
    crops, whole = pixel_features(
        images, torch.tensor([[10.0, 4.0, 26.0, 20.0]]), torch.tensor([0])
    )
    assert crops.shape == (1, 3 * PIXEL_SIZE**2) and whole.shape == (1, 3 * PIXEL_SIZE**2)
    expected = torch.tensor([0.3, -1.0, 2.0]).repeat_interleave(PIXEL_SIZE**2)
    torch.testing.assert_close(crops[0], expected)


def test_crop_of_a_solid_box_is_its_colour_at_the_crop_size():
    images = torch.zeros(2, 3, 32, 32)
    images[1, :, 4:20, 10:26] = torch.tensor([0.3, -1.0, 2.0])[:, None, None]
    box = torch.tensor([[10.0, 4.0, 26.0, 20.0]])
    crops = crop_boxes(images, box, torch.tensor([1]), 8)  # 2 x 2 pixel centres per output
    colour = torch.tensor([0.3, -1.0, 2.0])[:, None, None]
    assert crops.shape == (1, 3, 8, 8)
    torch.testing.assert_close(crops[0], colour.expand(3, 8, 8))
    # another size: bilinear samples, exact inside, blending the outside only at the edge
    crops = crop_boxes(images, box, torch.tensor([1]), 12)
    torch.testing.assert_close(crops[0, :, 1:-1, 1:-1], colour.expand(3, 10, 10))


def test_crop_features_embed_each_box_alone():
    """``box_features="crop"``: an object's feature does not see the rest of the image (the
    same object on two backgrounds gets the same feature), unlike RoIAlign on a CNN's C5."""
    cfg = resolve_config(tiny("univip", "unused"))
    kwargs = dict(size=32, probe=FAST_PROBE, batch_size=16, num_threads=1, references=False)
    backbone = random_backbone(cfg.model, seed=1)
    train, test = generated_shards("train"), generated_shards("test")
    crop = evaluate_objects(backbone, cfg, train, test, box_features="crop", crop_size=16, **kwargs)
    assert crop["box_features"] == "crop" and crop["crop_size"] == 16
    assert crop["rows"]["backbone"]["object_knn_top1"] >= 90.0  # solid colours, alone
    with pytest.raises(ValueError, match="unknown box features"):
        evaluate_objects(backbone, cfg, train, test, box_features="mask", **kwargs)


# ---------------------------------------------------------------------------------- metrics


def test_average_precision_hand_cases():
    # positives at ranks 1, 3, 6 of 6: (1/1 + 2/3 + 3/6) / 3 = 13/18
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0, 0, 1])) == pytest.approx(13 / 18)
    assert average_precision(scores, torch.tensor([0, 0, 0, 0, 0, 1])) == pytest.approx(1 / 6)
    # a tie is one threshold: 0.7 holds a positive and a negative, whichever comes first
    # P/R at 0.9: 1, 1/3; at 0.7: 2/3, 2/3; at 0.3: 3/4, 1 -> (1 + 2/3 + 3/4) / 3 = 29/36
    tied = torch.tensor([0.9, 0.7, 0.7, 0.3])
    assert average_precision(tied, torch.tensor([1, 1, 0, 1])) == pytest.approx(29 / 36)
    assert average_precision(tied, torch.tensor([1, 0, 1, 1])) == pytest.approx(29 / 36)
    with pytest.raises(ValueError, match="positive"):
        average_precision(scores, torch.zeros(6))


def test_average_precision_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        targets = rng.integers(0, 2, n)
        targets[0] = 1
        scores = np.round(rng.normal(size=n), 1)  # many ties
        ours = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
        assert ours == pytest.approx(metrics.average_precision_score(targets, scores))


def test_mean_average_precision_over_the_classes_present():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.6, 0.3, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0]])  # class 2 absent
    mean, per_class = mean_average_precision(scores, targets)
    # class 0: its positive ranks first (AP 1); class 1: its positive ranks 2nd of 3 (AP 1/2)
    assert per_class == pytest.approx({0: 100.0, 1: 50.0})
    assert mean == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no class"):
        mean_average_precision(scores, torch.zeros(3, 3))


def test_multilabel_probe_learns_separable_labels():
    rng = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 4, generator=rng) < 0.4).float()
    features = torch.cat([targets * 2 - 1, torch.randn(200, 6, generator=rng)], 1)
    features += 0.3 * torch.randn(features.shape, generator=rng)
    state = torch.random.get_rng_state()
    probe = train_multilabel_probe(features[:150], targets[:150], FAST_PROBE)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator untouched
    with torch.no_grad():
        mean, _ = mean_average_precision(probe(features[150:]), targets[150:])
    assert mean > 99.0


def test_random_init_reference_is_the_same_every_time():
    cfg = resolve_config(tiny("mos", "unused"))
    state = torch.random.get_rng_state()
    a, b = random_backbone(cfg.model), random_backbone(cfg.model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not any(m.training for m in a.modules())


# ----------------------------------------------------------------------- shards with truth


def test_ground_truth_of_a_location_is_the_folders():
    folder = composed_shards()
    a, b = read_ground_truth(folder), read_ground_truth(locate(folder))
    assert a.categories == b.categories and np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.classes, b.classes)


def test_ground_truth_of_a_build():
    gt = read_ground_truth(composed_shards())
    doc = composed_doc()
    assert [c for c, _ in gt.categories] == [3, 7, 11, 20]
    assert gt.num_images == 24 and gt.num_unannotated == 1  # unlisted.jpg: no entry
    assert gt.num_crowd == 1  # left out of the objects
    listed = [a for a in doc["annotations"] if not a["iscrowd"]]
    assert gt.num_objects == len(listed)
    # objects in row order; classes are positions of the ids in sorted order
    by_image = {}
    for a in listed:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(
            ([x, y, x + w, y + h], sorted(COLOURS).index(a["category_id"]))
        )
    import pyarrow.parquet as pq

    ids = pq.read_table(composed_shards() / "proposals.parquet").column("image_id")
    got = {}
    for i, row in enumerate(gt.rows):
        lo, hi = gt.offsets[i], gt.offsets[i + 1]
        got[ids[int(row)].as_py()] = sorted(
            zip(gt.boxes[lo:hi].tolist(), gt.classes[lo:hi].tolist())
        )
    assert got == {img["id"]: sorted(by_image.get(img["id"], [])) for img in doc["images"]}
    targets = gt.image_targets()
    assert targets.shape == (24, 4) and targets.sum() == len(
        {(a["image_id"], a["category_id"]) for a in listed}
    )


def test_loader_boxes_sit_on_the_objects_of_the_resized_image():
    """Every object's raw pixels, read through its scaled box from the resized whole image
    (80 x 64 images squeezed to 32 x 32 as well), are its solid colour."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None]
    std = torch.tensor(IMAGENET_STD)[:, None]
    colours = torch.tensor([COLOURS[c][1] for c in sorted(COLOURS)], dtype=torch.float32) / 255
    with ObjectLoader(composed_shards(), size=32, batch_size=10, num_threads=1) as loader:
        seen = 0
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 32, 32)
            boxes = batch["boxes"]
            assert boxes.min() >= 0 and boxes.max() <= 32
            # shrink each box by one pixel of the input: JPEG and resampling blur the edges
            inner = boxes + torch.tensor([1.0, 1.0, -1.0, -1.0])
            crops, _ = pixel_features(batch["image"], inner, batch["owner"])
            rgb = crops.reshape(-1, 3, PIXEL_SIZE**2) * std + mean  # back to [0, 1]
            expected = colours[batch["classes"]][:, :, None]
            assert (rgb - expected).abs().median() < 0.05
            seen += len(boxes)
    assert seen == loader.ground_truth.num_objects


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_eval_objects_end_to_end_known_answer(tmp_path):
    """data scenes -> shards build --annotations -> eval objects on a MOS ViT-T checkpoint
    (both branches): raw pixels separate the solid colours perfectly, a random-init ViT well
    above chance (25%)."""
    out = tmp_path / "objects.json"
    result = invoke(
        "objects",
        tiny_run(),
        "--train",
        generated_shards("train"),
        "--val",
        generated_shards("test"),
        "--branch",
        "both",
        "--device",
        "cpu",
        "--num-threads",
        1,
        "--batch-size",
        8,
        "--epochs",
        FAST_PROBE.epochs,
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert list(rows) == ["online", "target", "random_init", "raw_pixels"]
    assert rows["raw_pixels"]["object_knn_top1"] == 100.0
    assert rows["raw_pixels"]["object_linear_top1"] == 100.0
    assert rows["random_init"]["object_knn_top1"] > 60.0
    assert rows["random_init"]["object_linear_top1"] > 60.0
    assert rows["target"]["feature_dim"] == 192
    assert rows["raw_pixels"]["feature_dim"] == 3 * PIXEL_SIZE**2
    test = json.loads((generated_shards("test").parent / "instances.json").read_text())
    assert report["n_val_objects"] == len(test["annotations"]) and report["n_val_images"] == 16
    assert report["categories"] == test["categories"]
    assert report["size"] == 32 and report["branch"] == "both"
    assert report["step"] == 3 and report["eval"] == "objects"
    for row in rows.values():
        assert 0.0 <= row["image_map"] <= 100.0
        assert set(row["image_ap"]) <= {"red", "green", "blue", "yellow"}
    lines = result.stdout.splitlines()
    assert "object kNN" in lines[1] and "image mAP" in lines[1]
    assert [line.split()[0] for line in lines[2:6]] == ["online", "target", "random", "raw"]
    assert lines[5].split()[2:4] == ["100.00%", "100.00%"]
    assert lines[-1] == f"wrote {out}"


def test_evaluate_objects_in_memory_is_reproducible():
    """The function bench quality calls: one backbone in memory, no references, the same
    numbers twice, the caller's random state left alone."""
    cfg = resolve_config(tiny("mos", "unused"))
    kwargs = dict(size=32, probe=FAST_PROBE, batch_size=16, num_threads=1, references=False)
    backbone = random_backbone(cfg.model, seed=1)
    train, test = generated_shards("train"), generated_shards("test")
    state = torch.random.get_rng_state()
    a = evaluate_objects(backbone, cfg, train, test, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator untouched
    b = evaluate_objects(backbone, cfg, train, test, **kwargs)
    assert list(a["rows"]) == ["backbone"]
    for key in ("object_knn_top1", "object_linear_top1", "image_map"):
        assert a["rows"]["backbone"][key] == b["rows"]["backbone"][key]
    test = json.loads((generated_shards("test").parent / "instances.json").read_text())
    assert a["categories"] == test["categories"]  # the generator's: ids 1..4, sorted by name


# ---------------------------------------------------------------------------------- errors


def test_shards_without_ground_truth_are_refused_naming_the_folder():
    with pytest.raises(NoGroundTruthError, match="--annotations"):
        read_ground_truth(unlabelled_shards())
    result = invoke(
        "objects",
        tiny_run(),
        "--train",
        composed_shards(),
        "--val",
        unlabelled_shards(),
        "--device",
        "cpu",
    )
    assert result.exit_code == 1
    assert f"{unlabelled_shards()}: no ground truth" in result.output
    assert "shards build SRC OUT --annotations instances.json" in result.output


def test_other_categories_and_no_objects_are_refused(tmp_path):
    cfg = resolve_config(tiny("mos", "unused"))
    backbone = random_backbone(cfg.model)
    other = [{"id": c, "name": COLOURS[c][0]} for c in sorted(COLOURS)] + [
        {"id": 99, "name": "purple"}
    ]
    renamed = build(compose_scenes(tmp_path / "other", 3, 2, categories=other))
    with pytest.raises(ValueError, match="different annotation categories.*purple"):
        evaluate_objects(backbone, cfg, composed_shards(), renamed, references=False)
    empty = build(compose_scenes(tmp_path / "empty", 3, 3, no_objects=True))
    with pytest.raises(
        ValueError,
        match=r"empty/shards: no objects to evaluate \(3 annotated "
        r"images, 3 crowd boxes left out",
    ):
        evaluate_objects(backbone, cfg, composed_shards(), empty, references=False)


def test_command_help_and_usage():
    result = invoke("objects", "--help")
    assert result.exit_code == 0
    assert "ssl-cli eval objects runs/" in result.output and "--annotations" in result.output
    assert invoke("objects", tiny_run(), "--train", composed_shards()).exit_code == 2
