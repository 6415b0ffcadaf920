"""``ssl-cli data scenes``: exact ground truth, determinism, split separation, OUT ownership.

Every source is written here in ``tmp_path``: IDX files, class folders of solid-colour objects,
a CIFAR-10 python batch set, a folder with one black background photograph."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main as cli
from shards.scenes import SceneError, SceneParams, make_scenes, rle_decode, rle_encode

# Solid colours far apart in RGB, so every decoded JPEG pixel is told apart by its nearest colour.
COLOURS = {
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "green": (0, 255, 0),
    "magenta": (255, 0, 255),
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
}
BLACK = (0, 0, 0)
TIGHT = ["--backgrounds", "BG", "--bg-jitter", "0", "--plain-share", "0", "--gradient-share", "0"]


def _idx(array: np.ndarray) -> bytes:
    """uint8 ``array`` in the IDX format: magic 0x0000 0x08 ndim, big-endian dims, data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def _write_idx(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """An IDX set of 3 classes: train items are bright (250) squares, test items dim (100)
    discs, on black, 20x20."""
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:20, :20]
    square = ((yy >= 3) & (yy < 17) & (xx >= 4) & (xx < 16)).astype(np.uint8) * 250
    disc = (((yy - 9.5) ** 2 + (xx - 9.5) ** 2) < 64).astype(np.uint8) * 100
    for split, n, item in (("train", n_train, square), ("t10k", n_test, disc)):
        (root / f"{split}-images-idx3-ubyte").write_bytes(_idx(np.stack([item] * n)))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 3))
    return root


def _write_colours(root: Path, classes=COLOURS, disc: str | None = "cyan") -> Path:
    """``root/{train,test}/<colour>/item.png``: one opaque solid rectangle per class (sizes
    differ); ``disc``'s class is a disc with transparent corners (RGBA)."""
    for split in ("train", "test"):
        for n, (name, rgb) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            w, h = 12 + 3 * n, 20 - 2 * n
            if name == disc:
                yy, xx = np.mgrid[:16, :16]
                alpha = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 56).astype(np.uint8) * 255
                arr = np.dstack([np.full((16, 16, 3), rgb, np.uint8), alpha])
            else:
                arr = np.full((h, w, 3), rgb, np.uint8)
            Image.fromarray(arr).save(folder / "item.png")
    return root


def _black_backgrounds(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((80, 120, 3), np.uint8)).save(root / "black.png")
    return root


def _run(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, ["data", "scenes", *args])
    assert result.exit_code == expect, result.output
    return result


def _coco(out: Path) -> dict:
    return json.loads((out / "instances.json").read_text())


def _by_image(doc: dict) -> dict[int, list[dict]]:
    anns: dict[int, list[dict]] = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        anns[a["image_id"]].append(a)
    return anns


def _nearest(rgb: np.ndarray, palette: dict[str, tuple]) -> np.ndarray:
    """[H, W] index into ``palette`` of each pixel's nearest colour."""
    colours = np.array(list(palette.values()), dtype=np.int32)  # [C, 3]
    dist = ((rgb[:, :, None, :].astype(np.int32) - colours) ** 2).sum(-1)  # [H, W, C]
    return dist.argmin(-1)


@pytest.fixture
def colour_scenes(tmp_path):
    """Solid-colour objects on black, written with the tightest JPEG, and the decoded pixels."""
    src = _write_colours(tmp_path / "colours")
    bg = _black_backgrounds(tmp_path / "bg")
    out = tmp_path / "out"
    args = [a if a != "BG" else str(bg) for a in TIGHT]
    _run(str(src), str(out), "--layout", "folder", "--count", "30", "--size", "64:80",
         "--quality", "100", "--seed", "3", *args)  # fmt: skip
    return out, _coco(out)


