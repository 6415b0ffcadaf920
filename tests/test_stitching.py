"""Multiple Object Stitching as a batch tensor operation (pipeline/stitching.py)."""

import random

import pytest
import torch

from pipeline.layout import MOS_GRID_CHOICES, MOS_SCALE_CHOICES, sample_layout, stitch_layout
from pipeline.stitching import stitch, stitch_indices, stitch_multiscale, tile


def labelled_crops(b: int, n: int, c: int = 3, h: int = 4, w: int = 5, dtype=torch.float32):
    """``[B, N, C, h, w]`` where crop ``j`` of sample ``b`` is filled with ``1000*b + j``."""
    value = 1000 * torch.arange(b)[:, None] + torch.arange(n)[None, :]
    return value[:, :, None, None, None].expand(b, n, c, h, w).to(dtype).clone()


def read_cells(images: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """Per cell (row-major) the constant it holds: ``[B, C, g*h, g*w] -> [B, g*g]``.

    Checks that each cell really is constant over its pixels and channels.
    """
    b, c = images.shape[:2]
    cells = images.reshape(b, c, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, grid * grid, c * h * w)
    assert torch.equal(cells.amin(-1), cells.amax(-1)), "a cell mixes several crops"
    return cells[..., 0]


@pytest.mark.parametrize("b,grid", [(4, 2), (5, 2), (9, 3), (16, 2), (7, 1), (10, 3)])
def test_cells_hold_their_members(b, grid):
    n = grid * grid
    crops = labelled_crops(b, n)
    images, members = stitch(crops, grid)
    assert images.shape == (b, 3, grid * 4, grid * 5)
    assert members.shape == (b, n) and members.dtype == torch.int64
    got = read_cells(images, grid, 4, 5).round().long()
    sample, view = got // 1000, got % 1000
    assert torch.equal(sample, members)
    # cell j of every image holds view j (eq. 5): views keep their position
    assert torch.equal(view, torch.arange(n).expand(b, n))
    # the cyclic assignment of Appendix B
    expected = (torch.arange(b)[:, None] + torch.arange(n)[None, :]) % b
    assert torch.equal(members, expected)


@pytest.mark.parametrize("b,grid", [(4, 2), (6, 2), (9, 3), (33, 2), (20, 4)])
def test_distinct_members_and_every_crop_used_once(b, grid):
    n = grid * grid
    images, members = stitch(labelled_crops(b, n), grid)
    for row in members.tolist():
        assert len(set(row)) == n, "a stitched image repeats a sample although B >= grid^2"
    got = read_cells(images, grid, 4, 5).round().long()
    # every (sample, view) pair appears exactly once over the batch
    assert sorted(got.flatten().tolist()) == sorted(
        labelled_crops(b, n)[:, :, 0, 0, 0].long().flatten().tolist()
    )
    counts = torch.bincount(members.flatten(), minlength=b)
    assert torch.equal(counts, torch.full((b,), n))


def test_small_batch_wraps_with_repeats():
    # B < grid^2: documented behaviour, the cyclic index wraps inside one image
    b, grid = 3, 2
    images, members = stitch(labelled_crops(b, 4), grid)
    assert members.tolist() == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]
    got = read_cells(images, grid, 4, 5).round().long()
    assert torch.equal(got // 1000, members)
    # still every crop exactly once
    assert sorted(got.flatten().tolist()) == sorted(
        (1000 * torch.arange(b)[:, None] + torch.arange(4)).flatten().tolist()
    )
    # B = 1: one image of four views of the same sample
    images, members = stitch(labelled_crops(1, 4), 2)
    assert members.tolist() == [[0, 0, 0, 0]]
    assert read_cells(images, 2, 4, 5).round().long().tolist() == [[0, 1, 2, 3]]


def test_flat_index_formula():
    # eq. 7: pi(t) = (t + j*N) mod (B*N), j = t mod N
    b, grid = 5, 2
    n = grid * grid
    src = stitch_indices(b, grid)
    t = torch.arange(b * n)
    assert torch.equal(src.flatten(), (t + (t % n) * n) % (b * n))


def test_gradient_flows_to_every_crop():
    b, grid = 6, 2
    crops = torch.randn(b, 4, 2, 3, 3, requires_grad=True)
    images, members = stitch(crops, grid)
    weight = torch.randn_like(images)
    (images * weight).sum().backward()
    # the gradient of crop (s, j) is the weight of the cell it landed in
    expected = torch.zeros_like(crops)
    for i in range(b):
        for j in range(4):
            r, c = divmod(j, grid)
            expected[members[i, j], j] = weight[i, :, r * 3 : (r + 1) * 3, c * 3 : (c + 1) * 3]
    assert torch.allclose(crops.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8, torch.float64])
def test_dtypes_preserved(dtype):
    crops = labelled_crops(4, 4, dtype=torch.float32) % 251
    images, _ = stitch(crops.to(dtype), 2)
    assert images.dtype == dtype
    ref, _ = stitch(crops, 2)
    assert torch.equal(images.to(torch.float32), ref.to(dtype).to(torch.float32))


