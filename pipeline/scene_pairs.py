"""UniVIP scene-pair sampling: two scene views whose overlap holds K instances.

Paper: Li et al., "UniVIP: A Unified Framework for Self-Supervised Visual Pre-training"
(``papers/univip.md``), §3.2, Appendix A.2 (Algorithm 1) and A.3.

Algorithm 1, vectorised: draw ``tries`` pairs of random-resized-crop scene boxes at once, test
every stored proposal against every pair's overlap in one numpy comparison, and take the first
pair whose overlap contains at least ``K`` proposals. When no pair does, keep the pair with the
most contained proposals (ties: the larger overlap) and fill up with random boxes inside its
overlap (the "naive strategy" of §3.2 / A.2: min side 64 px, aspect 1/3..3, IoU <= 0.5).

All boxes are ``int64`` xyxy pixels of the decoded image with exclusive ``x1, y1``:
``[x0, y0, x1, y1]`` covers columns ``x0..x1-1`` and rows ``y0..y1-1``
(a torchvision crop ``(top, left, height, width)`` is ``[left, top, left+width, top+height]``).

numpy only: this runs once per sample inside the data pipeline.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from shards.proposals import box_iou

__all__ = [
    "FILL_MAX_ASPECT",
    "FILL_MAX_IOU",
    "FILL_MIN_SIZE",
    "NUM_INSTANCES",
    "SCENE_RATIO",
    "SCENE_SCALE",
    "TRIES",
    "boxes_inside",
    "clean_boxes",
    "random_resized_crop_boxes",
    "sample_scene_pair",
]

NUM_INSTANCES = 4  # K, §3.2; best in the ablation of §4.4 / Table 8(c)
TRIES = 20  # iters of Algorithm 1, A.2 / Table 9
# Scene views: "the scene-level data augmentation strategy follows [BYOL]" (§4), whose crop is
# torchvision's RandomResizedCrop with its defaults (ORL, whose COCO recipe UniVIP follows,
# uses the same); area fraction and aspect ratio w/h of the crop:
SCENE_SCALE = (0.08, 1.0)
SCENE_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# The naive fill-up strategy, §3.2 and A.2:
FILL_MIN_SIZE = 64  # minimum side, pixels
FILL_MAX_ASPECT = 3.0  # aspect ratio between 1/3 and 3
FILL_MAX_IOU = 0.5  # maximum IoU with the other instances

# torchvision's RandomResizedCrop.get_params tries this many (area, ratio) draws before it
# falls back to a centre crop.
_RRC_ATTEMPTS = 10
# Random candidate boxes drawn at once for the fill-up (at least this many, 16 per missing box).
_FILL_CANDIDATES = 64


def _as_size(value: object, name: str) -> int:
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if size < 1:
        raise ValueError(f"{name} must be >= 1, got {size}")
    return size


def clean_boxes(boxes: object, width: int, height: int) -> np.ndarray:
    """``[N, 4]`` xyxy -> ``[M, 4]`` int64, clipped to the image, degenerate boxes dropped.

    Order is kept (proposals are in rank order). Non-integer coordinates are widened outwards
    (floor of the low, ceil of the high corner); boxes with non-finite coordinates, and boxes
    empty after clipping (``x1 <= x0`` or ``y1 <= y0``, swapped corners included), are dropped.
    """
    arr = np.asarray(boxes)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr).all(axis=1)]
        arr = np.concatenate([np.floor(arr[:, :2]), np.ceil(arr[:, 2:])], axis=1)
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"boxes must be numeric, got dtype {arr.dtype}")
    limit = np.array([width, height, width, height])
    out = np.minimum(np.maximum(arr, 0), limit).astype(np.int64)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep]


def boxes_inside(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Containment test: ``boxes [N, 4]``, ``regions [T, 4]`` -> ``inside [T, N]`` bool.

    ``inside[t, n]`` is true when box ``n`` lies entirely in region ``t`` (the test of
    Algorithm 1, lines 6-7). An empty region contains no (non-degenerate) box.
    """
    # one contiguous int32 row per coordinate: ~3x faster than strided int64 columns
    b = np.ascontiguousarray(boxes.T, dtype=np.int32)  # [4, N]
    r = regions.astype(np.int32)
    return (b[0] >= r[:, 0:1]) & (b[1] >= r[:, 1:2]) & (b[2] <= r[:, 2:3]) & (b[3] <= r[:, 3:4])


