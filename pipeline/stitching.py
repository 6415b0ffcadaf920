"""Multiple Object Stitching (MOS), the batch tensor operation.

Paper: Shen, Liu, Wang, "Multiple Object Stitching for Unsupervised Representation Learning"
(``papers/mos-multiple-object-stitching.txt``), §3.1 and Appendix B.

Notation (paper → code):

- ``B``: batch size; sample ``x_i``, ``i = 0..B-1``.
- ``r``: the coarse grid. Every sample is augmented into ``r*r`` small views of side ``H/r``
  (eq. 1); one stitched image holds ``r*r`` objects (eq. 5).
- ``s``: the extra scale factor of one view (eqs. 1-4): a view with scale ``s`` is itself
  ``s*s`` crops of the *same* sample, each of side ``H/(r*s)``, tiled into one ``H/r`` view
  (eq. 2). ``s = 1`` is a plain view (eq. 3).

Stitching is cyclic (eq. 5, Appendix B): cell ``j`` (row-major) of stitched image ``i`` holds
view ``j`` of sample ``(i + j) mod B``. In the flattened form used for the tensor
implementation (eq. 6), view ``j`` of sample ``b`` has index ``t = b*N + j`` with ``N = r*r``,
and the stitched sequence gathers index (eqs. 7, 15)::

    pi(t) = (t + j*N) mod (B*N),    j = t mod N

so every view of every sample is used exactly once per stitched batch, and with ``B >= N``
the ``N`` objects of one stitched image come from ``N`` distinct samples.

Nothing here draws random numbers or touches pixels' values: the crops come from the DALI
pipeline, the randomness of ``r`` and ``s`` from :func:`sample_layout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .layout import (
    StitchLayout,
    _check_positive_int,
)

__all__ = ["stitch", "stitch_indices", "stitch_mosaic", "stitch_multiscale", "tile"]


def _check_crops(crops: object, name: str = "crops") -> torch.Tensor:
    if not isinstance(crops, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(crops).__name__}")
    if crops.dim() != 5:
        raise ValueError(
            f"{name} must have shape [B, N, C, h, w] (5 dims), got {tuple(crops.shape)}"
        )
    if crops.shape[0] < 1:
        raise ValueError(f"{name} has an empty batch: {tuple(crops.shape)}")
    return crops


def _grid_to_image(crops: torch.Tensor, grid: int) -> torch.Tensor:
    """Place ``grid*grid`` crops row-major on a grid: ``[B, g*g, C, h, w] -> [B, C, g*h, g*w]``."""
    b, _, c, h, w = crops.shape
    # [B, gy, gx, C, h, w] -> [B, C, gy, h, gx, w]
    x = crops.reshape(b, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid * h, grid * w)


def stitch_indices(batch: int, grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source indices of the cyclic stitching, eqs. 6-7.

    Returns ``src [B, N]`` int64 (``N = grid*grid``): cell ``j`` of stitched image ``i`` takes
    flat view ``src[i, j] = ((i + j) mod B) * N + j`` of the ``[B*N]`` flattened views, i.e.
    ``pi(t) = (t + j*N) mod (B*N)``. ``src // N`` are the members, ``src % N == j``.
    """
    batch = _check_positive_int(batch, "batch")
    grid = _check_positive_int(grid, "grid")
    n = grid * grid
    t = torch.arange(batch * n, device=device, dtype=torch.int64).reshape(batch, n)  # eq. 6
    j = torch.arange(n, device=device, dtype=torch.int64)
    return (t + j * n) % (batch * n)  # eq. 7


