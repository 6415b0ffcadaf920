"""The UniVIP view set: a scene pair whose overlap holds ``k`` proposals, and their instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..augment import BYOL_VIEW1, BYOL_VIEW2, Augment
from ..scene_pairs import NUM_INSTANCES, SCENE_RATIO, SCENE_SCALE, TRIES
from ..scene_pairs import sample_scene_pair as _sample_scene_pair
from .banks import (
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

__all__ = ["UniVIPViews"]


@register_view_set("univip")
@dataclass(frozen=True)
class UniVIPViews:
    """UniVIP (§3.2-3.3, §4, A.2): two scene views whose overlap holds ``k`` proposals, and
    the ``k`` instance crops cut from the original image.

    Scenes: ``size`` (224) px, random resized crops (area ``scale`` 0.08..1, aspect ``ratio``)
    drawn by Algorithm 1 (:func:`pipeline.scene_pairs.sample_scene_pair`, ``tries`` = 20), BYOL's
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