def test_non_contiguous_input():
    crops = labelled_crops(4, 4).transpose(3, 4)  # [B, N, C, w, h], a view
    images, members = stitch(crops, 2)
    ref, _ = stitch(crops.contiguous(), 2)
    assert torch.equal(images, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    crops = torch.randn(8, 4, 3, 8, 8)
    images, members = stitch(crops.cuda(), 2)
    ref, ref_members = stitch(crops, 2)
    assert images.is_cuda and members.is_cuda
    assert torch.equal(images.cpu(), ref) and torch.equal(members.cpu(), ref_members)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="5 dims"):
        stitch(torch.zeros(4, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="grid\\*grid=4"):
        stitch(torch.zeros(4, 3, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="positive int"):
        stitch(torch.zeros(4, 4, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="positive int"):
        stitch(torch.zeros(4, 4, 3, 8, 8), 2.0)
    with pytest.raises(ValueError, match="empty batch"):
        stitch(torch.zeros(0, 4, 3, 8, 8), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        stitch([[1]], 1)


def test_tile_keeps_one_sample():
    crops = labelled_crops(3, 4, h=2, w=2)
    view = tile(crops, 2)
    assert view.shape == (3, 3, 4, 4)
    assert view[1, 0].tolist() == [
        [1000, 1000, 1001, 1001],
        [1000, 1000, 1001, 1001],
        [1002, 1002, 1003, 1003],
        [1002, 1002, 1003, 1003],
    ]
    with pytest.raises(ValueError, match="scale=3 needs 9"):
        tile(crops, 3)


def test_layout():
    lay = stitch_layout(224, 2, (1, 2, 1, 1))
    assert lay.cell_size == 112
    assert lay.crop_sizes == (112, 56, 112, 112)
    assert lay.crops_per_cell == (1, 4, 1, 1)
    assert lay.num_crops == 7
    assert lay.first_crop_of_cell == (0, 1, 5, 6)
    assert lay.cell_of_crop == (0, 1, 1, 1, 1, 2, 3)
    assert lay.crop_boxes == (
        (0, 0, 112, 112),
        (112, 0, 168, 56),
        (168, 0, 224, 56),
        (112, 56, 168, 112),
        (168, 56, 224, 112),
        (0, 112, 112, 224),
        (112, 112, 224, 224),
    )
    assert stitch_layout(224, 2).num_crops == 4
    assert stitch_layout(224, 2, 2).num_crops == 16
    assert stitch_layout(224, 1, 2).crop_sizes == (112,)
    with pytest.raises(ValueError, match="not divisible"):
        stitch_layout(224, 3)
    with pytest.raises(ValueError, match="needs 4 scales"):
        stitch_layout(224, 2, (1, 2))
    with pytest.raises(ValueError, match="positive int"):
        stitch_layout(224, 2, (1, 0, 1, 1))


def test_sample_layout_defaults_and_determinism():
    seen_grids, seen_scales = set(), set()
    for seed in range(50):
        a = sample_layout(224, rng=random.Random(seed))
        b = sample_layout(224, rng=random.Random(seed))
        assert a == b
        assert a.grid in MOS_GRID_CHOICES
        assert set(a.scales) <= set(MOS_SCALE_CHOICES)
        seen_grids.add(a.grid)
        seen_scales |= set(a.scales)
    assert seen_grids == {1, 2} and seen_scales == {1, 2}


@pytest.mark.parametrize("b", [4, 5, 3])
def test_multiscale_members(b):
    lay = stitch_layout(16, 2, (1, 2, 1, 2))
    cells = [
        labelled_crops(b, n, c=2, h=side, w=side) + 100 * j
        for j, (n, side) in enumerate(zip(lay.crops_per_cell, lay.crop_sizes, strict=True))
    ]
    # value = 1000*sample + 100*cell + crop-in-cell
    images, members = stitch_multiscale(cells, lay.grid)
    assert images.shape == (b, 2, 16, 16)
    assert members.shape == (b, lay.num_crops) and members.dtype == torch.int64
    for i in range(b):
        for m, (x0, y0, x1, y1) in enumerate(lay.crop_boxes):
            patch = images[i, :, y0:y1, x0:x1]
            assert torch.equal(patch.amin(), patch.amax()), "crop box mixes several crops"
            value = int(patch.flatten()[0])
            sample, cell, k = value // 1000, (value % 1000) // 100, value % 100
            assert sample == members[i, m]
            assert cell == lay.cell_of_crop[m]
            assert k == m - lay.first_crop_of_cell[cell]
            assert sample == (i + cell) % b
    per_object = members[:, list(lay.first_crop_of_cell)]
    _, coarse = stitch(torch.zeros(b, 4, 1, 1, 1), 2)
    assert torch.equal(per_object, coarse)


def test_multiscale_gradient_and_errors():
    b = 4
    big = torch.randn(b, 1, 3, 8, 8, requires_grad=True)
    small = torch.randn(b, 4, 3, 4, 4, requires_grad=True)
    images, members = stitch_multiscale([big, small, big, small], 2)
    images.sum().backward()
    assert torch.equal(big.grad, torch.full_like(big, 2.0))
    assert torch.equal(small.grad, torch.full_like(small, 2.0))
    assert members.shape == (b, 10)
    with pytest.raises(ValueError, match="needs 4 cells"):
        stitch_multiscale([big, small], 2)
    with pytest.raises(ValueError, match="not a square"):
        stitch_multiscale([big, torch.zeros(b, 3, 3, 4, 4), big, big], 2)
    with pytest.raises(ValueError, match="same batch, channels and side"):
        stitch_multiscale([big, torch.zeros(b, 4, 3, 3, 3), big, big], 2)
