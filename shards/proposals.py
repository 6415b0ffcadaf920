"""Selective-search proposals: OpenCV ximgproc, run on a downscaled copy, boxes filtered as UniVIP/ORL.

Boxes are ``int32 [N, 4]`` xyxy in pixels of the decoded (EXIF-oriented) image, with exclusive
right/bottom edges, so ``width = x1 - x0``. Rank order is the order OpenCV returns: it sorts
regions by ``level * rand()`` using the C library's ``rand()``; we seed it per image so that the
same image always gives the same order (byte-identical shards). ``rand()`` is process-wide: the
order is reproducible only while no other thread of the process calls it during the search (true
in the build's worker processes; see ``shards.engines`` for Ray).
"""

from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass

import numpy as np

SEARCH_MODES = ("fast", "quality")

_XIMGPROC_HELP = (
    "OpenCV was found but without the contrib module cv2.ximgproc, which selective search needs. "
    "This usually means plain 'opencv-python' (or '-headless') is installed next to, and shadows, "
    "'opencv-contrib-python-headless'. Fix: pip uninstall -y opencv-python opencv-python-headless "
    "opencv-contrib-python opencv-contrib-python-headless && pip install opencv-contrib-python-headless"
)


class MissingXimgprocError(RuntimeError):
    """cv2 imports but has no ``ximgproc`` (a non-contrib OpenCV shadows the contrib build)."""


def load_cv2():
    """Import cv2 and check that the contrib module ``ximgproc`` is present."""
    import cv2

    if not hasattr(cv2, "ximgproc") or not hasattr(cv2.ximgproc, "segmentation"):
        raise MissingXimgprocError(_XIMGPROC_HELP)
    return cv2


@dataclass(frozen=True)
class FilterParams:
    """Proposal filter of UniVIP §3.2 / Appendix A.3 (the ORL recipe)."""

    min_side: int = 64  # pixels of the decoded image, both sides
    min_aspect: float = 1.0 / 3.0  # width / height
    max_aspect: float = 3.0
    max_iou: float = 0.5  # greedy: against every box already kept
    top_n: int = 100  # keep at most this many, in selective-search rank order


@dataclass(frozen=True)
class SearchParams:
    mode: str = "fast"
    max_side: int = 320  # longer side of the copy the search runs on (0 = full resolution)
    min_search_side: int = 32  # never downscale the shorter side below this
    # Felzenszwalb's k (OpenCV's base_k = inc_k, default 150) is in pixels of the image searched;
    # scaling it with the downscale factor keeps the initial segments comparable to a
    # full-resolution search (measured: higher box recall against the ORL recipe, same speed).
    base_k: int = 150
    scale_k: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {self.mode!r}; choose one of {SEARCH_MODES}")
        if self.base_k < 1:
            raise ValueError(f"base_k must be >= 1, got {self.base_k}")
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0 (0 = full resolution), got {self.max_side}")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a [P, 4]`` with ``b [Q, 4]`` -> ``[P, Q]`` float64 (0 for empty unions)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def filter_boxes(boxes: np.ndarray, params: FilterParams = FilterParams()) -> np.ndarray:
    """Filter xyxy boxes ``[N, 4]`` given in rank order -> kept boxes ``[M, 4]`` int32, rank order.

    Size and aspect filters first, then greedy suppression: a box is kept when its IoU with every
    box kept before it is <= ``max_iou``; stops once ``top_n`` boxes are kept.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    ok = (w >= params.min_side) & (h >= params.min_side)
    aspect = w / np.maximum(h, 1)
    ok &= (aspect >= params.min_aspect - 1e-9) & (aspect <= params.max_aspect + 1e-9)
    candidates = boxes[ok]
    kept = np.empty((min(len(candidates), params.top_n), 4), dtype=np.int64)
    n = 0
    for box in candidates:
        if n == params.top_n:
            break
        if n == 0 or box_iou(box[None], kept[:n]).max() <= params.max_iou:
            kept[n] = box
            n += 1
    return kept[:n].astype(np.int32)


def search_scale(width: int, height: int, params: SearchParams) -> float:
    """Factor (<= 1) the image is resized by before the search."""
    if params.max_side == 0:
        return 1.0
    scale = min(1.0, params.max_side / max(width, height))
    floor = min(1.0, params.min_search_side / max(1, min(width, height)))
    return max(scale, floor)


def _seed_for(key: str) -> int:
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


_libc = None


def _seed_c_rand(seed: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None)
    _libc.srand(ctypes.c_uint(seed))


def selective_search(rgb: np.ndarray, params: SearchParams, key: str = "") -> np.ndarray:
    """Run selective search on ``rgb`` ``[H, W, 3]`` uint8 -> raw boxes ``[N, 4]`` int32 xyxy in
    pixels of ``rgb``, in rank order. Deterministic for a given ``key``."""
    cv2 = load_cv2()
    cv2.setNumThreads(1)
    height, width = rgb.shape[:2]
    scale = search_scale(width, height, params)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    k = max(1, round(params.base_k * scale)) if params.scale_k else params.base_k
    if params.mode == "fast":
        ss.switchToSelectiveSearchFast(k, k)
    else:
        ss.switchToSelectiveSearchQuality(k, k)
    _seed_c_rand(_seed_for(key))
    rects = ss.process()
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), dtype=np.int32)
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    sx = width / bgr.shape[1]
    sy = height / bgr.shape[0]
    xyxy = np.stack(
        [
            rects[:, 0] * sx,
            rects[:, 1] * sy,
            (rects[:, 0] + rects[:, 2]) * sx,
            (rects[:, 1] + rects[:, 3]) * sy,
        ],
        axis=1,
    )
    xyxy = np.rint(xyxy)
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
    return xyxy.astype(np.int32)
