"""Ground truth in COCO's detection format (``--annotations instances.json``), read and checked.

The file is parsed and checked whole before any image is processed, so a bad file stops the
build before it writes anything:

- ``images``: ``id`` (integer, unique), ``file_name`` (unique), ``width``/``height`` (positive
  integers);
- ``annotations``: ``id`` (unique), ``image_id``, ``bbox`` ``[x, y, w, h]`` in float pixels,
  ``category_id``, ``iscrowd`` (0/1, default 0), ``area`` (default ``w * h``);
- ``categories``: ``id`` (unique) and ``name``.

An annotation with a category id that ``categories`` does not list, a box of non-positive width
or height, or a box that leaves its image (as the JSON gives the image's size) by more than
:data:`OVERRUN_TOLERANCE` pixels is an error naming the annotation and image ids. COCO's own
float boxes can overrun the image by a fraction of a pixel; those are clipped (and counted).
An annotation whose ``image_id`` is not in ``images`` is an error too (the file contradicts
itself). An image of the JSON that is not in the source is counted and reported (``strict``:
an error).

Boxes are stored as int32 ``x1, y1, x2, y2`` with exclusive right/bottom edges, the frame of
``KEY.boxes``: ``x1 = floor(x)``, ``x2 = ceil(x + w)`` (and the same for y), so the stored box
covers every pixel the float box touches; then clipped to the image. A box under one pixel wide
still covers the pixel it lies on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "OVERRUN_TOLERANCE",
    "AnnotationError",
    "Annotations",
    "ImageTruth",
    "load_annotations",
]

# Pixels a COCO box may pass the image edge by before it is an error (COCO's float boxes overrun
# by rounding, e.g. x + w = 640.01 on a 640-px image); within it the box is clipped.
OVERRUN_TOLERANCE = 1.0
_SHOWN = 5  # ids listed in one error message


class AnnotationError(ValueError):
    """The annotation file cannot be used (malformed, contradicting itself or the source)."""


@dataclass(frozen=True)
class ImageTruth:
    """The ground truth of one image of the JSON, in stored form."""

    image_id: int
    file_name: str
    width: int  # as the JSON gives it: checked against the decoded image
    height: int
    boxes: np.ndarray  # [M, 4] int32 xyxy, exclusive right/bottom, clipped to width x height
    labels: np.ndarray  # [M] int32 category ids
    crowd: np.ndarray  # [M] bool, COCO's iscrowd
    areas: np.ndarray  # [M] float32, the annotation's ``area`` (segment area in COCO)

    def rows(self) -> np.ndarray:
        """``KEY.gt``: ``[M, 6]`` int32 ``x1, y1, x2, y2, category_id, iscrowd``."""
        return np.concatenate(
            [self.boxes, self.labels[:, None], self.crowd.astype(np.int32)[:, None]], axis=1
        ).astype(np.int32)


@dataclass
class Annotations:
    """A checked COCO detection file: images by ``file_name`` with their ground truth."""

    path: str
    sha256: str
    categories: list[dict]  # [{"id": int, "name": str}], sorted by id
    images: dict[str, ImageTruth]  # file_name -> truth
    clipped: int = 0
    # filled by match(): what of the JSON the source lacks
    unmatched_images: list[str] = field(default_factory=list)
    unmatched_annotations: int = 0

    def summary(self) -> dict:
        """What the manifest records of the file (before the build's own counts)."""
        return {
            "file": self.path,
            "sha256": self.sha256,
            "categories": self.categories,
            "json_images": len(self.images),
            "json_annotations": int(sum(len(t.labels) for t in self.images.values())),
            "clipped_boxes": self.clipped,
            "images_not_in_source": len(self.unmatched_images),
            "annotations_not_in_source": self.unmatched_annotations,
        }

    def match(self, items, root: str | None, strict: bool = False) -> list[ImageTruth | None]:
        """The truth of each source item (``None``: the image has no entry in the JSON).

        An item matches the entry whose ``file_name`` is its path relative to ``root`` (``/``
        separated); failing that, the entry whose ``file_name`` has the item's base name, when
        exactly one item has that base name (COCO's ``file_name`` is a bare name while users
        point SRC at a folder above ``train2017/``). JSON images no item matched are recorded
        in :attr:`unmatched_images` (``strict``: :class:`AnnotationError`).
        """
        by_base: dict[str, list[str]] = {}
        for name in self.images:
            by_base.setdefault(name.rsplit("/", 1)[-1], []).append(name)
        item_bases = Counter(os.path.basename(it.path) for it in items)
        used: set[str] = set()
        out: list[ImageTruth | None] = []
        for it in items:
            rel = os.path.relpath(it.path, root).replace(os.sep, "/") if root else it.path
            name = rel if rel in self.images else None
            if name is None:
                base = os.path.basename(it.path)
                cands = by_base.get(base, [])
                if len(cands) == 1 and item_bases[base] == 1:
                    name = cands[0]
            if name is not None and name in used:
                raise AnnotationError(
                    f"{self.path}: image {name!r} (id {self.images[name].image_id}) matches "
                    f"more than one file of the source (last {it.source}); give file_name as "
                    "the path relative to SRC"
                )
            if name is not None:
                used.add(name)
            out.append(self.images[name] if name is not None else None)
        missing = [n for n in self.images if n not in used]
        self.unmatched_images = missing
        self.unmatched_annotations = int(sum(len(self.images[n].labels) for n in missing))
        if missing and strict:
            shown = ", ".join(f"{n!r} (id {self.images[n].image_id})" for n in missing[:_SHOWN])
            more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
            raise AnnotationError(
                f"{self.path}: {len(missing)} image(s) with {self.unmatched_annotations} "
                f"annotation(s) are not in the source: {shown}{more} (--strict)"
            )
        return out


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise AnnotationError(f"{what}: {value!r} is not an integer")
    return int(value)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AnnotationError(f"{what}: {value!r} is not a finite number")
    return float(value)


def _list(doc: dict, key: str, path: Path) -> list:
    value = doc.get(key)
    if not isinstance(value, list):
        raise AnnotationError(
            f"{path}: no {key!r} list (a COCO detection file has images, annotations, categories)"
        )
    return value


def _record(entry, what: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{what}: not a JSON object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise AnnotationError(f"{what}: no {', '.join(repr(k) for k in missing)}")
    return entry


def _fail(path: Path, what: str, bad: list[str]) -> None:
    if bad:
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise AnnotationError(f"{path}: {len(bad)} {what}: {'; '.join(bad[:_SHOWN])}{more}")


def load_annotations(path: str | Path) -> Annotations:
    """Read and check a COCO detection JSON (see the module docstring for every check): the
    file, its categories, its images, its annotations, then each image's ground truth."""
    path = Path(path)
    raw, doc = _read_json(path)
    categories = _categories(doc, path)
    images = _images(doc, path)
    per_image, clipped = _annotations(doc, path, images, categories)
    truths = {
        name: _image_truth(iid, name, w, h, per_image[iid]) for iid, (name, w, h) in images.items()
    }
    return Annotations(
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        categories=[{"id": k, "name": categories[k]} for k in sorted(categories)],
        images=truths,
        clipped=clipped,
    )


def _read_json(path: Path) -> tuple[bytes, dict]:
    """The file's bytes (for its sha256) and its JSON object."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the annotation file: {e}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AnnotationError(f"{path}: a COCO file is a JSON object, not {type(doc).__name__}")
    return raw, doc


def _categories(doc: dict, path: Path) -> dict[int, str]:
    """Category id -> name; ids unique int32 >= 0."""
    categories: dict[int, str] = {}
    for n, c in enumerate(_list(doc, "categories", path)):
        c = _record(c, f"{path}: categories[{n}]", ("id", "name"))
        cid = _int(c["id"], f"{path}: categories[{n}].id")
        if cid in categories:
            raise AnnotationError(f"{path}: category id {cid} listed twice")
        if not 0 <= cid < 2**31:
            raise AnnotationError(f"{path}: category id {cid} is not an int32 >= 0")
        categories[cid] = str(c["name"])
    return categories


def _images(doc: dict, path: Path) -> dict[int, tuple[str, int, int]]:
    """Image id -> (file name, width, height); ids and file names unique (``\\`` read as ``/``,
    a leading ``./`` dropped), sizes positive."""
    images: dict[int, tuple[str, int, int]] = {}
    names: set[str] = set()
    for n, im in enumerate(_list(doc, "images", path)):
        im = _record(im, f"{path}: images[{n}]", ("id", "file_name", "width", "height"))
        iid = _int(im["id"], f"{path}: images[{n}].id")
        where = f"{path}: image id {iid}"
        if iid in images:
            raise AnnotationError(f"{where} listed twice")
        name = im["file_name"]
        if not isinstance(name, str) or not name:
            raise AnnotationError(f"{where}: file_name {name!r} is not a file name")
        name = name.replace("\\", "/")
        if name.startswith("./"):
            name = name[2:]
        if name in names:
            raise AnnotationError(f"{where}: file_name {name!r} is given to two images")
        w, h = _int(im["width"], f"{where}: width"), _int(im["height"], f"{where}: height")
        if w < 1 or h < 1:
            raise AnnotationError(f"{where} ({name}): size {w}x{h} is not positive")
        images[iid] = (name, w, h)
        names.add(name)
    return images


_Box = tuple[list[float], int, int, float]  # xyxy (float), category id, iscrowd, area


def _annotations(
    doc: dict, path: Path, images: dict[int, tuple[str, int, int]], categories: dict[int, str]
) -> tuple[dict[int, list[_Box]], int]:
    """Every annotation checked and grouped by image, and how many boxes overrun their image by
    at most :data:`OVERRUN_TOLERANCE` (clipped later). Annotations that name an unknown image
    or category, have an empty box or one outside the image by more are all collected and
    raised together, by kind."""
    per_image: dict[int, list[_Box]] = {i: [] for i in images}
    ann_ids: set[int] = set()
    orphans, unknown, empty, outside = [], [], [], []
    clipped = 0
    tol = OVERRUN_TOLERANCE
    for n, a in enumerate(_list(doc, "annotations", path)):
        a = _record(a, f"{path}: annotations[{n}]", ("id", "image_id", "bbox", "category_id"))
        aid = _int(a["id"], f"{path}: annotations[{n}].id")
        if aid in ann_ids:
            raise AnnotationError(f"{path}: annotation id {aid} listed twice")
        ann_ids.add(aid)
        iid = _int(a["image_id"], f"{path}: annotation {aid}: image_id")
        where = f"annotation {aid} (image {iid})"
        cid = _int(a["category_id"], f"{path}: {where}: category_id")
        crowd = _int(a.get("iscrowd", 0), f"{path}: {where}: iscrowd")
        if crowd not in (0, 1):
            raise AnnotationError(f"{path}: {where}: iscrowd {crowd} is not 0 or 1")
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AnnotationError(f"{path}: {where}: bbox {bbox!r} is not [x, y, w, h]")
        x, y, bw, bh = (_number(v, f"{path}: {where}: bbox") for v in bbox)
        area = _number(a.get("area", bw * bh), f"{path}: {where}: area")
        if iid not in images:
            orphans.append(where)
            continue
        if cid not in categories:
            unknown.append(f"{where}: category {cid}")
            continue
        if bw <= 0 or bh <= 0:
            empty.append(f"{where}: bbox {bbox}")
            continue
        _, w, h = images[iid]
        if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
            outside.append(f"{where}: bbox {bbox} on a {w}x{h} image")
            continue
        if x < 0 or y < 0 or x + bw > w or y + bh > h:
            clipped += 1
        per_image[iid].append(([x, y, x + bw, y + bh], cid, crowd, area))
    _fail(path, "annotation(s) name an image id that 'images' does not list", orphans)
    _fail(path, "annotation(s) name a category id that 'categories' does not list", unknown)
    _fail(path, "annotation(s) have a box of non-positive width or height", empty)
    _fail(path, f"annotation(s) have a box outside the image by over {tol:g} px", outside)
    return per_image, clipped


def _image_truth(iid: int, name: str, w: int, h: int, anns: list[_Box]) -> ImageTruth:
    """One image's ground truth: boxes as int32 pixels that cover the float box (floor / ceil),
    clipped to the image and at least 1 px wide and high."""
    xyxy = np.array([b for b, _, _, _ in anns], dtype=np.float64).reshape(-1, 4)
    boxes = np.empty((len(anns), 4), dtype=np.int32)
    boxes[:, 0] = np.clip(np.floor(xyxy[:, 0]), 0, w - 1)
    boxes[:, 1] = np.clip(np.floor(xyxy[:, 1]), 0, h - 1)
    boxes[:, 2] = np.clip(np.ceil(xyxy[:, 2]), boxes[:, 0] + 1, w)
    boxes[:, 3] = np.clip(np.ceil(xyxy[:, 3]), boxes[:, 1] + 1, h)
    return ImageTruth(
        image_id=iid,
        file_name=name,
        width=w,
        height=h,
        boxes=boxes,
        labels=np.array([c for _, c, _, _ in anns], dtype=np.int32),
        crowd=np.array([k == 1 for _, _, k, _ in anns], dtype=bool),
        areas=np.array([ar for _, _, _, ar in anns], dtype=np.float32),
    )
