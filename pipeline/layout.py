"""Geometry of MOS stitched images (no torch: the view planners in worker processes use it).

The tensor operations that use these layouts are in :mod:`pipeline.stitching`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MOS_GRID_CHOICES",
    "MOS_SCALE_CHOICES",
    "StitchLayout",
    "sample_layout",
    "stitch_layout",
]

# Sampling sets for r and s. Appendix D: "for multiple object stitching, both r and s are
# randomly sampled from" one set, whose symbols our copy of the paper lost (and the reference
# repository visresearch/MultipleObjectStitching could not be read from here). {1, 2} is our
# reading of Table 5 and §4.3.2 (r = s = 1 is the no-stitching baseline; sampling r, then also
# s, from a small range helps; a larger range gives no further gain) and of Table 6 (the
# stitched branch uses four 112-px views per 224-px image, i.e. r = 2). Callers pass their own
# choices to sample_layout where the reference says otherwise.
MOS_GRID_CHOICES: tuple[int, ...] = (1, 2)
MOS_SCALE_CHOICES: tuple[int, ...] = (1, 2)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class StitchLayout:
    """Geometry of one multi-scale stitched image of side ``size``.

    ``scales[j]`` is ``s_j`` of coarse cell ``j`` (row-major). Crops are numbered in the order
    of :func:`stitch_multiscale`'s ``members``: coarse cell, then sub-cell, both row-major.
    """

    size: int
    grid: int
    scales: tuple[int, ...]

    @property
    def cell_size(self) -> int:
        """Side of a coarse cell, ``size / r``."""
        return self.size // self.grid

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        """Side of the crops of each coarse cell, ``size / (r * s_j)``."""
        return tuple(self.cell_size // s for s in self.scales)

    @property
    def crops_per_cell(self) -> tuple[int, ...]:
        """``s_j * s_j``: how many crops (of one sample) coarse cell ``j`` needs."""
        return tuple(s * s for s in self.scales)

    @property
    def num_crops(self) -> int:
        """``M``, the number of object crops in one stitched image."""
        return sum(self.crops_per_cell)

    @property
    def first_crop_of_cell(self) -> tuple[int, ...]:
        """Index of the first crop of every coarse cell in the crop order."""
        starts, acc = [], 0
        for n in self.crops_per_cell:
            starts.append(acc)
            acc += n
        return tuple(starts)

    @property
    def cell_of_crop(self) -> tuple[int, ...]:
        """Coarse cell of every crop, length ``M``."""
        return tuple(j for j, n in enumerate(self.crops_per_cell) for _ in range(n))

    @property
    def crop_boxes(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(x0, y0, x1, y1)`` pixels of every crop inside the stitched image, length ``M``."""
        boxes = []
        for j, s in enumerate(self.scales):
            cy, cx = divmod(j, self.grid)
            side = self.cell_size // s
            for k in range(s * s):
                sy, sx = divmod(k, s)
                x0 = cx * self.cell_size + sx * side
                y0 = cy * self.cell_size + sy * side
                boxes.append((x0, y0, x0 + side, y0 + side))
        return tuple(boxes)


def stitch_layout(size: int, grid: int, scales: int | Sequence[int] = 1) -> StitchLayout:
    """Layout of a stitched image: which crops, of what side, go where.

    Args:
        size: side ``H = W`` of the stitched image (e.g. 224).
        grid: ``r``; coarse cells have side ``size / r``.
        scales: ``s`` for every coarse cell (an int) or one ``s_j`` per cell (row-major,
            length ``r*r``); cell ``j`` then holds ``s_j*s_j`` crops of side ``size/(r*s_j)``.

    ``size`` must be divisible by ``r * s_j`` so that the crops tile the image exactly.
    E.g. ``stitch_layout(224, 2, (1, 2, 1, 1))``: three 112-px crops and four 56-px crops,
    ``num_crops == 7``.
    """
    size = _check_positive_int(size, "size")
    grid = _check_positive_int(grid, "grid")
    if isinstance(scales, int) and not isinstance(scales, bool):
        scales = (scales,) * (grid * grid)
    scales = tuple(scales)
    if len(scales) != grid * grid:
        raise ValueError(f"grid={grid} needs {grid * grid} scales, got {len(scales)}")
    for s in scales:
        _check_positive_int(s, "scale")
        if size % (grid * s):
            raise ValueError(
                f"size={size} is not divisible by r*s={grid}*{s}: crops would not tile the image"
            )
    return StitchLayout(size=size, grid=grid, scales=scales)


def sample_layout(
    size: int,
    grid_choices: Sequence[int] = MOS_GRID_CHOICES,
    scale_choices: Sequence[int] = MOS_SCALE_CHOICES,
    rng: random.Random | None = None,
    grid: int | None = None,
) -> StitchLayout:
    """Draw ``r`` (once per stitched batch) and ``s_j`` (per coarse cell) uniformly, eq. 4.

    ``s_j`` is shared by the whole batch so that every cell has one crop size and the batch
    stays one tensor per cell. Defaults: ``r, s`` from ``{1, 2}`` (Appendix D, Table 5).
    ``grid``: use this ``r`` instead of drawing one (both stitched views of a MOS batch share
    ``r``, :meth:`pipeline.views.MOSViews.plan_batch`); only ``s_j`` is drawn then.
    """
    rng = rng if rng is not None else random.Random()
    if not grid_choices or not scale_choices:
        raise ValueError("grid_choices and scale_choices must not be empty")
    if grid is None:
        grid = rng.choice(list(grid_choices))
    scales = tuple(rng.choice(list(scale_choices)) for _ in range(grid * grid))
    return stitch_layout(size, grid, scales)
