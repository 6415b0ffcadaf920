"""A loader with ``pipeline.loader.ViewLoader``'s interface that makes random view tensors.

Used by the tests (no DALI, no shards) and by ``ssl-cli bench train`` as the compute ceiling
(``pool``: a few batches made once, already on the device, served in turn).

Batches (the loader contract; float32 NCHW, int64 indices, on ``device``):

- ``mos``: ``single1, single2, multi1, multi2`` ``[B, 3, S, S]``; ``members1, members2``
  ``[B, M]`` LOCAL batch indices of the sample in each object crop of the stitched views (cyclic
  stitching, :func:`pipeline.stitching.stitch_multiscale`); ``index`` ``[B]``.
- ``univip``: ``scene1, scene2`` ``[B, 3, S, S]``; ``instances`` ``[B, K, 3, s, s]``; ``index``.
- ``multicrop``: ``crops``: list of ``num_crops`` tensors ``[B, 3, S, S]`` then ``num_local``
  ``[B, 3, L, L]``; ``index``.

The data are learnable: sample ``n`` of the synthetic set is a fixed smooth random image
(a function of ``seed`` and ``n`` only), and each view is that image at the view's size plus
fresh noise, so views of one sample agree and a few steps lower any of the losses.

Determinism: batch ``i`` of epoch ``e`` on rank ``r`` depends only on ``(seed, e, i, r)``, so
``state_dict() -> {"epoch", "batch"}`` and :meth:`load_state_dict` resume exactly. The stitching
layout (grid ``r``, scales ``s_j``, hence ``M``) depends on ``(seed, e, i)`` and not on the rank:
every rank has the same ``M`` at a step, which the gathered members of the MOS loss need.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.layout import MOS_GRID_CHOICES, MOS_SCALE_CHOICES, sample_layout
from pipeline.stitching import stitch_multiscale

__all__ = ["SyntheticLoader"]

# The registered view sets (pipeline.views) this loader imitates -> the method making a batch.
_BATCHES = {"mos": "_mos_batch", "univip": "_univip_batch", "multicrop": "_multicrop_batch"}
VIEW_SETS = tuple(_BATCHES)
_BASE_SIDE = 8  # side of the random image a synthetic sample is upsampled from (smoothness)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SyntheticLoader:
    """Random views with the real loader's interface (see the module docstring).

    Args:
        views: ``"mos"``, ``"univip"`` or ``"multicrop"``.
        batch_size: samples per batch on this rank.
        rank, world_size: this process's share: each epoch is a permutation of the
            ``num_samples`` samples, cut into global batches of ``batch_size * world_size``,
            each split by rank.
        size: side of the main views; ``instance_size`` / ``num_instances``: UniVIP instances;
        num_crops: global crops of the multicrop set, ``num_local`` local ones of side
            ``local_size``; ``grid_choices`` / ``scale_choices``: MOS layout.
        noise: standard deviation of the per-view noise.
        pool: if > 0, make this many batches once (on ``device``) and serve them in turn:
            the compute ceiling of ``bench train``, free of any data cost.
    """

    def __init__(
        self,
        views: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        size: int = 224,
        instance_size: int = 96,
        num_instances: int = 4,
        num_crops: int = 2,
        num_local: int = 0,
        local_size: int = 96,
        num_samples: int = 4096,
        grid_choices: Sequence[int] = MOS_GRID_CHOICES,
        scale_choices: Sequence[int] = MOS_SCALE_CHOICES,
        noise: float = 0.3,
        pool: int = 0,
    ) -> None:
        if views not in VIEW_SETS:
            raise ValueError(f"unknown view set {views!r}; choose one of: {', '.join(VIEW_SETS)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        self.views = views
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self.size = size
        self.instance_size = instance_size
        self.num_instances = num_instances
        self.num_crops = num_crops
        self.num_local = num_local
        self.local_size = local_size
        self.num_samples = num_samples
        self.grid_choices = tuple(grid_choices)
        self.scale_choices = tuple(scale_choices)
        self.noise = noise
        self._epoch = 0
        self._batch = 0
        self._pool: list[dict] = []
        if pool > 0:
            self._pool = [self._make(0, i % max(len(self), 1)) for i in range(pool)]

    # ---------------------------------------------------------------- loader interface

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        self._batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state["epoch"])
        self._batch = int(state["batch"])

    def close(self) -> None:
        self._pool = []

    def __iter__(self) -> Iterator[dict]:
        while self._batch < len(self):
            epoch, index = self._epoch, self._batch
            self._batch += 1
            if self._pool:
                yield self._pool[(epoch * len(self) + index) % len(self._pool)]
            else:
                yield self._make(epoch, index)

    # ----------------------------------------------------------------------- batches

    def _indices(self, epoch: int, index: int) -> Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
        order = torch.randperm(self.num_samples, generator=g)
        start = (index * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def _bases(self, indices: Tensor) -> Tensor:
        """``[B, 3, b, b]`` the fixed low-resolution image of every sample."""
        out = []
        for n in indices.tolist():
            g = torch.Generator().manual_seed(_mix(self.seed, 2, n))
            out.append(torch.randn(3, _BASE_SIDE, _BASE_SIDE, generator=g))
        return torch.stack(out)

    def _view(self, bases: Tensor, side: int, g: torch.Generator) -> Tensor:
        x = F.interpolate(bases, size=(side, side), mode="bilinear", align_corners=False)
        return x + self.noise * torch.randn(x.shape, generator=g)

    def _make(self, epoch: int, index: int) -> dict:
        indices = self._indices(epoch, index)
        bases = self._bases(indices)
        g = torch.Generator().manual_seed(_mix(self.seed, 3, epoch, index, self.rank))
        batch = getattr(self, _BATCHES[self.views])(bases, g, epoch, index)
        batch["index"] = indices.to(torch.int64)
        return {k: _to(v, self.device) for k, v in batch.items()}

    def _mos_batch(self, bases: Tensor, g: torch.Generator, epoch: int, index: int) -> dict:
        s = self.size
        batch = {"single1": self._view(bases, s, g), "single2": self._view(bases, s, g)}
        layout_rng = random.Random(_mix(self.seed, 4, epoch, index))  # same on every rank
        grid = layout_rng.choice(self.grid_choices)  # one r for both views, as MOSViews
        for v in (1, 2):
            layout = sample_layout(
                s, self.grid_choices, self.scale_choices, rng=layout_rng, grid=grid
            )
            cells = []
            for scale, side in zip(layout.scales, layout.crop_sizes, strict=True):
                crops = [self._view(bases, side, g) for _ in range(scale * scale)]
                cells.append(torch.stack(crops, dim=1))  # [B, s*s, 3, side, side]
            images, members = stitch_multiscale(cells, layout.grid)
            batch[f"multi{v}"] = images
            batch[f"members{v}"] = members
            batch[f"layout{v}"] = layout
        return batch

    def _univip_batch(self, bases: Tensor, g: torch.Generator, epoch: int, index: int) -> dict:
        s = self.size
        batch = {"scene1": self._view(bases, s, g), "scene2": self._view(bases, s, g)}
        inst = [self._view(bases, self.instance_size, g) for _ in range(self.num_instances)]
        batch["instances"] = torch.stack(inst, dim=1)  # [B, K, 3, s, s]
        return batch

    def _multicrop_batch(self, bases: Tensor, g: torch.Generator, epoch: int, index: int) -> dict:
        crops = [self._view(bases, self.size, g) for _ in range(self.num_crops)]
        crops += [self._view(bases, self.local_size, g) for _ in range(self.num_local)]
        return {"crops": crops}


def _to(value, device: torch.device):
    if isinstance(value, list):
        return [v.to(device) for v in value]
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value  # e.g. a StitchLayout
