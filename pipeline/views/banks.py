"""View sets: which crops of a sample to cut, with which augmentation, and how to assemble them.

A view set is a frozen dataclass of paper defaults, registered by name
(:func:`register_view_set`, built by :func:`view_set`, listed by :func:`list_view_sets`), with
the interface :class:`ViewSet` that the loader reads:

- :meth:`banks`: the DALI side. Every view is rendered as *frames* of one fixed size; frames of
  one size and one augmentation form a *bank*, one DALI sequence ``[F, s, s, 3]`` per sample
  that one chain of operators (resize per frame, then colour, blur, solarize and normalize
  over the whole sequence with per-frame arguments) turns into ``[B, F, 3, s, s]`` float32.
  A few batched chains instead of one chain per view, and a bank's chain holds only the
  operators its augmentation can use (no solarization where its probability is 0).
- :meth:`plan_batch` (numpy, once per batch, from the batch's generator): what every sample of
  the batch shares (the MOS stitching layouts; ``None`` for the other view sets).
- :meth:`plan_sample` (numpy, in the view source, once per sample): the crop windows of every
  frame in the decoded image and every frame's photometric parameters, drawn from the
  sample's own generator (and from its proposal boxes where ``needs_boxes``).
- :meth:`assemble` (torch, on the loader's device): the batch dict the trainer reads.

Windows are ``(y0, x0, y1, x1)`` float32 pixels of the decoded image (``fn.resize``'s
``roi_start``/``roi_end`` order); ``x0 > x1`` is a horizontally flipped crop. Boxes handed to
the trainer are int64 xyxy pixels, exclusive ``x1, y1`` (as in :mod:`pipeline.univip`).

MOS stitched views (``MOSViews``): a stitched image of side ``S`` with the batch's layout
(``r``, ``s_j``, :func:`pipeline.stitching.sample_layout`) holds crops of side ``S / (r s_j)``.
Each sample renders *its own* crops for all cells as a mosaic of ``(S / c)^2`` frames of side
``c = S / lcm(r s)`` (56 px for the default ``r, s in {1, 2}`` at 224); a crop larger than ``c``
is split into ``q x q`` frames of sub-windows sharing the crop's photometric parameters, which
tile back into exactly the resized crop (DALI resamples a sub-window like the whole window).
Frames are rendered with a margin of the blur radius and cropped back after the blur, so that
the blur of a split crop sees across its seams as the blur of the whole crop would. The loader
cuts each sample's mosaic into cells and stitches them cyclically over the batch
(:func:`pipeline.stitching.stitch_multiscale`), on the GPU when there is one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, reduce
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..augment import (
    BYOL_VIEW1,
    BYOL_VIEW2,
    NO_AUGMENT,
    Augment,
    Photometric,
    blur_radius,
    draw_photometric,
)
from ..layout import (
    MOS_GRID_CHOICES,
    MOS_SCALE_CHOICES,
    StitchLayout,
    sample_layout,
    stitch_layout,
)
from ..univip import NUM_INSTANCES, SCENE_RATIO, SCENE_SCALE, TRIES, random_resized_crop_boxes
from ..univip import sample_scene_pair as _sample_scene_pair

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MOS_VIEW1",
    "MOS_VIEW2",
    "VIEW_SETS",
    "Bank",
    "DecodeCropViews",
    "MOSViews",
    "MultiCropViews",
    "SamplePlan",
    "UniVIPViews",
    "ViewSet",
    "crop_windows",
    "frame_windows",
    "list_view_sets",
    "register_view_set",
    "view_set",
]

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio range of every random resized crop (w/h)
# MOS Table 6: the first view of each pair is rarely blurred and never solarized, the second
# always blurred and sometimes solarized (for both the stitched and the single-object views).
MOS_VIEW1 = Augment(blur=0.1, solarize=0.0)
MOS_VIEW2 = Augment(blur=1.0, solarize=0.2)


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


class ViewSet(Protocol):
    """What :class:`~pipeline.loader.ViewLoader` and :class:`~pipeline.source.ViewSource` read
    of a view set (module docstring). ``batch_plan`` is whatever :meth:`plan_batch` returns; the
    view set alone reads it."""

    needs_boxes: bool  # plan_sample reads the sample's proposal boxes (else it gets None)

    def banks(self) -> tuple[Bank, ...]:
        """The banks DALI renders, in the order of the pipeline's outputs."""
        ...

    def plan_batch(self, rng: np.random.Generator) -> Any:
        """What every sample of one batch shares, drawn from the batch's generator."""
        ...

    def plan_sample(
        self,
        width: int,
        height: int,
        boxes: np.ndarray | None,
        rng: np.random.Generator,
        batch_plan: Any,
    ) -> SamplePlan:
        """One sample's windows and photometric parameters per bank, and its extras."""
        ...

    def assemble(
        self, banks: dict[str, Tensor], extras: dict[str, Tensor], index: Tensor
    ) -> dict[str, Any]:
        """The batch dict: ``banks`` ``[B, F, 3, s, s]`` per bank, ``extras`` per name (host
        int32), ``index [B]`` int64 on the loader's device."""
        ...


