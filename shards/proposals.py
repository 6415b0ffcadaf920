"""Selective-search proposals: OpenCV ximgproc, run on a downscaled copy, boxes filtered as UniVIP/ORL.

Boxes are ``int32 [N, 4]`` xyxy in pixels of the decoded (EXIF-oriented) image, with exclusive
right/bottom edges, so ``width = x1 - x0``. The search returns them in OpenCV's order: it sorts
regions by ``level * rand()`` using the C library's ``rand()``; we seed it per image so that the
same image always gives the same order (byte-identical shards). ``rand()`` is process-wide: the
order is reproducible only while no other thread of the process calls it during the search (true
in the build's worker processes; see ``shards.engines`` for Ray). The filter then visits them in
the order of ``FilterParams.rank`` (by default, boxes the search agrees on first) and stores the
kept ones in the order it kept them.

The defaults differ from the ORL recipe (fast mode on the full image, filtered in OpenCV's order)
where a measurement against ground truth showed tighter boxes at equal or better speed
(docs/benchmarks-history.md, "Proposal recall against ground truth"). The recipe stays one option set
away: ``SearchParams(mode="fast", max_side=0)`` with ``FilterParams(rank="search")``
(``--mode fast --max-side 0 --rank search``).
"""

from __future__ import annotations

import ctypes
import zlib
from dataclasses import dataclass

import numpy as np

SEARCH_MODES = ("fast", "quality", "lean")

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


RANKS = ("search", "agreement")


@dataclass(frozen=True)
class FilterParams:
    """Proposal filter of UniVIP §3.2 / Appendix A.3 (the ORL recipe), and the order it runs in.

    ``rank``: the order in which the greedy suppression visits the boxes, which decides which
    of two overlapping boxes is kept. ``search``: the search's own order (OpenCV's ``level *
    rand()``, the ORL recipe). ``agreement``: boxes that many other boxes of the search agree
    with first (:func:`agreement_scores`).
    """

    ORL_RANK = "search"  # the order the ORL recipe filters in (class constant, not a field)

    min_side: int = 64  # pixels of the decoded image, both sides
    min_aspect: float = 1.0 / 3.0  # width / height
    max_aspect: float = 3.0
    max_iou: float = 0.5  # greedy: against every box already kept
    top_n: int = 100  # keep at most this many, in rank order
    # Our choice over the recipe's "search": on held-out 96-px scenes AR@100 0.588 -> 0.678 at
    # the same box count and speed, and more on larger scenes (docs/benchmarks.md).
    rank: str = "agreement"
    agreement_iou: float = 0.7  # rank="agreement": boxes this close count as agreeing

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise ValueError(f"unknown rank {self.rank!r}; choose one of {RANKS}")
        if not 0.0 < self.agreement_iou <= 1.0:
            raise ValueError(f"agreement_iou must be in (0, 1], got {self.agreement_iou}")


@dataclass(frozen=True)
class SearchParams:
    # "lean" (ours, see _PRESETS) over OpenCV's "fast" that the ORL recipe runs: with the
    # agreement order and scale_segment, AR@100 0.700 against 0.709 on held-out 96-px scenes at
    # 1.7x fast's speed (docs/benchmarks.md).
    mode: str = "lean"
    max_side: int = 320  # longer side of the copy the search runs on (0 = full resolution)
    min_search_side: int = 32  # never downscale the shorter side below this
    # Felzenszwalb's k (OpenCV's base_k = inc_k, default 150) is in pixels of the image searched;
    # scaling it with the downscale factor keeps the initial segments comparable to a
    # full-resolution search (measured: higher box recall against the ORL recipe, same speed).
    base_k: int = 150
    scale_k: bool = True
    # The graph segmentation's smallest segment (OpenCV's createGraphSegmentation default,
    # which its selective-search presets keep), in pixels of a copy whose longer side is
    # max_side. With scale_segment, an image smaller than that is searched as it is (never
    # upsampled) with min_segment * (longer side / max_side)^2, the smallest segment of a copy
    # upsampled to max_side; see segment_min_size.
    min_segment: int = 100
    # Held-out 96-px scenes: AR@100 +0.04 and +0.05 at a 20% lower speed; nothing at 192 px
    # (docs/benchmarks.md). Off: min_segment pixels whatever the image's size.
    scale_segment: bool = True
    # Search an image smaller than max_side on a copy upsampled to it (bilinear). Off: the cost
    # grows with the square of the factor; scale_segment gets most of its recall for far less.
    upsample: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {self.mode!r}; choose one of {SEARCH_MODES}")
        if self.base_k < 1:
            raise ValueError(f"base_k must be >= 1, got {self.base_k}")
        if self.min_segment < 1:
            raise ValueError(f"min_segment must be >= 1, got {self.min_segment}")
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


