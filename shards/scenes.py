"""Multi-object scenes with ground truth: objects of a labelled source pasted on backgrounds.

``make_scenes(src, out, ...)`` composes ``count`` square scenes. Each holds several objects of a
labelled source (the IDX family, CIFAR, or a folder of class sub-folders), each pasted through its
own mask onto a background, and the result is a COCO detection file with tight boxes::

    OUT/images/{split}_{i:06d}.jpg
    OUT/instances.json      COCO: images, annotations (bbox, area, category_id, iscrowd,
                            segmentation as uncompressed RLE), categories, info (every parameter)
    OUT/params.json         the same info block, written first: what a rerun is checked against

Ground truth is exact by construction. A pixel belongs to the last object pasted over it; an
object's annotation describes its **visible** pixels after every later object was pasted, the way
COCO's boxes enclose the visible segmentation: ``bbox`` is their bounding box (integer ``x, y, w,
h`` in COCO's float form), ``area`` their count, ``segmentation`` their run-length encoding.
``amodal_bbox`` (the whole pasted object), ``visible`` (its visible share), ``source_index`` and
``source_key`` (which item of the source it is) are our additions; COCO tools ignore them.

Masks: IDX items are grey on black, so the mask is ``pixel > threshold``, cleaned a little (a
lone pixel is dropped, a one-pixel hole filled); folder images with an alpha channel use it
(``alpha >= 128``); otherwise (CIFAR, opaque images) the whole rectangle is the object. Objects
are pasted hard through the binary mask, so the annotation is exactly the pixels that were
pasted (JPEG compression then blurs edges by a pixel, as in any photograph).

Backgrounds (why so varied: when every scene's background is a crop of a few photographs,
telling the backgrounds apart can be all a self-supervised method needs to learn, and nothing
pushes it to learn the objects): square crops of a random photograph at a random scale, a random flip or
quarter turn, a colour jitter, and a share of plain and two-colour gradient backgrounds.

Determinism: scene ``i`` depends only on (seed, split, i), the parameters and the inputs
(``numpy.random.SeedSequence([seed, split, i])``), so the same command gives the same bytes (with
the same numpy and Pillow), and an interrupted run finishes by rewriting only the missing or
damaged images. Train scenes draw only train items, test scenes only test items.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes, stale_temporaries
from .images import ImageParams, RejectedImage, _to_rgb
from .proposals import box_iou
from .sources import (
    SAMPLE_SOURCE,
    SourceError,
    SourceItem,
    cifar_batches,
    idx_batches,
    open_source,
    printable,
    sample_files,
)
from .writer import sha256_file

__all__ = [
    "GENERATOR",
    "LAYOUTS",
    "SceneError",
    "SceneParams",
    "make_scenes",
    "rle_decode",
    "rle_encode",
]

GENERATOR = "ssl-cli data scenes"
GENERATOR_VERSION = 1  # raise when the same parameters would give other pixels or annotations
LAYOUTS = ("idx", "cifar", "folder")
SPLITS = ("train", "test")
TINTS = ("random", "class", "none")
# Folder sources without train/ and test/ sub-folders: one item in TEST_SHARE_DENOMINATOR (by a
# checksum of its key, so independent of the listing) is a test item. Our choice: 20%, between
# CIFAR's 1/6 and a common 1/4 hold-out.
TEST_SHARE_DENOMINATOR = 5
# Colour jitter of photograph backgrounds at --bg-jitter 1: BYOL's magnitudes (Grill et al. 2020,
# appendix B: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 of a turn).
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601, as YIQ's Y
_YIQ = np.array([_LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_IMAGE_NAME = re.compile(r"^(train|test)_\d{6}\.jpg$")
_PHOTO_CACHE = 256  # decoded background photographs kept in memory


class SceneError(ValueError):
    """The scenes cannot be made as asked (bad parameters, a foreign OUT, unplaceable objects)."""


@dataclass(frozen=True)
class SceneParams:
    """How each scene is drawn; every field is a ``ssl-cli data scenes`` option."""

    size: tuple[int, int] = (96, 96)  # scene side in px, drawn per scene (--size)
    objects: tuple[int, int] = (2, 4)  # objects per scene (--objects)
    object_size: tuple[float, float] = (0.25, 0.5)  # longer side / scene side (--object-size)
    min_visible: float = 0.6  # share of each object's pixels left visible (--min-visible)
    max_iou: float = 0.5  # IoU of any two visible boxes at most this (--max-iou)
    tint: str = "random"  # grey items: random colour, a colour per class, or none (--tint)
    threshold: int = 8  # IDX mask: pixel > threshold (--threshold)
    bg_scale: tuple[float, float] = (0.1, 1.0)  # crop side / photo's shorter side (--bg-scale)
    bg_flip: bool = True  # random flips and quarter turns of the crop (--bg-flip)
    bg_jitter: float = 1.0  # colour jitter strength, 1 = JITTER (--bg-jitter)
    plain_share: float = 0.1  # scenes on one plain colour (--plain-share)
    plain_colour: tuple[int, int, int] | None = None  # that colour, None: random (--plain-colour)
    gradient_share: float = 0.1  # scenes on a two-colour linear gradient (--gradient-share)
    quality: int = 90  # JPEG quality, 4:4:4 chroma (--quality)
    segmentation: bool = True  # write COCO uncompressed RLE (--segmentation)
    place_tries: int = 50  # positions tried per object before the scene is redrawn
    scene_tries: int = 200  # draws per scene before it is an error

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise SceneError(what)

        lo, hi = self.size
        check(16 <= lo <= hi <= 4096, f"--size {lo}:{hi}: need 16 <= MIN <= MAX <= 4096")
        lo, hi = self.objects
        check(1 <= lo <= hi <= 100, f"--objects {lo}:{hi}: need 1 <= MIN <= MAX <= 100")
        lo, hi = self.object_size
        check(0 < lo <= hi <= 1, f"--object-size {lo}:{hi}: need 0 < MIN <= MAX <= 1 (of the side)")
        check(
            round(lo * self.size[0]) >= 2,
            f"--object-size {lo} of a {self.size[0]}-px scene is under 2 px",
        )
        check(0 < self.min_visible <= 1, f"--min-visible {self.min_visible}: need 0 < V <= 1")
        check(0 < self.max_iou <= 1, f"--max-iou {self.max_iou}: need 0 < IOU <= 1")
        check(self.tint in TINTS, f"--tint {self.tint!r}: choose one of {', '.join(TINTS)}")
        check(0 <= self.threshold <= 254, f"--threshold {self.threshold}: need 0..254")
        lo, hi = self.bg_scale
        check(0 < lo <= hi <= 1, f"--bg-scale {lo}:{hi}: need 0 < MIN <= MAX <= 1")
        check(0 <= self.bg_jitter <= 2.5, f"--bg-jitter {self.bg_jitter}: need 0..2.5")
        if self.plain_colour is not None:
            check(
                len(self.plain_colour) == 3 and all(0 <= c <= 255 for c in self.plain_colour),
                f"--plain-colour {self.plain_colour}: need three of 0..255 (R,G,B)",
            )
        shares = (self.plain_share, self.gradient_share)
        check(
            all(0 <= s <= 1 for s in shares) and sum(shares) <= 1,
            f"--plain-share {self.plain_share} + --gradient-share {self.gradient_share}: "
            "each in [0, 1], together at most 1",
        )
        check(1 <= self.quality <= 100, f"--quality {self.quality}: need 1..100")
        check(self.place_tries >= 1 and self.scene_tries >= 1, "tries must be >= 1")

    @property
    def photo_share(self) -> float:
        return 1.0 - self.plain_share - self.gradient_share


# ------------------------------------------------------------------------------------ objects


@dataclass(frozen=True)
class _Native:
    """One source item as found: pixels cropped to the mask's bounding box."""

    pixels: np.ndarray  # [h, w] uint8 grey or [h, w, 3] uint8 RGB
    mask: np.ndarray  # [h, w] bool, True on the object
    label: int
    key: str


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop mask pixels with no 4-neighbour in the mask; fill holes of one pixel. [h, w] bool."""
    p = np.pad(mask, 1)
    n4 = (
        p[:-2, 1:-1].astype(np.uint8) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    )  # [h, w] neighbours in the mask
    return (mask & (n4 > 0)) | (~mask & (n4 == 4))


def _crop_to_mask(pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return pixels[ys, xs], mask[ys, xs]


class _ArrayPool:
    """IDX and CIFAR items straight from their arrays (no JPEG round trip)."""

    def __init__(self, root: Path, layout: str, split: str, threshold: int):
        reader = idx_batches if layout == "idx" else cifar_batches
        name, self.classes, batches = reader(root, split)
        self.grey = layout == "idx"
        self.threshold = threshold
        self.images = np.concatenate([b.images for b in batches]) if batches else None
        labels = [lab for b in batches for lab in b.labels]
        origin = [(b.path, i) for b in batches for i in range(len(b.images))]
        bad = [
            f"{printable(str(p))}[{i}] ({lab!r})"
            for (p, i), lab in zip(origin, labels)
            if isinstance(lab, bool)
            or not isinstance(lab, (int, np.integer))
            or not 0 <= lab < len(self.classes)
        ]
        if bad:
            raise SourceError(
                f"{len(bad)} item(s) with a label outside the {len(self.classes)} classes: "
                f"{', '.join(bad[:5])}"
            )
        self.labels = [int(lab) for lab in labels]
        prefix = re.sub(r"[^A-Za-z0-9_-]+", "_", name.strip("-_. ")).strip("_")
        self.key_prefix = f"{prefix}_{split}" if prefix else split
        self.count = len(labels)
        self.skipped = 0
        h = hashlib.sha256()
        for b in batches:
            h.update(f"{printable(str(b.path))}\n{b.stamp}\n".encode())
        self.fingerprint = h.hexdigest()

    def native(self, i: int) -> _Native | None:
        img = self.images[i]
        if self.grey:
            mask = _clean(img > self.threshold)
        else:
            mask = np.ones(img.shape[:2], dtype=bool)
        cropped = _crop_to_mask(img, mask)
        if cropped is None:
            return None
        return _Native(*cropped, label=self.labels[i], key=f"{self.key_prefix}_{i:06d}")


def _read(item: SourceItem) -> bytes:
    try:
        return item.read(max_bytes=ImageParams().max_file_bytes)
    except (RejectedImage, OSError) as e:
        raise SourceError(f"{item.source}: cannot read: {e}") from None


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"{what}: cannot decode the image: {e}") from None


def _class_folders(root: Path) -> list[str]:
    """Class names as ``open_source(..., "imagenet")`` lists them: visible sub-folders."""
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
    )


class _FolderPool:
    """Images in class sub-folders (labels = sorted folder names, ImageNet's convention).

    ``SRC/train`` and ``SRC/test`` (or ``SRC/val``) hold the splits when present, their classes
    united by name; otherwise SRC's own class folders are split by a checksum of each item's key
    (one in :data:`TEST_SHARE_DENOMINATOR` to test)."""

    def __init__(self, root: Path, split: str):
        folders = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if "test" not in folders and (root / "val").is_dir():
            folders["test"] = root / "val"
        if folders:
            if split not in folders:
                raise SourceError(
                    f"{root}: has {', '.join(sorted(p.name for p in folders.values()))}/ but no "
                    f"{split}/ folder of class sub-folders"
                )
            self.split_rule = f"the {folders[split].name}/ folder"
            self.classes = sorted({c for f in folders.values() for c in _class_folders(f)})
            source = open_source(str(folders[split]), layout="imagenet")
            items = source.items
        else:
            self.split_rule = f"key checksum, 1 in {TEST_SHARE_DENOMINATOR} to test"
            source = open_source(str(root), layout="imagenet")
            self.classes = list(source.classes or [])
            test = split == "test"
            items = [
                it
                for it in source.items
                if (zlib.crc32(it.key.encode()) % TEST_SHARE_DENOMINATOR == 0) == test
            ]
        index = {c: n for n, c in enumerate(self.classes)}
        self.items = [it for it in items if it.reject is None]
        self.skipped = len(items) - len(self.items)
        self.labels = [index[source.classes[it.label]] for it in self.items]
        if not self.items:
            raise SourceError(f"{root}: no usable {split} images in class sub-folders")
        self.count = len(self.items)
        h = hashlib.sha256()
        for it in self.items:
            h.update(source.entry_line(it).encode("utf-8", "backslashreplace"))
        self.fingerprint = h.hexdigest()
        self.grey = False

    def native(self, i: int) -> _Native | None:
        it = self.items[i]
        img = _decode(_read(it), it.source)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = np.asarray(img.convert("RGBA"))
            pixels, mask = rgba[:, :, :3], rgba[:, :, 3] >= 128
        elif img.mode in ("L", "1", "F") or img.mode.startswith("I"):
            pixels = np.asarray(_to_rgb(img, (0, 0, 0)))[:, :, 0]  # grey: tinted like IDX
            mask = np.ones(pixels.shape, dtype=bool)
        else:
            pixels = np.asarray(_to_rgb(img, (0, 0, 0)))
            mask = np.ones(pixels.shape[:2], dtype=bool)
        cropped = _crop_to_mask(pixels, mask)
        if cropped is None:
            raise SourceError(f"{it.source}: no opaque pixel (alpha >= 128) to paste")
        return _Native(*cropped, label=self.labels[i], key=it.key)


def _open_pool(src: str, layout: str, split: str, params: SceneParams) -> _ArrayPool | _FolderPool:
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(src)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise SourceError(f"source {src!r} {what}")
    if layout == "folder":
        pool = _FolderPool(root, split)
    else:
        pool = _ArrayPool(root, layout, split, params.threshold)
    if pool.count == 0:
        raise SourceError(f"{src}: the {split} split holds no items")
    return pool


def _hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (each in [0, 1]) as RGB in [0, 1], [3]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _colour(label: int, n_classes: int, mode: str, rng) -> np.ndarray | None:
    """What a grey item is multiplied by: RGB [3] in [0, 1], or None for ``--tint none``."""
    if mode == "none":
        return None
    if mode == "class":  # evenly spaced hues, fixed per class: colour tells the class
        return _hsv_colour(label / max(n_classes, 1), 0.75, 1.0)
    return _hsv_colour(rng.random(), rng.random(), 1.0)  # any hue: colour tells nothing


@dataclass
class _Object:
    """An object ready to paste: pixels [h, w, 3] uint8 and mask [h, w] bool."""

    rgb: np.ndarray
    mask: np.ndarray
    label: int
    index: int  # the item's index in its split
    key: str
    full: int  # mask pixels


def _coloured(native: _Native, index: int, pool, params: SceneParams, rng) -> _Object:
    """The item at its own size, grey items tinted (``--tint``)."""
    pixels = native.pixels
    if pixels.ndim == 2:
        colour = _colour(native.label, len(pool.classes), params.tint, rng)
        if colour is None:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        else:
            pixels = np.rint(pixels[:, :, None] * colour).astype(np.uint8)
    return _Object(pixels, native.mask, native.label, index, native.key, int(native.mask.sum()))


def _resized(obj: _Object, longer: int) -> _Object:
    """``obj`` scaled so that its longer side is ``longer`` px (bilinear; the mask is resized
    as grey and cut at one half)."""
    h, w = obj.mask.shape
    scale = longer / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))  # PIL's (w, h)
    rgb = np.asarray(Image.fromarray(obj.rgb).resize(size, Image.BILINEAR))
    mask_img = Image.fromarray(obj.mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)
    mask = np.asarray(mask_img) >= 128
    return dataclasses.replace(obj, rgb=rgb, mask=mask, full=int(mask.sum()))


# -------------------------------------------------------------------------------- backgrounds


class _Backgrounds:
    """The photographs backgrounds are cut from: ``@sample`` (every photograph that ships with
    scikit-image and scikit-learn) or the images of a folder."""

    def __init__(self, spec: str):
        self.spec = spec
        self._cache: dict[int, Image.Image] = {}
        if spec == SAMPLE_SOURCE:
            files = sample_files()
            self.paths = [str(p) for _, p in files]
            h = hashlib.sha256()
            for _, p in files:
                h.update(f"{p.name}\n{sha256_file(p)}\n".encode())
            self.fingerprint = h.hexdigest()
            self.items = None
        else:
            root = Path(spec)
            if not root.is_dir():
                what = "does not exist" if not root.exists() else "is not a folder"
                raise SourceError(f"--backgrounds {spec!r} {what}")
            source = open_source(spec, layout="folder")
            self.items = [it for it in source.items if it.reject is None]
            if not self.items:
                raise SourceError(f"--backgrounds {spec}: no readable images in it")
            self.paths = [it.source for it in self.items]
            self.fingerprint = hashlib.sha256(
                "".join(source.entry_line(it) for it in self.items).encode(
                    "utf-8", "backslashreplace"
                )
            ).hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def photo(self, k: int) -> Image.Image:
        img = self._cache.get(k)
        if img is None:
            if self.items is None:
                data = Path(self.paths[k]).read_bytes()
            else:
                data = _read(self.items[k])
            img = _to_rgb(_decode(data, self.paths[k]), ImageParams().alpha_background)
            if len(self._cache) >= _PHOTO_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = img
        return img


def _colour_matrix(rng, strength: float, mean_luma: float) -> tuple[np.ndarray, np.ndarray]:
    """``x -> M @ x + b`` on RGB in [0, 1]: brightness, contrast (about the mean luma),
    saturation (about each pixel's luma), hue (a rotation of YIQ's chroma plane), in that order
    as one linear map; the caller clips once at the end."""
    j = {k: v * strength for k, v in JITTER.items()}
    b = rng.uniform(1 - j["brightness"], 1 + j["brightness"])
    c = rng.uniform(max(0.0, 1 - j["contrast"]), 1 + j["contrast"])
    s = rng.uniform(max(0.0, 1 - j["saturation"]), 1 + j["saturation"])
    angle = 2 * math.pi * rng.uniform(-j["hue"], j["hue"])
    eye = np.eye(3)
    luma_rows = np.tile(_LUMA, (3, 1))
    rot = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    hue = np.linalg.inv(_YIQ) @ rot @ _YIQ
    sat = s * eye + (1 - s) * luma_rows
    m = hue @ sat @ (c * b * eye)
    offset = hue @ sat @ np.full(3, (1 - c) * b * mean_luma)
    return m, offset


def _background(rng, side: int, photos: _Backgrounds | None, params: SceneParams):
    """One background, [side, side, 3] uint8, and its kind (photo, plain, gradient)."""
    u = rng.random()
    if u < params.plain_share:
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)  # drawn either way: same scenes
        if params.plain_colour is not None:
            colour = np.asarray(params.plain_colour, dtype=np.uint8)
        return np.broadcast_to(colour, (side, side, 3)).copy(), "plain"
    if u < params.plain_share + params.gradient_share or photos is None:
        c0, c1 = rng.uniform(0, 255, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        coords = np.arange(side, dtype=np.float64)
        t = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)  # [side, side]
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        img = c0 + t[:, :, None] * (c1 - c0)
        return np.rint(img).astype(np.uint8), "gradient"
    photo = photos.photo(int(rng.integers(len(photos))))
    w, h = photo.size
    lo, hi = params.bg_scale
    crop = max(1, int(round(min(w, h) * math.exp(rng.uniform(math.log(lo), math.log(hi))))))
    x0, y0 = int(rng.integers(w - crop + 1)), int(rng.integers(h - crop + 1))
    img = photo.resize((side, side), Image.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop))
    arr = np.asarray(img)
    if params.bg_flip:
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        arr = np.rot90(arr, turns)
        if flip:
            arr = arr[:, ::-1]
    if params.bg_jitter > 0:
        x = arr.astype(np.float64) / 255.0
        m, offset = _colour_matrix(rng, params.bg_jitter, float((x @ _LUMA).mean()))
        x = x @ m.T + offset
        arr = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.array(arr), "photo"  # a writable copy: objects are pasted into it


# ---------------------------------------------------------------------------------- placement


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a non-empty [H, W] bool mask: x0, y0, x1, y1 (exclusive)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _place(objects: list[_Object], side: int, params: SceneParams, rng):
    """Positions for ``objects`` in paste order, or None when one finds no place.

    Returns (owner [side, side] int16: index of the object on top, -1 for background; the
    (x, y) of each object). An object is placed wholly inside the scene; a position is kept when
    every object pasted so far keeps ``min_visible`` of its pixels and no two visible boxes
    overlap by more than ``max_iou``."""
    owner = np.full((side, side), -1, dtype=np.int16)
    visible: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    where: list[tuple[int, int]] = []
    for k, obj in enumerate(objects):
        h, w = obj.mask.shape
        if h > side or w > side:
            return None
        for _ in range(params.place_tries):
            x, y = int(rng.integers(side - w + 1)), int(rng.integers(side - h + 1))
            region = owner[y : y + h, x : x + w]
            lost = np.bincount(region[obj.mask] + 1, minlength=k + 1)[1:]  # [k] pixels covered
            new_visible = [v - int(n) for v, n in zip(visible, lost)]
            if any(v < params.min_visible * o.full for v, o in zip(new_visible, objects)):
                continue
            trial = owner.copy()
            trial[y : y + h, x : x + w][obj.mask] = k
            new_boxes = [_bbox(trial == j) if lost[j] else boxes[j] for j in range(k)]
            new_boxes.append(_bbox(trial == k))
            if params.max_iou < 1:
                moved = [j for j in range(k) if lost[j]] + [k]  # boxes that are new or shrank
                iou = box_iou(np.array([new_boxes[j] for j in moved]), np.array(new_boxes))
                iou[np.arange(len(moved)), moved] = 0.0  # [moved, k + 1], not against itself
                if iou.max() > params.max_iou:
                    continue
            owner, visible, boxes = trial, [*new_visible, obj.full], new_boxes
            where.append((x, y))
            break
        else:
            return None
    return owner, where


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a [H, W] bool mask: column-major run lengths, starting with
    a run of zeros (``pycocotools.mask`` reads it with ``frPyObjects``)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major (Fortran) order
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = runs.tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """The [H, W] bool mask of an uncompressed COCO RLE (the inverse of :func:`rle_encode`)."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, not {h}x{w}")
    return flat.reshape(w, h).T