def random_resized_crop_boxes(
    width: int,
    height: int,
    n: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = SCENE_SCALE,
    ratio: tuple[float, float] = SCENE_RATIO,
) -> np.ndarray:
    """``n`` crop boxes drawn like torchvision ``RandomResizedCrop.get_params`` -> ``[n, 4]``.

    Per box: up to 10 draws of an area fraction ``U(scale)`` and a log-uniform aspect ratio
    ``w/h`` in ``ratio``; the first draw that fits in the image wins, at a uniform position.
    When none fits: the centre crop of the whole image with its aspect clamped to ``ratio``.
    Vectorised over the ``n`` boxes and 10 draws (one call to the generator).
    """
    a = _RRC_ATTEMPTS
    u = rng.random((n, 2 * a + 2))
    target = (width * height) * (scale[0] + (scale[1] - scale[0]) * u[:, :a])
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_r0 + (log_r1 - log_r0) * u[:, a : 2 * a])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    valid = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = valid.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    found = valid[rows, first]
    if not found.all():
        # torchvision's centre-crop fallback (with a floor of 1 pixel for degenerate sizes)
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            fw, fh = round(height * ratio[1]), height
        else:
            fw, fh = width, height
        fw, fh = min(max(fw, 1), width), min(max(fh, 1), height)
        w = np.where(found, w, fw)
        h = np.where(found, h, fh)
    # uniform position; u < 1 so floor(u * m) <= m - 1, the minimum guards float rounding
    x0 = np.minimum(np.floor(u[:, -2] * (width - w + 1)), width - w)
    y0 = np.minimum(np.floor(u[:, -1] * (height - h + 1)), height - h)
    if not found.all():
        x0 = np.where(found, x0, (width - w) // 2)
        y0 = np.where(found, y0, (height - h) // 2)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.int64)


def _fill_boxes(
    region: np.ndarray,
    existing: np.ndarray,
    n: int,
    rng: np.random.Generator,
    min_size: int,
    max_aspect: float,
    max_iou: float,
) -> np.ndarray:
    """``n`` random boxes inside ``region [4]`` (non-empty), the naive strategy of A.2.

    Constraints, relaxed in this fixed order only when the region cannot meet them:

    1. min side ``min(min_size, region width, region height)``: a region narrower than
       ``min_size`` gets boxes as wide as it can;
    2. aspect ratio in ``[1/max_aspect, max_aspect]``: always met;
    3. IoU ``<= max_iou`` with ``existing`` and with each other: candidates are drawn at once
       and accepted greedily in draw order; slots still empty after all candidates (a region too
       small for ``n`` such boxes, e.g. a tiny image) take the next candidates regardless of IoU.
    """
    rx0, ry0, rx1, ry1 = (int(v) for v in region)
    rw, rh = rx1 - rx0, ry1 - ry0
    m = min(min_size, rw, rh)
    n_cand = max(_FILL_CANDIDATES, 16 * n)

    # Width uniform in what the aspect limit allows, height from a log-uniform aspect ratio,
    # clamped so that min side and aspect hold exactly in integers.
    w_max = min(rw, math.floor(max_aspect * rh))
    u = rng.random((4, n_cand))
    w = np.minimum(m + np.floor(u[0] * (w_max - m + 1)), w_max)
    log_a = math.log(max_aspect)
    aspect = np.exp(log_a * (2.0 * u[1] - 1.0))
    h_lo = np.maximum(m, np.ceil(w / max_aspect))
    h_hi = np.minimum(rh, np.floor(w * max_aspect))
    h = np.minimum(np.maximum(np.rint(w / aspect), h_lo), h_hi)
    x0 = rx0 + np.minimum(np.floor(u[2] * (rw - w + 1)), rw - w)
    y0 = ry0 + np.minimum(np.floor(u[3] * (rh - h + 1)), rh - h)
    cand = np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.int64)

    ok_existing = (
        (box_iou(cand, existing) <= max_iou).all(axis=1)
        if len(existing)
        else np.ones(n_cand, dtype=bool)
    )
    ok_pair = box_iou(cand, cand) <= max_iou
    chosen: list[int] = []
    for c in np.flatnonzero(ok_existing):
        if ok_pair[c, chosen].all():
            chosen.append(int(c))
            if len(chosen) == n:
                break
    if len(chosen) < n:  # relaxation 3: the IoU limit cannot be met in this region
        taken = set(chosen)
        chosen += [c for c in range(n_cand) if c not in taken][: n - len(chosen)]
    return cand[chosen]


def sample_scene_pair(
    width: int,
    height: int,
    boxes: object,
    k: int = NUM_INSTANCES,
    tries: int = TRIES,
    rng: np.random.Generator | None = None,
    *,
    scale: tuple[float, float] = SCENE_SCALE,
    ratio: tuple[float, float] = SCENE_RATIO,
    min_size: int = FILL_MIN_SIZE,
    max_aspect: float = FILL_MAX_ASPECT,
    max_iou: float = FILL_MAX_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two scene boxes whose overlap contains ``k`` instance boxes (Algorithm 1, A.2).

    Args:
        width, height: size of the decoded image, pixels (>= 1).
        boxes: ``[N, 4]`` xyxy pixel proposals in rank order (``[0, 4]`` when there are none);
            clipped to the image, degenerate ones ignored (:func:`clean_boxes`).
        k: instances to return (``K = 4``, §3.2).
        tries: scene pairs drawn (``iters = 20``, A.2 / Table 9).
        rng: numpy Generator; ``np.random.default_rng()`` when ``None``.
        scale, ratio: area fraction and aspect ratio (w/h) of each scene crop, torchvision
            RandomResizedCrop semantics; defaults ``(0.08, 1)`` and ``(3/4, 4/3)`` (BYOL's, §4).
        min_size, max_aspect, max_iou: the fill-up constraints (64 px, 3, 0.5; §3.2, A.2).

    Returns:
        ``scene1 [4]``, ``scene2 [4]``, ``instances [k, 4]``, all int64 xyxy pixels. Both
        scenes lie in the image; every instance lies in the intersection of the two scenes.
        The pair is the first of the ``tries`` draws whose overlap contains at least ``k``
        proposals, and ``instances`` are then the first ``k`` of those in rank order. When no
        draw reaches ``k``: the draw with the most contained proposals (then the largest
        overlap, then the earliest), its contained proposals in rank order, filled up with
        random boxes inside the overlap (:func:`_fill_boxes`, whose constraints relax
        deterministically so that tiny overlaps, down to 1x1, still work). If no draw overlaps
        at all, ``scene2`` is set to ``scene1`` so that the overlap is not empty.

    Deterministic for a seeded ``rng``; no unbounded loop.
    """
    width = _as_size(width, "width")
    height = _as_size(height, "height")
    k = operator.index(k)
    tries = operator.index(tries)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    if not 0 <= max_iou <= 1:
        raise ValueError(f"max_iou must be in [0, 1], got {max_iou}")
    rng = rng if rng is not None else np.random.default_rng()

    props = clean_boxes(boxes, width, height)
    scenes = random_resized_crop_boxes(width, height, 2 * tries, rng, scale, ratio)
    scenes = scenes.reshape(tries, 2, 4)
    overlap = np.concatenate(
        [
            np.maximum(scenes[:, 0, :2], scenes[:, 1, :2]),
            np.minimum(scenes[:, 0, 2:], scenes[:, 1, 2:]),
        ],
        axis=1,
    )  # [T, 4]
    inside = boxes_inside(props, overlap)  # [T, N]
    count = inside.sum(axis=1)

    reached = count >= k
    if reached.any():
        t = int(np.argmax(reached))  # the first draw that succeeds, as Algorithm 1 returns
    else:
        ow = np.maximum(overlap[:, 2] - overlap[:, 0], 0)
        oh = np.maximum(overlap[:, 3] - overlap[:, 1], 0)
        # most proposals, then largest overlap, then earliest (argmax takes the first maximum)
        t = int(np.argmax(count * (width * height + 1) + ow * oh))
    scene1, scene2 = scenes[t, 0].copy(), scenes[t, 1].copy()
    region = overlap[t].copy()
    fits = inside[t]
    if region[2] <= region[0] or region[3] <= region[1]:  # no draw overlapped at all
        scene2 = scene1.copy()
        region = scene1.copy()
        fits = boxes_inside(props, region[None])[0]

    instances = props[fits][:k]
    if len(instances) < k:
        extra = _fill_boxes(
            region, instances, k - len(instances), rng, min_size, max_aspect, max_iou
        )
        instances = np.concatenate([instances, extra], axis=0)
    return scene1, scene2, instances.astype(np.int64).reshape(k, 4)