def agreement_scores(boxes: np.ndarray, iou: float, chunk: int = 256) -> np.ndarray:
    """``[N]`` float64: for each xyxy box of ``boxes [N, 4]``, the sum of its IoU with every box
    of the set (itself included) whose IoU with it is at least ``iou``.

    Selective search's authors let a location that several grouping strategies return rank
    above one returned once, reasoning that a box many strategies agree on is likely a visually
    coherent part of the image (Uijlings et al., Selective Search for Object Recognition, IJCV
    2013, on combining locations). OpenCV keeps one copy of each exact duplicate, so that count
    is gone from its output; this is a soft form of it, in which the near-duplicates that the
    other colour spaces, k values and strategies give count by how close they are. Computed
    ``chunk`` rows at a time (memory ``chunk * N``).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    out = np.empty(len(boxes), dtype=np.float64)
    for start in range(0, len(boxes), chunk):
        overlap = box_iou(boxes[start : start + chunk], boxes)
        out[start : start + chunk] = np.where(overlap >= iou, overlap, 0.0).sum(axis=1)
    return out


def filter_boxes(boxes: np.ndarray, params: FilterParams = FilterParams()) -> np.ndarray:
    """Filter xyxy boxes ``[N, 4]`` given in the search's rank order -> kept boxes ``[M, 4]``
    int32, in the order they were kept.

    Size and aspect filters first; then, with ``rank="agreement"``, a stable sort by
    :func:`agreement_scores` (ties keep the search's order); then greedy suppression: a box is
    kept when its IoU with every box kept before it is <= ``max_iou``; stops once ``top_n``
    boxes are kept.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    ok = (w >= params.min_side) & (h >= params.min_side)
    aspect = w / np.maximum(h, 1)
    ok &= (aspect >= params.min_aspect - 1e-9) & (aspect <= params.max_aspect + 1e-9)
    candidates = boxes[ok]
    if params.rank == "agreement" and len(candidates) > 1:
        scores = agreement_scores(candidates, params.agreement_iou)
        candidates = candidates[np.argsort(-scores, kind="stable")]
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
    """Factor the image is resized by before the search: <= 1, or > 1 for an image smaller
    than ``max_side`` with ``upsample``."""
    if params.max_side == 0:
        return 1.0
    scale = params.max_side / max(width, height)
    if not params.upsample:
        scale = min(1.0, scale)
    floor = min(1.0, params.min_search_side / max(1, min(width, height)))
    return max(scale, floor)


# OpenCV's presets (ximgproc/src/selectivesearchsegmentation.cpp, switchToSelectiveSearchFast
# and switchToSelectiveSearchQuality), rebuilt from their parts so that the graph segmentation's
# min_size can be set (the presets leave it at createGraphSegmentation's default, 100): the
# colour spaces searched, how many k values (base_k + i * inc_k, with inc_k = base_k), and the
# similarity strategies. Built with min_size 100 they return the presets' boxes in the same
# order (tests/test_bench_shards.py checks it).
_PRESETS = {
    "fast": (
        ("hsv", "lab"),
        3,
        (("color", "fill", "texture", "size"), ("fill", "texture", "size")),
    ),
    "quality": (
        ("hsv", "lab", "gray", "blue", "rgi"),
        5,
        (("color", "fill", "texture", "size"), ("fill", "texture", "size"), ("fill",), ("size",)),
    ),
    # Ours: fast's colour spaces with two graph segmentations (k and 2k; the authors' own
    # "Selective Search Fast" setting has two k values too) and only fast's colour-aware
    # strategy. Chosen on scenes with ground truth: in the agreement order, boxes about as good
    # as fast's (AR@100 -0.01 to +0.02 on scenes of 96 to 320 px) in 60% of its time
    # (docs/benchmarks.md).
    "lean": (("hsv", "lab"), 2, (("color", "fill", "texture", "size"),)),
}
_SIGMA = 0.8  # the presets' Gaussian smoothing before the graph segmentation


def _colour_space(cv2, bgr: np.ndarray, name: str) -> np.ndarray:
    if name == "hsv":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if name == "lab":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if name == "gray":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if name == "blue":
        # The quality preset means to add the hue plane, but it splits the BGR image into the
        # same Mat array afterwards, and cv::split writes into the hue plane's buffer: what is
        # searched is the blue plane. Kept, so that the boxes are the preset's.
        return cv2.split(bgr)[0]
    # "rgi": red, green and intensity (the quality preset's rgI image)
    b, g, r = cv2.split(bgr)
    return cv2.merge([r, g, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)])