@dataclass
class _Scene:
    image: np.ndarray  # [side, side, 3] uint8
    annotations: list[dict]
    background: str


def _scene(seed: int, split: str, i: int, pool, photos, params: SceneParams) -> _Scene:
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), i]))
    side = int(rng.integers(params.size[0], params.size[1] + 1))
    image, kind = _background(rng, side, photos, params)
    for _ in range(params.scene_tries):
        n = int(rng.integers(params.objects[0], params.objects[1] + 1))
        picks = [int(p) for p in rng.choice(pool.count, size=min(n, pool.count), replace=False)]
        natives = [pool.native(p) for p in picks]
        if all(nat is not None for nat in natives):
            break  # else an item with an empty mask: draw the items again
    else:
        raise SceneError(f"scene {i}: {params.scene_tries} draws all held an item with no mask")
    coloured = [_coloured(nat, p, pool, params, rng) for nat, p in zip(natives, picks)]
    # A scene that cannot be placed is drawn again with the same items: new sizes, new places.
    # Redrawing the items instead would favour the classes that are easy to place.
    lo, hi = params.object_size
    for _ in range(params.scene_tries):
        objects = [_resized(c, max(2, int(round(rng.uniform(lo, hi) * side)))) for c in coloured]
        placed = None if any(o.full == 0 for o in objects) else _place(objects, side, params, rng)
        if placed is not None:
            break
    else:
        raise SceneError(
            f"scene {i}: no placement of {len(coloured)} objects of {lo}-{hi} of a {side}-px side "
            f"with --min-visible {params.min_visible} and --max-iou {params.max_iou} in "
            f"{params.scene_tries} draws; allow fewer or smaller objects or more overlap"
        )
    owner, where = placed
    annotations = []
    for k, (obj, (x, y)) in enumerate(zip(objects, where)):
        h, w = obj.mask.shape
        image[y : y + h, x : x + w][obj.mask] = obj.rgb[obj.mask]
        vis = owner == k
        x0, y0, x1, y1 = _bbox(vis)
        count = int(vis.sum())
        ann = {
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(count),
            "category_id": obj.label + 1,
            "iscrowd": 0,
            "amodal_bbox": [float(x), float(y), float(w), float(h)],
            "visible": round(count / obj.full, 4),
            "source_index": obj.index,
            "source_key": obj.key,
        }
        if params.segmentation:
            ann["segmentation"] = rle_encode(vis)
        annotations.append(ann)
    return _Scene(image, annotations, kind)


