"""What every view set shares: banks of frames, per-sample plans and their windows.

Windows are ``(y0, x0, y1, x1)`` float32 pixels of the decoded image (``fn.resize``'s
``roi_start``/``roi_end`` order); ``x0 > x1`` is a horizontally flipped crop. Boxes handed to
the trainer are int64 xyxy pixels, exclusive ``x1, y1`` (as in :mod:`pipeline.scene_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..augment import Augment, Photometric, draw_photometric

__all__ = ["RATIO", "Bank", "SamplePlan", "crop_windows", "frame_windows"]

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio range of every random resized crop (w/h)


@dataclass(frozen=True)
class Bank:
    """``frames`` views of side ``size`` that DALI renders as one sequence per sample.

    ``margin``: extra pixels rendered on every side and cropped away after the blur.
    ``photometric``: colour jitter/grayscale (and blur/solarize where ``blur``/``solarize``)
    are in the graph; without it only crop, resize and normalize.
    """

    name: str
    size: int
    frames: int
    margin: int = 0
    photometric: bool = True
    blur: bool = False
    solarize: bool = False

    @property
    def render_size(self) -> int:
        return self.size + 2 * self.margin

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-sample inputs of this bank's chain, in the view source's output order."""
        out = ["windows"]
        if self.photometric:
            out.append("colour")
        if self.blur:
            out += ["sigma", "window"]
        if self.solarize:
            out.append("solarize")
        return tuple(out)


@dataclass
class SamplePlan:
    """What the view source sends to DALI for one sample (besides its JPEG bytes)."""

    windows: dict[str, np.ndarray]  # bank -> [F, 4] float32 (y0, x0, y1, x1)
    photometric: dict[str, Photometric]  # bank -> per-frame parameters
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int32 array


def _check_size(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_range(v: object, name: str, upper: float | None = None) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in v)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {v!r}") from None
    if not 0 < lo <= hi or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < min <= max{bound}, got {v!r}")
    return lo, hi


def _check_augs(v: object, name: str, n: int | None = None) -> tuple[Augment, ...]:
    """One or several augmentations; dicts (from a config file) become :class:`Augment`."""
    items = (v,) if isinstance(v, (Augment, dict)) else tuple(v)  # type: ignore[arg-type]
    augs = tuple(Augment.from_dict(a) if isinstance(a, dict) else a for a in items)
    if not augs or not all(isinstance(a, Augment) for a in augs):
        raise TypeError(f"{name} must be Augment instances (or dicts of their fields), got {v!r}")
    if n is not None and len(augs) != n:
        raise ValueError(f"{name} needs {n} Augment values, got {len(augs)}")
    return augs


def frame_windows(
    boxes: np.ndarray,
    flip: np.ndarray,
    split: np.ndarray | int = 1,
    row: np.ndarray | int = 0,
    col: np.ndarray | int = 0,
    margin: float = 0.0,
    size: int = 1,
) -> np.ndarray:
    """Windows of frames cut from crops: per frame its crop's box ``[n, 4]`` xyxy and
    ``flip [n]``, the crop's split ``q`` and the frame's ``(row, col)`` in the crop's
    ``q x q`` grid *as the output shows it* (a flipped crop shows its source columns right to
    left). Each window is widened by ``margin`` output pixels of a frame of side ``size``.
    Returns ``[n, 4]`` float32 ``(y0, x0, y1, x1)``, ``x0 > x1`` when flipped.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    flip = np.asarray(flip, dtype=bool).reshape(-1)
    q, row, col = (
        np.broadcast_to(np.asarray(v, dtype=np.float64), flip.shape) for v in (split, row, col)
    )
    x0, y0, x1, y1 = boxes.T
    sw, sh = (x1 - x0) / q, (y1 - y0) / q  # sub-window size, source pixels
    ex, ey = margin * sw / size, margin * sh / size
    src_col = np.where(flip, q - 1 - col, col)
    xs0, xs1 = x0 + sw * src_col - ex, x0 + sw * (src_col + 1) + ex
    out = np.stack(
        [
            y0 + sh * row - ey,
            np.where(flip, xs1, xs0),
            y0 + sh * (row + 1) + ey,
            np.where(flip, xs0, xs1),
        ],
        axis=1,
    )
    return out.astype(np.float32)


def crop_windows(boxes: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Whole-crop windows: ``boxes [n, 4]`` xyxy, ``flip [n]`` -> ``[n, 4]`` (y0, x0, y1, x1)."""
    return frame_windows(boxes, flip)


def _bank(name: str, size: int, frames: int, aug: Augment, margin: int = 0) -> Bank:
    """A bank of frames that share one augmentation: its operators are in the graph only
    when that augmentation can use them."""
    return Bank(
        name=name,
        size=size,
        frames=frames,
        margin=margin,
        photometric=aug.jitter > 0 or aug.grayscale > 0 or aug.blur > 0 or aug.solarize > 0,
        blur=aug.blur > 0,
        solarize=aug.solarize > 0,
    )


@dataclass
class _Group:
    """The crops of one bank: ``boxes [n, 4]`` xyxy in the decoded image, all augmented by
    ``aug``; ``frames`` (crop, q, row, col per frame, see :func:`frame_windows`) when crops are
    split into frames, else one frame per crop."""

    bank: str
    boxes: np.ndarray
    aug: Augment
    frames: tuple[np.ndarray, ...] | None = None
    margin: int = 0
    size: int = 1


def _plan(groups: list[_Group], rng: np.random.Generator) -> tuple[SamplePlan, Photometric]:
    """Draw every crop's photometric parameters at once and compute every frame's window.

    Returns the plan (windows and per-frame parameters per bank) and the per-crop parameters
    (crops in group order)."""
    counts = [len(g.boxes) for g in groups]
    offsets = np.cumsum([0] + counts)
    augs = tuple(g.aug for g, n in zip(groups, counts) for _ in range(n))
    p = draw_photometric(augs, None, rng)
    boxes = np.concatenate([np.asarray(g.boxes, dtype=np.float64) for g in groups])
    crop, q, row, col, margin, size, frame_counts = [], [], [], [], [], [], []
    for i, g in enumerate(groups):
        if g.frames is None:
            c = np.arange(counts[i])
            f = (c, np.ones_like(c), np.zeros_like(c), np.zeros_like(c))
        else:
            f = g.frames
        crop.append(f[0] + offsets[i])
        q.append(f[1])
        row.append(f[2])
        col.append(f[3])
        margin.append(np.full(len(f[0]), g.margin))
        size.append(np.full(len(f[0]), g.size))
        frame_counts.append(len(f[0]))
    crop_all = np.concatenate(crop)
    win = frame_windows(
        boxes[crop_all],
        p.flip[crop_all],
        np.concatenate(q),
        np.concatenate(row),
        np.concatenate(col),
        np.concatenate(margin),
        np.concatenate(size),
    )
    windows, phot = {}, {}
    start = 0
    for g, n, c in zip(groups, frame_counts, crop):
        windows[g.bank] = win[start : start + n]
        phot[g.bank] = p.take(c)  # the frames of a split crop share its parameters
        start += n
    return SamplePlan(windows, phot), p


def _boxes_i32(*boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(b).reshape(-1, 4) for b in boxes]).astype(np.int32)