def _segmentation(cv2, bgr: np.ndarray, mode: str, k: int, min_segment: int):
    """The selective-search object of ``mode`` (a preset of :data:`_PRESETS`) on ``bgr``."""
    seg = cv2.ximgproc.segmentation
    spaces, n_k, strategies = _PRESETS[mode]
    make = {
        "color": seg.createSelectiveSearchSegmentationStrategyColor,
        "fill": seg.createSelectiveSearchSegmentationStrategyFill,
        "texture": seg.createSelectiveSearchSegmentationStrategyTexture,
        "size": seg.createSelectiveSearchSegmentationStrategySize,
    }
    ss = seg.createSelectiveSearchSegmentation()
    for name in spaces:
        ss.addImage(_colour_space(cv2, bgr, name))
    for i in range(n_k):
        ss.addGraphSegmentation(
            seg.createGraphSegmentation(_SIGMA, float(k * (1 + i)), min_segment)
        )
    for parts in strategies:
        made = [make[p]() for p in parts]
        ss.addStrategy(
            made[0]
            if len(made) == 1
            else seg.createSelectiveSearchSegmentationStrategyMultiple(*made)
        )
    return ss


def segment_min_size(searched_width: int, searched_height: int, params: SearchParams) -> int:
    """The graph segmentation's smallest segment, in pixels of the image searched.

    A segment of fewer pixels is merged into a neighbour, so a small object can gain its
    neighbour's pixels and a loose box. OpenCV's 100 pixels suit the copies of ``max_side``
    (320) the search runs on; on a 96-px scene that is a tenth of a 32-px object's area. Scaling
    it with the area, as if the image were upsampled to ``max_side``, gets most of what
    upsampling would (measured on 96-px scenes: AR@100 0.688 against 0.710 for a search on a 2x
    upsampled copy, at 3.5 times its speed; docs/benchmarks.md). Images at or above
    ``max_side``, ``max_side = 0`` and ``scale_segment=False`` keep ``min_segment``.
    """
    longer = max(searched_width, searched_height)
    if not params.scale_segment or params.max_side == 0 or longer >= params.max_side:
        return params.min_segment
    return max(1, round(params.min_segment * (longer / params.max_side) ** 2))


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
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        shrink = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        bgr = cv2.resize(bgr, size, interpolation=shrink)
    # k follows the downscale only: an upsampled copy is searched with k as given
    k = max(1, round(params.base_k * scale)) if params.scale_k and scale < 1.0 else params.base_k
    min_size = segment_min_size(bgr.shape[1], bgr.shape[0], params)
    ss = _segmentation(cv2, bgr, params.mode, k, min_size)
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
