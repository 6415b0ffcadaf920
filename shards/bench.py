"""``ssl-cli bench shards``: our configured search against the ORL recipe, same images, one run.

The ORL recipe runs selective search in fast mode on the full-resolution image. Both sides are
timed on one core (``cv2.setNumThreads(1)``; the build scales by processes), on images decoded
once up front, and both outputs go through the same proposal filter. Box recall is the fraction
of the ORL recipe's filtered boxes that have IoU >= 0.5 with one of ours.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from .images import ImageParams, RejectedImage, decode_image
from .proposals import FilterParams, SearchParams, box_iou, filter_boxes, load_cv2, selective_search
from .sources import open_source
from .sysinfo import cpu_model

ORL_RECIPE = SearchParams(mode="fast", max_side=0)


def _recall(reference: list[np.ndarray], ours: list[np.ndarray], thr: float = 0.5) -> float:
    hit = total = 0
    for ref, mine in zip(reference, ours):
        total += len(ref)
        if len(ref) and len(mine):
            hit += int((box_iou(ref, mine).max(axis=1) >= thr).sum())
    return hit / total if total else float("nan")


def _run(
    images: list[tuple[str, np.ndarray]],
    params: SearchParams,
    fparams: FilterParams,
    seed: str = "",
):
    start = time.perf_counter()
    out = [
        filter_boxes(selective_search(rgb, params, key=key + seed), fparams) for key, rgb in images
    ]
    return time.perf_counter() - start, out


def hardware() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def bench_search(
    src: str,
    ours: list[SearchParams],
    limit: int | None = None,
    fparams: FilterParams = FilterParams(),
    log=print,
) -> dict:
    """Time ORL vs each of ``ours`` on the images of ``src``; returns a JSON-able report."""
    cv2 = load_cv2()
    cv2.setNumThreads(1)
    source = open_source(src)
    items = source.items[:limit] if limit else source.items
    images = []
    for item in items:
        if item.reject is not None:
            continue
        try:
            images.append((item.key, decode_image(item.read(), ImageParams()).rgb))
        except (RejectedImage, OSError):
            continue
    if not images:
        raise ValueError(f"{src}: no usable images to benchmark")
    sizes = np.array([rgb.shape[:2] for _, rgb in images])
    log(
        f"{len(images)} images, median {int(np.median(sizes[:, 1]))}x{int(np.median(sizes[:, 0]))} px"
    )
    orl_s, orl_boxes = _run(images, ORL_RECIPE, fparams)
    log(f"ORL recipe (fast, full resolution): {len(images) / orl_s:.2f} images/s per core")
    # The ORL recipe against itself with OpenCV's rank order reseeded: how far the filtered box
    # set moves by chance alone (greedy IoU suppression over a randomised rank order).
    orl2_s, orl2_boxes = _run(images, ORL_RECIPE, fparams, seed="/reseeded")
    ceiling = _recall(orl_boxes, orl2_boxes)
    log(f"ORL recipe vs itself reseeded: recall {ceiling:.3f} (the noise ceiling of this metric)")
    rows = []
    for params in ours:
        t, boxes = _run(images, params, fparams)
        row = {
            "mode": params.mode,
            "max_side": params.max_side,
            "images_per_s_per_core": len(images) / t,
            "speedup_vs_orl": orl_s / t,
            "recall_at_iou_0_5": _recall(orl_boxes, boxes),
            "recall_vs_ceiling": _recall(orl_boxes, boxes) / ceiling,
            "mean_boxes": float(np.mean([len(b) for b in boxes])),
        }
        rows.append(row)
        log(
            f"ours ({params.mode}, max side {params.max_side}): {row['images_per_s_per_core']:.2f} images/s "
            f"per core, {row['speedup_vs_orl']:.2f}x ORL, recall {row['recall_at_iou_0_5']:.3f} "
            f"({row['recall_vs_ceiling']:.2f} of the ceiling), {row['mean_boxes']:.0f} boxes/image"
        )
    return {
        "source": src,
        "images": len(images),
        "median_size": [int(np.median(sizes[:, 1])), int(np.median(sizes[:, 0]))],
        "hardware": hardware(),
        "opencv": cv2.__version__,
        "orl": {
            "images_per_s_per_core": len(images) / orl_s,
            "mean_boxes": float(np.mean([len(b) for b in orl_boxes])),
            "self_recall_reseeded": ceiling,
            "images_per_s_per_core_second_run": len(images) / orl2_s,
        },
        "ours": rows,
    }