_REGISTRY: dict[str, type] = {}
VIEW_SETS: Mapping[str, type] = MappingProxyType(_REGISTRY)  # name -> class, read-only
_V = TypeVar("_V", bound=type)


def register_view_set(name: str) -> Callable[[_V], _V]:
    """Class decorator: register a view set as ``name`` (which becomes its ``name``), so that
    :func:`view_set` builds it and :func:`list_view_sets` lists it."""

    def register(cls: _V) -> _V:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"view set {name!r} is already registered ({_REGISTRY[name]})")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return register


def list_view_sets() -> list[str]:
    """The registered view sets' names, sorted."""
    return sorted(_REGISTRY)


def view_set(name: str, **kwargs: Any) -> ViewSet:
    """The view set registered as ``name`` with its defaults (or ``kwargs``)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown view set {name!r}; valid: {list_view_sets()}") from None
    return cls(**kwargs)


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


# --------------------------------------------------------------------------------------- MOS


@register_view_set("mos")
@dataclass(frozen=True)
class MOSViews:
    """MOS (§3.1, Table 6): two single-object views and two stitched multi-object views.

    ``size``: side of every view, single and stitched (224 for ImageNet-like data, 32 for
    CIFAR-like). Single views: random resized crop of area ``single_scale`` (0.1..1), stitched
    crops ``multi_scale`` (0.2..1), aspect ratio 3/4..4/3. Per batch and stitched view the
    layout ``r`` (grid) and ``s_j`` (per cell) are drawn from ``grid_choices`` and
    ``scale_choices`` (``{1, 2}``, :mod:`pipeline.stitching`): objects at ``1/r`` and
    ``1/(r s)`` of the side; ``r`` is one draw for both stitched views (``shared_grid``). ``single_augment`` / ``multi_augment``: the photometric
    augmentation of the first and second view (Table 6).
    """

    size: int = 224
    single_scale: tuple[float, float] = (0.1, 1.0)
    multi_scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = RATIO
    grid_choices: tuple[int, ...] = MOS_GRID_CHOICES
    scale_choices: tuple[int, ...] = MOS_SCALE_CHOICES
    shared_grid: bool = True  # one r per batch for both stitched views (eq. 9, appendix B)
    single_augment: tuple[Augment, Augment] = (MOS_VIEW1, MOS_VIEW2)
    multi_augment: tuple[Augment, Augment] = (MOS_VIEW1, MOS_VIEW2)

    needs_boxes = False

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        set_ = object.__setattr__
        set_(self, "single_scale", _check_range(self.single_scale, "single_scale", 1.0))
        set_(self, "multi_scale", _check_range(self.multi_scale, "multi_scale", 1.0))
        set_(self, "ratio", _check_range(self.ratio, "ratio"))
        for name in ("grid_choices", "scale_choices"):
            v = tuple(getattr(self, name))
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"{name} must be positive ints, got {getattr(self, name)!r}")
            set_(self, name, v)
        if not isinstance(self.shared_grid, bool):
            raise ValueError(f"shared_grid must be true or false, got {self.shared_grid!r}")
        set_(self, "single_augment", _check_augs(self.single_augment, "single_augment", 2))
        set_(self, "multi_augment", _check_augs(self.multi_augment, "multi_augment", 2))
        lcm = self.frame_grid
        if self.size % lcm:
            raise ValueError(
                f"size={self.size} must be divisible by lcm(r*s)={lcm} over grid_choices "
                f"{self.grid_choices} and scale_choices {self.scale_choices}"
            )

    @property
    def frame_grid(self) -> int:
        """Frames per side of a sample's mosaic: ``lcm`` of every ``r * s``."""
        return reduce(math.lcm, (r * s for r in self.grid_choices for s in self.scale_choices))

    @property
    def frame_size(self) -> int:
        """Side ``c`` of a mosaic frame (56 px for 224 and ``r, s in {1, 2}``)."""
        return self.size // self.frame_grid

    def banks(self) -> tuple[Bank, ...]:
        g = self.frame_grid
        a1, a2 = self.single_augment
        m1, m2 = self.multi_augment
        return (
            _bank("single1", self.size, 1, a1),
            _bank("single2", self.size, 1, a2),
            _bank("multi1", self.frame_size, g * g, m1, self._margin(m1)),
            _bank("multi2", self.frame_size, g * g, m2, self._margin(m2)),
        )

    def _margin(self, aug: Augment) -> int:
        """Blur margin of mosaic frames: 0 unless a blurred crop can span several frames."""
        spans = min(self.grid_choices) * min(self.scale_choices) < self.frame_grid
        return blur_radius(aug.sigma[1]) if spans and aug.blur > 0 else 0

    @property
    def max_cells(self) -> int:
        return max(self.grid_choices) ** 2

    def plan_batch(self, rng: np.random.Generator) -> tuple[StitchLayout, StitchLayout]:
        """The two stitched views' layouts of one batch (shared by all its samples).

        One coarse grid ``r`` for both views (``shared_grid``): eq. 9 and appendix B eq. 16
        ("each stitched image has 2r^2 - 1 positives in the other stitched view") count
        overlaps between two images of the same ``r``. The scales ``s_j`` are drawn per view
        and cell. ``shared_grid=False`` draws ``r`` per view.
        """
        py = random.Random(int(rng.integers(2**63)))
        grid = py.choice(list(self.grid_choices)) if self.shared_grid else None
        return tuple(
            sample_layout(self.size, self.grid_choices, self.scale_choices, rng=py, grid=grid)
            for _ in range(2)
        )  # type: ignore[return-value]

    def encode_layout(self, layout: StitchLayout) -> np.ndarray:
        """``[1 + max_cells]`` int32: ``r``, then ``s_j`` per cell, zero padded."""
        out = np.zeros(1 + self.max_cells, dtype=np.int32)
        out[0] = layout.grid
        out[1 : 1 + len(layout.scales)] = layout.scales
        return out

    def decode_layout(self, code: np.ndarray) -> StitchLayout:
        r = int(code[0])
        return stitch_layout(self.size, r, tuple(int(s) for s in code[1 : 1 + r * r]))

    def plan_sample(self, width, height, boxes, rng, batch_plan) -> SamplePlan:
        single = random_resized_crop_boxes(width, height, 2, rng, self.single_scale, self.ratio)
        n1, n2 = (layout.num_crops for layout in batch_plan)
        multi = random_resized_crop_boxes(width, height, n1 + n2, rng, self.multi_scale, self.ratio)
        c, g = self.frame_size, self.frame_grid
        groups = [
            _Group("single1", single[:1], self.single_augment[0]),
            _Group("single2", single[1:], self.single_augment[1]),
        ]
        for v, (layout, aug, part) in enumerate(
            zip(batch_plan, self.multi_augment, (multi[:n1], multi[n1:]))
        ):
            groups.append(
                _Group(
                    f"multi{v + 1}", part, aug, _mosaic_frames(layout, c, g), self._margin(aug), c
                )
            )
        plan, _ = _plan(groups, rng)
        plan.extras["layout"] = np.stack([self.encode_layout(lay) for lay in batch_plan])
        return plan

    def assemble(self, banks: dict, extras: dict, index) -> dict[str, Any]:
        """``single1, single2, multi1, multi2 [B, 3, S, S]``, ``members1, members2 [B, M]``,
        ``index [B]``; ``layout1, layout2``: the :class:`StitchLayout` of each stitched view."""
        from ..stitching import stitch_mosaic  # torch: only where batches are assembled

        codes = extras["layout"]  # [B, 2, 1 + max_cells]
        if not bool((codes == codes[:1]).all()):
            raise RuntimeError("internal error: samples of one batch carry different layouts")
        out: dict[str, Any] = {
            "single1": banks["single1"][:, 0],
            "single2": banks["single2"][:, 0],
        }
        for v in (1, 2):
            layout = self.decode_layout(codes[0, v - 1].numpy())  # host tensor
            # each sample's mosaic holds its own crops where the layout's cells are; the
            # cyclic stitching (eqs. 5-7) gathers them over the batch
            out[f"multi{v}"], out[f"members{v}"] = stitch_mosaic(banks[f"multi{v}"], layout)
            out[f"layout{v}"] = layout
        out["index"] = index
        return out


