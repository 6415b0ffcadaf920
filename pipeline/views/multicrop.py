"""The multi-crop view set: global and local random resized crops (DINO; BYOL, MoCo v3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..augment import BYOL_VIEW1, BYOL_VIEW2, Augment
from ..scene_pairs import random_resized_crop_boxes
from .banks import (
    RATIO,
    Bank,
    SamplePlan,
    _bank,
    _boxes_i32,
    _check_augs,
    _check_range,
    _check_size,
    _Group,
    _plan,
)
from .registry import register_view_set

__all__ = ["MultiCropViews"]


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
