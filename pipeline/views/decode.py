"""The decode + crop view set of ``ssl-cli bench pipeline``: no photometric augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..augment import NO_AUGMENT
from ..scene_pairs import random_resized_crop_boxes
from .banks import RATIO, Bank, SamplePlan, _bank, _check_range, _check_size, _Group, _plan
from .registry import register_view_set

__all__ = ["DecodeCropViews"]


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