@lru_cache(maxsize=256)
def _mosaic_frames(layout: StitchLayout, c: int, g: int):
    """Per frame of a ``g x g`` mosaic (row-major): its crop in ``layout``, the crop's split
    ``q`` and the frame's row and column inside the crop."""
    crop = np.empty((g, g), dtype=np.int64)
    q = np.empty((g, g), dtype=np.int64)
    row = np.empty((g, g), dtype=np.int64)
    col = np.empty((g, g), dtype=np.int64)
    for k, (x0, y0, x1, _) in enumerate(layout.crop_boxes):
        n = (x1 - x0) // c
        ys, xs = slice(y0 // c, y0 // c + n), slice(x0 // c, x0 // c + n)
        crop[ys, xs] = k
        q[ys, xs] = n
        row[ys, xs] = np.arange(n)[:, None]
        col[ys, xs] = np.arange(n)[None, :]
    return tuple(a.ravel() for a in (crop, q, row, col))


# ------------------------------------------------------------------------------------ UniVIP


@register_view_set("univip")
@dataclass(frozen=True)
class UniVIPViews:
    """UniVIP (§3.2-3.3, §4, A.2): two scene views whose overlap holds ``k`` proposals, and
    the ``k`` instance crops cut from the original image.

    Scenes: ``size`` (224) px, random resized crops (area ``scale`` 0.08..1, aspect ``ratio``)
    drawn by Algorithm 1 (:func:`pipeline.univip.sample_scene_pair`, ``tries`` = 20), BYOL's
    two augmentations. Instances: ``instance_size`` (96) px; "the subsequent augmentations
    exactly follow the scene-level ones" (§4): ``instance_augment`` defaults to BYOL's first
    view for all ``k`` instances.
    """

    size: int = 224
    instance_size: int = 96
    k: int = NUM_INSTANCES
    tries: int = TRIES
    scale: tuple[float, float] = SCENE_SCALE
    ratio: tuple[float, float] = SCENE_RATIO
    scene_augment: tuple[Augment, Augment] = (BYOL_VIEW1, BYOL_VIEW2)
    instance_augment: Augment = BYOL_VIEW1

    needs_boxes = True

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        _check_size(self.instance_size, "instance_size")
        _check_size(self.k, "k")
        _check_size(self.tries, "tries")
        set_ = object.__setattr__
        set_(self, "scale", _check_range(self.scale, "scale", 1.0))
        set_(self, "ratio", _check_range(self.ratio, "ratio"))
        set_(self, "scene_augment", _check_augs(self.scene_augment, "scene_augment", 2))
        set_(self, "instance_augment", _check_augs(self.instance_augment, "instance_augment", 1)[0])

    def banks(self) -> tuple[Bank, ...]:
        a1, a2 = self.scene_augment
        return (
            _bank("scene1", self.size, 1, a1),
            _bank("scene2", self.size, 1, a2),
            _bank("instance", self.instance_size, self.k, self.instance_augment),
        )

    def plan_batch(self, rng: np.random.Generator) -> None:
        return None

    def plan_sample(self, width, height, boxes, rng, batch_plan) -> SamplePlan:
        s1, s2, inst = _sample_scene_pair(
            width, height, boxes, self.k, self.tries, rng, scale=self.scale, ratio=self.ratio
        )
        a1, a2 = self.scene_augment
        plan, p = _plan(
            [
                _Group("scene1", s1[None], a1),
                _Group("scene2", s2[None], a2),
                _Group("instance", inst, self.instance_augment),
            ],
            rng,
        )
        plan.extras["boxes"] = _boxes_i32(s1, s2, inst)
        plan.extras["flip"] = p.flip.astype(np.int32)
        return plan

    def assemble(self, banks: dict, extras: dict, index) -> dict[str, Any]:
        """``scene1, scene2 [B, 3, S, S]``, ``instances [B, K, 3, s, s]``, ``index [B]``,
        ``scene_boxes [B, 2, 4]`` and ``instance_boxes [B, K, 4]`` int64 xyxy pixels of the
        decoded image, ``flips [B, 2 + K]`` bool (scene1, scene2, instances)."""
        dev = index.device
        boxes = extras["boxes"].long().to(dev, non_blocking=True)
        return {
            "scene1": banks["scene1"][:, 0],
            "scene2": banks["scene2"][:, 0],
            "instances": banks["instance"],
            "index": index,
            "scene_boxes": boxes[:, :2],
            "instance_boxes": boxes[:, 2:],
            "flips": extras["flip"].bool().to(dev, non_blocking=True),
        }


# --------------------------------------------------------------------------------- multicrop


@register_view_set("multicrop")
@dataclass(frozen=True)
class MultiCropViews:
    """``num_global`` global + ``num_local`` local crops (DINO-style multi-crop; BYOL and
    MoCo v3 use two global crops and no local ones, see :meth:`byol`).

    Defaults are DINO's: 2 x 224 px global crops of area 0.4..1 with BYOL's two augmentations
    (cycled when there are more than two), 6 x 96 px local crops of area 0.05..0.4, blurred
    with probability 0.5.
    """

    global_size: int = 224
    local_size: int = 96
    num_global: int = 2
    num_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = RATIO
    global_augment: tuple[Augment, ...] = (BYOL_VIEW1, BYOL_VIEW2)
    local_augment: Augment = Augment(blur=0.5, solarize=0.0)

    needs_boxes = False

    @classmethod
    def byol(cls, size: int = 224) -> MultiCropViews:
        """BYOL / MoCo v3: two crops of area 0.08..1, no local crops."""
        return cls(global_size=size, num_local=0, global_scale=(0.08, 1.0))

    def __post_init__(self) -> None:
        _check_size(self.global_size, "global_size")
        _check_size(self.local_size, "local_size")
        _check_size(self.num_global, "num_global")
        if isinstance(self.num_local, bool) or not isinstance(self.num_local, int):
            raise ValueError(f"num_local must be an int >= 0, got {self.num_local!r}")
        if self.num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {self.num_local}")
        set_ = object.__setattr__
        set_(self, "global_scale", _check_range(self.global_scale, "global_scale", 1.0))
        set_(self, "local_scale", _check_range(self.local_scale, "local_scale", 1.0))
        set_(self, "ratio", _check_range(self.ratio, "ratio"))
        set_(self, "global_augment", _check_augs(self.global_augment, "global_augment"))
        set_(self, "local_augment", _check_augs(self.local_augment, "local_augment", 1)[0])

    def banks(self) -> tuple[Bank, ...]:
        """``global{j}``: the global crops ``i`` with ``i % len(global_augment) == j - 1``."""
        n = len(self.global_augment)
        banks = [
            _bank(f"global{j + 1}", self.global_size, len(range(j, self.num_global, n)), aug)
            for j, aug in enumerate(self.global_augment[: self.num_global])
        ]
        if self.num_local:
            banks.append(_bank("local", self.local_size, self.num_local, self.local_augment))
        return tuple(banks)

    def plan_batch(self, rng: np.random.Generator) -> None:
        return None

    def plan_sample(self, width, height, boxes, rng, batch_plan) -> SamplePlan:
        n = len(self.global_augment)
        gb = random_resized_crop_boxes(
            width, height, self.num_global, rng, self.global_scale, self.ratio
        )
        groups = [
            _Group(f"global{j + 1}", gb[j::n], aug)
            for j, aug in enumerate(self.global_augment[: self.num_global])
        ]
        all_boxes = [gb]
        if self.num_local:
            lb = random_resized_crop_boxes(
                width, height, self.num_local, rng, self.local_scale, self.ratio
            )
            groups.append(_Group("local", lb, self.local_augment))
            all_boxes.append(lb)
        plan, _ = _plan(groups, rng)
        plan.extras["boxes"] = _boxes_i32(*all_boxes)
        return plan

    def assemble(self, banks: dict, extras: dict, index) -> dict[str, Any]:
        """``crops``: ``num_global`` tensors ``[B, 3, G, G]`` then ``num_local`` ``[B, 3, L, L]``;
        ``index [B]``; ``boxes [B, G + L, 4]`` int64 xyxy crop boxes in the decoded image, in
        the order of ``crops``."""
        n = len(self.global_augment)
        crops = [banks[f"global{i % n + 1}"][:, i // n] for i in range(self.num_global)]
        if self.num_local:
            crops += list(banks["local"].unbind(1))
        boxes = extras["boxes"].long().to(index.device, non_blocking=True)
        return {"crops": crops, "index": index, "boxes": boxes}


# ------------------------------------------------------------------------------ decode only


@register_view_set("decode")
@dataclass(frozen=True)
class DecodeCropViews:
    """One random resized crop, resize and normalize, no photometric augmentation: the
    decode + crop ceiling of ``ssl-cli bench pipeline``."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = RATIO

    needs_boxes = False

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        object.__setattr__(self, "scale", _check_range(self.scale, "scale", 1.0))
        object.__setattr__(self, "ratio", _check_range(self.ratio, "ratio"))

    def banks(self) -> tuple[Bank, ...]:
        return (_bank("crop", self.size, 1, NO_AUGMENT),)

    def plan_batch(self, rng: np.random.Generator) -> None:
        return None

    def plan_sample(self, width, height, boxes, rng, batch_plan) -> SamplePlan:
        box = random_resized_crop_boxes(width, height, 1, rng, self.scale, self.ratio)
        return _plan([_Group("crop", box, NO_AUGMENT)], rng)[0]

    def assemble(self, banks: dict, extras: dict, index) -> dict[str, Any]:
        return {"crop": banks["crop"][:, 0], "index": index}