def stitch(crops: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stitch the small views of a batch into multi-object images (eqs. 5-7, Appendix B).

    Args:
        crops: ``[B, N, C, h, w]``, ``N = grid*grid`` views of each sample (view ``j`` of
            sample ``b`` is ``crops[b, j]``), any device and dtype.
        grid: ``r``, the side of the stitching grid.

    Returns:
        ``images [B, C, grid*h, grid*w]``: cell ``j`` (row-major; row ``j // grid``, column
        ``j % grid``) of image ``i`` is ``crops[(i + j) % B, j]``.
        ``members [B, grid*grid]`` int64: ``members[i, j] = (i + j) % B``, the batch index of
        the sample whose view fills cell ``j`` of image ``i``.

    Every view is used exactly once, so every sample appears in ``N`` stitched images (once
    each). With ``B >= N`` the members of one image are distinct samples. With ``B < N`` the
    cyclic indexing wraps around within one image: sample ``b`` then fills several cells of
    the same image (with different views), i.e. ``members`` has repeats in a row; this is
    allowed (tiny debug batches) and losses that count shared objects must count multiplicity.

    A gather plus reshape/permute: no loop over the batch, autograd flows to ``crops``.
    """
    crops = _check_crops(crops)
    grid = _check_positive_int(grid, "grid")
    b, n, c, h, w = crops.shape
    if n != grid * grid:
        raise ValueError(
            f"crops has N={n} views per sample but grid={grid} needs grid*grid={grid * grid}"
        )
    src = stitch_indices(b, grid, device=crops.device)  # [B, N]
    flat = crops.reshape(b * n, c, h, w)  # eq. 6
    # advanced indexing, not index_select: torch's multithreaded CPU index_select is ~60x
    # slower on these shapes (measured on torch 2.14, 2 threads); same result and gradient
    gathered = flat[src.reshape(-1)].reshape(b, n, c, h, w)  # eq. 7
    return _grid_to_image(gathered, grid), src // n


def tile(crops: torch.Tensor, scale: int) -> torch.Tensor:
    """Tile ``s*s`` crops of the *same* sample into one view (eq. 2), no mixing across samples.

    ``crops [B, s*s, C, h, w] -> view [B, C, s*h, s*w]``, crop ``k`` at row ``k // s``,
    column ``k % s``.
    """
    crops = _check_crops(crops)
    scale = _check_positive_int(scale, "scale")
    if crops.shape[1] != scale * scale:
        raise ValueError(
            f"crops has {crops.shape[1]} crops per sample but scale={scale} needs {scale * scale}"
        )
    return _grid_to_image(crops, scale)


def stitch_multiscale(
    cells: Sequence[torch.Tensor], grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale stitching: a coarse ``grid x grid`` mosaic whose cells may be subdivided.

    Eqs. 1-4 then 5-7: coarse cell ``j`` holds ``s_j*s_j`` crops of one sample tiled into a
    view (:func:`tile`), and the views are stitched cyclically (:func:`stitch`).

    Args:
        cells: ``grid*grid`` tensors, row-major; ``cells[j]`` is ``[B, s_j*s_j, C, h_j, w_j]``
            with ``s_j*h_j`` and ``s_j*w_j`` the same for every ``j`` (the coarse cell side).
            ``s_j`` is read from the shape. :func:`stitch_layout` gives ``s_j`` and ``h_j``.
        grid: ``r``.

    Returns:
        ``images [B, C, grid*s_j*h_j, grid*s_j*w_j]`` and ``members [B, M]`` int64 with
        ``M = sum_j s_j*s_j``, one entry per object crop, ordered by coarse cell (row-major)
        and, inside a subdivided cell, by sub-cell (row-major), the same order as
        :attr:`StitchLayout.crop_boxes`. All crops of coarse cell ``j`` of image ``i`` come
        from sample ``(i + j) % B``, so ``members[:, layout.first_crop_of_cell]`` is the
        ``[B, grid*grid]`` per-object membership that :func:`stitch` returns.
    """
    grid = _check_positive_int(grid, "grid")
    cells = list(cells)
    if len(cells) != grid * grid:
        raise ValueError(f"grid={grid} needs {grid * grid} cells, got {len(cells)}")
    views, counts = [], []
    for j, cell in enumerate(cells):
        cell = _check_crops(cell, f"cells[{j}]")
        s = math.isqrt(cell.shape[1])
        if s * s != cell.shape[1]:
            raise ValueError(
                f"cells[{j}] has {cell.shape[1]} crops per sample, not a square number s*s"
            )
        views.append(tile(cell, s))
        counts.append(s * s)
    first = views[0]
    for j, v in enumerate(views):
        if v.shape != first.shape:
            raise ValueError(
                f"cells[{j}] tiles to {tuple(v.shape)} but cells[0] tiles to "
                f"{tuple(first.shape)}: every coarse cell needs the same batch, channels and "
                "side s_j*h_j"
            )
        if v.dtype != first.dtype or v.device != first.device:
            raise ValueError(f"cells[{j}] dtype/device differ from cells[0]")
    images, cell_members = stitch(torch.stack(views, dim=1), grid)  # [B, N, C, H/r, W/r]
    repeats = torch.tensor(counts, device=cell_members.device)
    return images, cell_members.repeat_interleave(repeats, dim=1)


def stitch_mosaic(frames: torch.Tensor, layout: StitchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stitch_multiscale` for crops that arrive as per-sample mosaics, in one gather.

    Args:
        frames: ``[B, G*G, C, c, c]``: frame ``f`` (row-major on a ``G x G`` grid, ``G * c =
            layout.size``) of sample ``b`` is the part of *that sample's* crops that cell
            geometry puts at grid position ``f`` (a crop of side ``q * c`` spans ``q x q``
            frames; every crop box of ``layout`` must lie on the frame grid).
        layout: the stitched image's layout.

    Returns the same ``(images [B, C, S, S], members [B, M])`` as :func:`stitch_multiscale`
    given the crops cut out of the mosaics. Since cell ``j`` of a sample's mosaic sits where
    cell ``j`` of a stitched image sits, frame ``f`` of stitched image ``i`` is frame ``f`` of
    sample ``(i + j_f) mod B`` (eqs. 5-7, ``j_f`` the cell of frame ``f``): one gather and
    one reshape instead of cutting, tiling and stacking cells.
    """
    frames = _check_crops(frames, "frames")
    b, f, _, c, w = frames.shape
    g = math.isqrt(f)
    if g * g != f or c != w or g * c != layout.size:
        raise ValueError(
            f"frames {tuple(frames.shape)} are not a square grid of square frames covering "
            f"a {layout.size}-px layout"
        )
    if layout.cell_size % c or any(side % c for side in layout.crop_sizes):
        raise ValueError(f"layout crops {layout.crop_sizes} do not lie on a {c}-px frame grid")
    pos = torch.arange(f, device=frames.device)
    fy, fx = pos // g, pos % g
    cell = (fy * c // layout.cell_size) * layout.grid + fx * c // layout.cell_size  # [F]
    rows = torch.arange(b, device=frames.device)
    src = (rows[:, None] + cell[None, :]) % b  # [B, F], eq. 7 per frame
    images = _grid_to_image(frames[src, pos[None, :]], g)
    cell_of_crop = torch.tensor(layout.cell_of_crop, device=frames.device)
    return images, (rows[:, None] + cell_of_crop[None, :]) % b