def test_boxes_are_the_tight_boxes_of_each_objects_visible_pixels(colour_scenes):
    out, doc = colour_scenes
    names = [c["name"] for c in doc["categories"]]
    assert names == sorted(COLOURS)
    palette = {"background": BLACK, **{n: COLOURS[n] for n in names}}
    anns = _by_image(doc)
    occluded = 0
    for im in doc["images"]:
        rgb = np.asarray(Image.open(out / "images" / im["file_name"]).convert("RGB"))
        assert rgb.shape == (im["height"], im["width"], 3)
        nearest = _nearest(rgb, palette)
        assert 2 <= len(anns[im["id"]]) <= 4
        for a in anns[im["id"]]:
            pixels = nearest == a["category_id"]  # palette index 0 is the background
            ys, xs = np.nonzero(pixels)
            x0, y0 = xs.min(), ys.min()
            assert a["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0], (im, a)
            assert a["area"] == pixels.sum()
            assert np.array_equal(rle_decode(a["segmentation"]), pixels)
            occluded += a["visible"] < 1
    assert occluded > 0  # some boxes were cut by a later object, and still tight


def test_an_alpha_channel_is_the_objects_mask(colour_scenes):
    out, doc = colour_scenes
    cyan = next(c["id"] for c in doc["categories"] if c["name"] == "cyan")
    discs = [a for a in doc["annotations"] if a["category_id"] == cyan and a["visible"] == 1]
    assert discs
    for a in discs:  # a whole disc fills about pi/4 of its box, a rectangle all of it
        assert 0.6 < a["area"] / (a["bbox"][2] * a["bbox"][3]) < 0.9


def test_every_object_keeps_the_visible_share_asked(tmp_path):
    rects = {k: v for k, v in COLOURS.items() if k != "cyan"}
    src = _write_colours(tmp_path / "rects", rects, disc=None)
    bg = _black_backgrounds(tmp_path / "bg")
    args = [a if a != "BG" else str(bg) for a in TIGHT]
    crowded = [
        "--objects",
        "4:4",
        "--object-size",
        "0.45:0.6",
        "--max-iou",
        "1",
        "--quality",
        "100",
    ]
    shares = {}
    for limit in ("0.8", "0.2"):
        out = tmp_path / f"out{limit}"
        _run(str(src), str(out), "--layout", "folder", "--count", "25", "--size", "64",
             "--min-visible", limit, *crowded, *args)  # fmt: skip
        doc = _coco(out)
        palette = {"background": BLACK, **{c["name"]: rects[c["name"]] for c in doc["categories"]}}
        seen = []
        for im in doc["images"]:
            rgb = np.asarray(Image.open(out / "images" / im["file_name"]).convert("RGB"))
            nearest = _nearest(rgb, palette)
            for a in _by_image(doc)[im["id"]]:
                _, _, w, h = a["amodal_bbox"]  # opaque rectangles: the pasted area is w * h
                seen.append((nearest == a["category_id"]).sum() / (w * h))
        shares[limit] = np.array(seen)
    assert shares["0.8"].min() >= 0.8
    assert shares["0.8"].min() < 0.95  # objects did overlap
    assert shares["0.2"].min() < 0.8  # the limit, not chance, kept them visible


def test_the_same_command_gives_the_same_bytes(tmp_path):
    src = _write_idx(tmp_path / "idx")
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ("7", "7", "8")):
        _run(str(src), str(out), "--layout", "idx", "--count", "12", "--size", "48:64",
             "--seed", seed)  # fmt: skip
    files = [{p.relative_to(o): p.read_bytes() for p in o.rglob("*") if p.is_file()} for o in outs]
    assert len(files[0]) == 12 + 3  # images, instances.json, params.json, .lock
    assert files[0] == files[1]
    assert files[0][Path("images/train_000000.jpg")] != files[2][Path("images/train_000000.jpg")]
    kinds = {a["source_key"] for a in _coco(outs[0])["annotations"]}
    assert len(kinds) > 10  # many items drawn, not one repeated


def test_train_scenes_use_train_items_and_test_scenes_test_items(tmp_path):
    src = _write_idx(tmp_path / "idx", n_train=40, n_test=20)
    bg = _black_backgrounds(tmp_path / "bg")
    args = [a if a != "BG" else str(bg) for a in TIGHT]
    for split in ("train", "test"):
        out = tmp_path / split
        _run(str(src), str(out), "--layout", "idx", "--split", split, "--count", "15",
             "--size", "64", "--tint", "none", "--quality", "100", *args)  # fmt: skip
        doc = _coco(out)
        assert {im["file_name"][: len(split)] for im in doc["images"]} == {split}
        for a in doc["annotations"]:
            assert a["source_key"] == f"{split}_{a['source_index']:06d}"
            assert a["source_index"] < (40 if split == "train" else 20)
            assert a["category_id"] - 1 == a["source_index"] % 3  # the item's own label
        values = np.concatenate(
            [np.asarray(Image.open(p).convert("L")).ravel() for p in (out / "images").iterdir()]
        )
        # train items are squares of 250, test items discs of 100 (edges blend with the black)
        if split == "test":
            assert 90 <= values.max() < 150  # no train square in any test scene
        else:
            assert np.bincount(values[values > 50]).argmax() >= 240


