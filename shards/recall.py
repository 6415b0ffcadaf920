"""Recall of stored proposals against ground-truth boxes, as detection proposals are judged.

The procedure is the one COCO-trained detectors report for box proposals (Detectron's and
detectron2's ``_evaluate_box_proposals`` in ``evaluation/coco_evaluation.py``):

- per image, the top ``limit`` proposals in rank order against the non-crowd ground-truth boxes
  (crowd regions are not objects to find, as in COCO evaluation);
- a greedy one-to-one matching: repeatedly take the ground-truth box whose best IoU with a
  still-unused proposal is the highest, record that IoU, and retire both; ground truth left over
  (more objects than proposals) records 0;
- recall at IoU ``t`` = the share of ground-truth boxes whose recorded IoU is at least ``t``;
  average recall (AR) = the mean of recall over ``t`` in 0.50, 0.55, ..., 0.95;
- object sizes by COCO's ``area`` of the annotation (the segment's area in COCO, the box area
  where a file gives none): small < 32², medium 32²-96², large >= 96².

Boxes are xyxy with exclusive right/bottom edges on both sides (``KEY.boxes`` and ``KEY.gt``),
so a box's area is ``(x2 - x1) * (y2 - y1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .proposals import box_iou

__all__ = ["AREA_RANGES", "IOU_THRESHOLDS", "matched_ious", "proposal_recall"]

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.95 + 1e-9, 0.05), 2)  # COCO's 0.50:0.05:0.95
AREA_RANGES = {  # COCO's object sizes, in pixels of area
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, float("inf")),
}


def matched_ious(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``[M]`` IoU each ground-truth box gets in the greedy one-to-one matching (module doc)."""
    gt = np.asarray(gt).reshape(-1, 4)
    out = np.zeros(len(gt), dtype=np.float64)
    if len(gt) == 0 or len(proposals) == 0:
        return out
    overlaps = box_iou(proposals, gt)  # [P, M]
    for _ in range(min(overlaps.shape)):
        best_prop = overlaps.argmax(axis=0)  # per gt, its best proposal
        best = overlaps[best_prop, np.arange(overlaps.shape[1])]
        j = int(best.argmax())  # the gt covered best
        if best[j] < 0:
            break  # every gt already matched
        out[j] = best[j]
        overlaps[best_prop[j], :] = -1.0
        overlaps[:, j] = -1.0
    return out


def proposal_recall(
    proposals: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_crowd: Sequence[np.ndarray] | None = None,
    gt_areas: Sequence[np.ndarray] | None = None,
    limits: Sequence[int] = (10, 100),
) -> dict:
    """Recall of ``proposals[i]`` (``[N_i, 4]``, rank order) against ``gt_boxes[i]``.

    Returns ``objects`` (non-crowd ground truth counted), ``proposals_per_image`` (mean
    stored), ``recall@0.5`` and ``recall@0.7`` with every stored proposal, ``AR@{limit}`` for
    each limit, and ``by_size``: ``{small|medium|large: {objects, AR@{max limit}}}``. Values are
    ``None`` where no object counts.
    """
    limits = sorted(set(int(n) for n in limits))
    per_limit: dict[int, list[np.ndarray]] = {n: [] for n in [*limits, -1]}
    areas_all: list[np.ndarray] = []
    n_props = []
    for i, (props, gt) in enumerate(zip(proposals, gt_boxes)):
        props = np.asarray(props).reshape(-1, 4)
        gt = np.asarray(gt).reshape(-1, 4)
        keep = np.ones(len(gt), dtype=bool)
        if gt_crowd is not None:
            keep &= ~np.asarray(gt_crowd[i], dtype=bool).reshape(-1)
        gt = gt[keep]
        if gt_areas is not None:
            area = np.asarray(gt_areas[i], dtype=np.float64).reshape(-1)[keep]
        else:
            area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).astype(np.float64)
        areas_all.append(area)
        n_props.append(len(props))
        for n in per_limit:
            per_limit[n].append(matched_ious(props if n < 0 else props[:n], gt))
    areas = np.concatenate(areas_all) if areas_all else np.zeros(0)
    ious = {n: np.concatenate(v) if v else np.zeros(0) for n, v in per_limit.items()}

    def recall(x: np.ndarray, t: float) -> float | None:
        return round(float((x >= t).mean()), 4) if len(x) else None

    def average(x: np.ndarray) -> float | None:
        return (
            round(float(np.mean([(x >= t).mean() for t in IOU_THRESHOLDS])), 4) if len(x) else None
        )

    top = limits[-1]
    report = {
        "objects": int(len(areas)),
        "images": len(n_props),
        "proposals_per_image": round(float(np.mean(n_props)), 2) if n_props else None,
        "recall@0.5": recall(ious[-1], 0.5),
        "recall@0.7": recall(ious[-1], 0.7),
        "AR": average(ious[-1]),
    }
    for n in limits:
        report[f"AR@{n}"] = average(ious[n])
    report["by_size"] = {}
    for name, (lo, hi) in AREA_RANGES.items():
        sel = (areas >= lo) & (areas < hi)
        report["by_size"][name] = {"objects": int(sel.sum()), f"AR@{top}": average(ious[top][sel])}
    return report
