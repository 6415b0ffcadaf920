"""The MOS view set: two single-object views and two stitched multi-object views.

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
from dataclasses import dataclass
from functools import lru_cache, reduce
from typing import Any

import numpy as np

from ..augment import Augment, blur_radius
from ..layout import (
    MOS_GRID_CHOICES,
    MOS_SCALE_CHOICES,
    StitchLayout,
    sample_layout,
    stitch_layout,
)
from ..scene_pairs import random_resized_crop_boxes
from .banks import (
    RATIO,
    Bank,
    SamplePlan,
    _bank,
    _check_augs,
    _check_range,
    _check_size,
    _Group,
    _plan,
)
from .registry import register_view_set

__all__ = ["MOS_VIEW1", "MOS_VIEW2", "MOSViews"]

# MOS Table 6: the first view of each pair is rarely blurred and never solarized, the second
# always blurred and sometimes solarized (for both the stitched and the single-object views).
MOS_VIEW1 = Augment(blur=0.1, solarize=0.0)
MOS_VIEW2 = Augment(blur=1.0, solarize=0.2)


@register_view_set("mos")
@dataclass(frozen=True)
class MOSViews:
    """MOS (§3.1, Table 6): two single-object views and two stitched multi-object views.

    ``size``: side of every view, single and stitched (224 for ImageNet-like data, 32 for
    CIFAR-like). Single views: random resized crop of area ``single_scale`` (0.1..1), stitched
    crops ``multi_scale`` (0.2..1), aspect ratio 3/4..4/3. Per batch and stitched view the
    layout ``r`` (grid) and ``s_j`` (per cell) are drawn from ``grid_choices`` and
    ``scale_choices`` (``{1, 2}``, :mod:`pipeline.stitching`): objects at ``1/r`` and
    ``1/(r s)`` of the side; ``r`` is one draw for both stitched views (``shared_grid``).
    ``single_augment`` / ``multi_augment``: the photometric augmentation of the first and
    second view (Table 6).
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