def test_a_folder_without_split_folders_is_split_by_item(tmp_path):
    root = tmp_path / "flat"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(20):
            Image.fromarray(np.full((10, 8, 3), 40 * c + k, np.uint8)).save(
                root / f"class{c}" / f"{k:02d}.png"
            )
    keys = {}
    for split in ("train", "test"):
        out = tmp_path / split
        _run(str(root), str(out), "--layout", "folder", "--split", split, "--count", "40",
             "--size", "48", "--plain-share", "1", "--gradient-share", "0")  # fmt: skip
        doc = _coco(out)
        keys[split] = {a["source_key"] for a in doc["annotations"]}
        assert doc["info"]["source"]["split_rule"].startswith("key checksum")
    assert keys["train"] and keys["test"]
    assert not keys["train"] & keys["test"]
    assert len(keys["test"]) < len(keys["train"])


def test_plain_colour_fixes_the_background_and_keeps_the_scenes(tmp_path):
    src = _write_idx(tmp_path / "idx")
    plain = ["--layout", "idx", "--count", "6", "--size", "48", "--seed", "3", "--plain-share", "1",
             "--gradient-share", "0", "--tint", "none"]  # fmt: skip
    _run(str(src), str(tmp_path / "random"), *plain)
    _run(str(src), str(tmp_path / "black"), *plain, "--plain-colour", "0,0,0")
    random_doc, black_doc = _coco(tmp_path / "random"), _coco(tmp_path / "black")
    assert black_doc["info"]["parameters"]["plain_colour"] == [0, 0, 0]
    # the colour is drawn either way, so every box and class is the random-colour run's
    boxes = [
        [(a["bbox"], a["category_id"]) for a in d["annotations"]] for d in (random_doc, black_doc)
    ]
    assert boxes[0] == boxes[1]
    for image in black_doc["images"]:
        pixels = np.asarray(Image.open(tmp_path / "black" / "images" / image["file_name"]))
        outside = np.ones(pixels.shape[:2], bool)
        for a in black_doc["annotations"]:
            if a["image_id"] == image["id"]:
                x, y, w, h = (int(round(v)) for v in a["bbox"])
                outside[max(0, y - 2) : y + h + 2, max(0, x - 2) : x + w + 2] = False
        assert (
            outside.any() and pixels[outside].max() <= 24 and pixels[outside].mean() < 1
        )  # JPEG noise


def test_cifar_items_are_whole_rectangles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"c{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (root / name).write_bytes(pickle.dumps(batch))
    out = tmp_path / "out"
    _run(str(root), str(out), "--layout", "cifar", "--split", "test", "--count", "5",
         "--size", "64", "--objects", "2:2", "--plain-share", "1", "--gradient-share", "0")  # fmt: skip
    doc = _coco(out)
    assert [c["name"] for c in doc["categories"]] == [n.decode() for n in names]
    for a in doc["annotations"]:
        assert a["source_key"].startswith("cifar10_test_")
        assert a["category_id"] == a["source_index"] + 2  # labels 1, 2, 3, 4 -> ids from 1
        if a["visible"] == 1:  # an unhidden CIFAR object is its whole square
            assert a["area"] == a["bbox"][2] * a["bbox"][3] and a["bbox"][2] == a["bbox"][3]


def test_instances_json_is_coco_detection(tmp_path):
    src = _write_idx(tmp_path / "idx")
    out = tmp_path / "out"
    _run(str(src), str(out), "--layout", "idx", "--count", "8", "--size", "64:96", "--seed", "1",
         "--plain-share", "0.5", "--gradient-share", "0.5")  # fmt: skip
    doc = _coco(out)
    assert set(doc) == {"info", "images", "annotations", "categories"}
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert [im["id"] for im in doc["images"]] == list(range(1, 9))
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    for im in doc["images"]:
        assert set(im) == {"id", "file_name", "width", "height"}
        with Image.open(out / "images" / im["file_name"]) as img:
            assert img.format == "JPEG" and img.size == (im["width"], im["height"])
        assert 64 <= im["width"] <= 96 and im["width"] == im["height"]
    sizes = {im["id"]: im["width"] for im in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) and v == int(v) for v in a["bbox"])
        assert w > 0 and h > 0 and x + w <= sizes[a["image_id"]] and y + h <= sizes[a["image_id"]]
        assert isinstance(a["area"], float) and 0 < a["area"] <= w * h
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3)
        assert a["segmentation"]["size"] == [sizes[a["image_id"]]] * 2
        assert sum(a["segmentation"]["counts"]) == sizes[a["image_id"]] ** 2
    info = doc["info"]
    assert info["seed"] == 1 and info["split"] == "train" and info["count"] == 8
    assert info["source"]["layout"] == "idx" and info["source"]["items"] == 40
    assert info["parameters"]["objects"] == [2, 4] and info["parameters"]["size"] == [64, 96]
    assert info == json.loads((out / "params.json").read_text())