def _encode(image: np.ndarray, quality: int) -> bytes:
    """JPEG with 4:4:4 chroma: at these sizes 4:2:0's 2x2 colour blocks smear small objects'
    edges (our choice)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- OUT


def _normalised(obj) -> object:
    return json.loads(json.dumps(obj))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(absent)"), new.get(k, "(absent)")
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(_differences(a, b, f"{name}."))
        elif a != b:
            lines.append(f"{name}: {a!r} then, {b!r} now")
    return lines


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _check_out(out: Path, info: dict) -> None:
    """OUT is new, empty, or an earlier output of the same command; anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SceneError(f"OUT {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if not entries:
        return
    old = _read_json(out / "params.json")
    if old is None or old.get("generator") != GENERATOR:
        shown = ", ".join(printable(e) for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise SceneError(
            f"OUT {out} is not empty ({shown}) and holds no output of {GENERATOR}; "
            "choose a new or empty folder"
        )
    if old != info:
        raise SceneError(
            f"OUT {out} holds scenes made otherwise: {'; '.join(_differences(old, info))}. "
            "Run the same command to finish them, or choose a new folder"
        )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SceneError(f"{out} is being written by another {GENERATOR}") from None
        yield
    finally:
        os.close(fd)


def make_scenes(
    src: str,
    out: str | os.PathLike,
    layout: str,
    split: str,
    count: int,
    seed: int = 0,
    params: SceneParams = SceneParams(),
    backgrounds: str = SAMPLE_SOURCE,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Write ``count`` scenes of ``src``'s ``split`` to ``out`` (see the module docstring).

    Returns a summary: scenes, images written now, objects, classes, background kinds, seconds.
    Reruns of the same command finish what is missing (or do nothing); an OUT made otherwise
    is a :class:`SceneError` naming what differs."""
    if not 1 <= count <= 1_000_000:
        raise SceneError(f"--count {count}: need 1..1000000")
    if not 0 <= seed < 2**63:
        raise SceneError(f"--seed {seed}: need 0 <= SEED < 2**63")
    out = Path(out)
    start = time.monotonic()
    pool = _open_pool(src, layout, split, params)
    photos = _Backgrounds(backgrounds) if params.photo_share > 0 else None
    info = _scenes_info(src, layout, split, count, seed, params, backgrounds, pool, photos)
    _check_out(out, info)
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    with _locked(out):
        _check_out(out, info)  # as another run may have left it before the lock was free
        if not (out / "params.json").is_file():  # first: it makes OUT ours
            atomic_write_bytes(out / "params.json", _json_bytes(info))
        images_dir.mkdir(exist_ok=True)
        for p in stale_temporaries(images_dir, _IMAGE_NAME):  # what a killed run left
            p.unlink()
        names = [f"{split}_{i:06d}.jpg" for i in range(count)]
        done = _read_json(out / "instances.json")
        if done is not None and done.get("info") == info:
            if all((images_dir / n).is_file() for n in names):
                return {"scenes": count, "written": 0, "up_to_date": True}
        written, annotations, kinds = _write_scenes(
            out, names, info, seed, split, pool, photos, params, log, start
        )
    seconds = time.monotonic() - start
    used = sorted({a["category_id"] for a in annotations})
    return {
        "scenes": count,
        "written": written,
        "objects": len(annotations),
        "classes": len(used),
        "backgrounds": kinds,
        "seconds": round(seconds, 2),
        "up_to_date": False,
    }


def _scenes_info(
    src: str,
    layout: str,
    split: str,
    count: int,
    seed: int,
    params: SceneParams,
    backgrounds: str,
    pool: _ArrayPool | _FolderPool,
    photos: _Backgrounds | None,
) -> dict:
    """What makes these scenes (``params.json`` and ``instances.json``'s ``info``): generator,
    seed, split, count, the source and background pools with their fingerprints, parameters.
    A rerun continues only an OUT whose info is this one."""
    return _normalised(
        {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "description": f"{count} {split} scenes of {layout} objects pasted on backgrounds",
            "seed": seed,
            "split": split,
            "count": count,
            "source": {
                "path": printable(os.path.abspath(src)),
                "layout": layout,
                "items": pool.count,
                "skipped": pool.skipped,
                "split_rule": getattr(pool, "split_rule", f"the {split} files"),
                "fingerprint": pool.fingerprint,
            },
            "backgrounds": {
                "source": (
                    None
                    if photos is None
                    else backgrounds
                    if backgrounds == SAMPLE_SOURCE
                    else printable(os.path.abspath(backgrounds))
                ),
                "photos": len(photos) if photos is not None else 0,
                "fingerprint": photos.fingerprint if photos is not None else None,
            },
            "parameters": dataclasses.asdict(params),
        }
    )


def _write_scenes(
    out: Path,
    names: list[str],
    info: dict,
    seed: int,
    split: str,
    pool: _ArrayPool | _FolderPool,
    photos: _Backgrounds | None,
    params: SceneParams,
    log: Callable[[str], None],
    start: float,
) -> tuple[int, list[dict], dict[str, int]]:
    """Every scene drawn again (each from its own seed) and its image written unless it is
    there already, then ``instances.json`` last (after an ``os.sync`` when images were
    written: it is what says they are complete). Returns the images written now, the
    annotations and the count of each background kind."""
    images, annotations = [], []
    kinds: dict[str, int] = {}
    written = 0
    count = len(names)
    every = max(1, count // 10)
    for i, name in enumerate(names):
        scene = _scene(seed, split, i, pool, photos, params)
        kinds[scene.background] = kinds.get(scene.background, 0) + 1
        side = scene.image.shape[0]
        images.append({"id": i + 1, "file_name": name, "width": side, "height": side})
        for ann in scene.annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **ann})
        if _write_image(out / "images" / name, _encode(scene.image, params.quality)):
            written += 1
        if (i + 1) % every == 0 and count >= 100:
            log(f"scenes: {i + 1}/{count} ({time.monotonic() - start:.1f} s)")
    categories = [{"id": n + 1, "name": c} for n, c in enumerate(pool.classes)]
    doc = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    if written:
        os.sync()
    atomic_write_bytes(out / "instances.json", _json_bytes(doc))
    return written, annotations, kinds


def _write_image(path: Path, data: bytes) -> bool:
    """Write ``data`` unless ``path`` already holds it (a resumed run rewrites only missing or
    damaged images); True when written. Renamed into place, fsynced later in one ``os.sync``."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    atomic_write_bytes(path, data, fsync=False)
    return True


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