def test_rle_is_cocos_column_major_run_lengths():
    mask = np.array([[0, 1, 1], [1, 1, 0]], dtype=bool)
    # column-major: (0, 1), (1, 1), (1, 0) -> 0 1 1 1 1 0: one 0, four 1s, one 0
    assert rle_encode(mask) == {"size": [2, 3], "counts": [1, 4, 1]}
    assert rle_encode(~mask) == {"size": [2, 3], "counts": [0, 1, 4, 1]}
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)


def test_out_is_refused_unless_made_by_the_same_command(tmp_path):
    src = _write_idx(tmp_path / "idx")
    out = tmp_path / "out"
    base = [str(src), str(out), "--layout", "idx", "--count", "6", "--size", "48"]
    _run(*base)
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    coco = (out / "instances.json").read_bytes()

    assert "nothing to do" in _run(*base).output
    result = _run(*base, "--seed", "5", "--objects", "1:3", expect=1)
    assert "seed: 0 then, 5 now" in result.output and "parameters.objects" in result.output

    # a killed run: an image missing, one cut short, no instances.json -> finished, same bytes
    (out / "images" / "train_000002.jpg").unlink()
    (out / "images" / "train_000004.jpg").write_bytes(before["train_000004.jpg"][:100])
    (out / "images" / ".train_000001.jpg.tmp-4194305-1").write_bytes(b"partial")  # dead pid
    (out / "instances.json").unlink()
    assert "2 written now" in _run(*base).output
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    assert (out / "instances.json").read_bytes() == coco

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = _run(str(src), str(foreign), "--layout", "idx", "--count", "2", expect=1)
    assert "not empty (notes.txt)" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objects", "4:2"], "MIN is above MAX"),
        (["--objects", "two"], "is not MIN:MAX"),
        (["--object-size", "0:0.5"], "--object-size"),
        (["--min-visible", "0"], "--min-visible"),
        (["--plain-share", "0.7", "--gradient-share", "0.5"], "together at most 1"),
        (["--plain-colour", "0,0"], "is not R,G,B"),
        (["--plain-colour", "0,0,256"], "is not R,G,B"),
        (["--layout", "coco"], "'coco' is not one of"),
    ],
)
def test_wrong_options_are_usage_errors(tmp_path, args, message):
    src = _write_idx(tmp_path / "idx")
    opts = ["--layout", "idx", "--count", "2", *args]
    result = _run(str(src), str(tmp_path / "out"), *opts, expect=2)
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_missing_or_unreadable_sources_are_clear_errors(tmp_path):
    out = tmp_path / "out"
    result = _run(str(tmp_path / "nowhere"), str(out), "--layout", "idx", "--count", "2", expect=1)
    assert "nowhere" in result.output and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"), str(out), "--layout", "idx", "--count", "2", expect=1)
    assert "no IDX train images" in result.output
    src = _write_idx(tmp_path / "idx")
    (src / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    result = _run(str(src), str(out), "--layout", "idx", "--count", "2", expect=1)
    assert "train-images-idx3-ubyte" in result.output
    result = _run(str(src), str(out), "--layout", "idx", "--split", "test", "--count", "2",
                  "--backgrounds", str(tmp_path / "nophotos"), expect=1)  # fmt: skip
    assert "--backgrounds" in result.output and "nophotos" in result.output
    assert not out.exists()


def test_a_scene_that_cannot_be_placed_is_an_error(tmp_path):
    src = _write_idx(tmp_path / "idx")
    params = SceneParams(objects=(5, 5), object_size=(0.9, 1.0), min_visible=0.9, scene_tries=3)
    with pytest.raises(SceneError, match="scene 0: no placement of 5 objects"):
        make_scenes(str(src), tmp_path / "out", "idx", "train", 2, params=params)
    assert not (tmp_path / "out" / "instances.json").exists()
