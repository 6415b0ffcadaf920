"""Per-step schedules, computed once up front (DINO's ``utils.cosine_scheduler``).

Every hyper-parameter that changes during training is a float64 numpy array with one entry per
optimizer step; the loop reads ``schedules.lr[step]`` and nothing else, so a resumed run sees
exactly the values an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from train.config import TrainConfig

__all__ = ["Schedules", "build_schedules", "cosine_schedule", "peak_lr", "warmup_steps"]


def cosine_schedule(
    start: float,
    end: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """``[total_steps]``: linear ``warmup_start -> start`` over ``warmup_steps``, then a half
    cosine ``start -> end`` over the rest (SGDR, Loshchilov & Hutter 2017).

    Entry ``t`` of the cosine part is ``end + (start - end) * (1 + cos(pi * t / T)) / 2`` with
    ``T`` the number of cosine steps, so the first value is ``start`` and the last approaches
    ``end``. ``start == end`` gives a constant.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps, dtype=np.float64)
    cosine = end + 0.5 * (start - end) * (1.0 + np.cos(math.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def peak_lr(cfg: TrainConfig) -> float:
    """The linear scaling rule (Goyal et al. 2017; MoCo v3, DINO, BYOL):
    ``lr = base_lr * global_batch / 256``."""
    return cfg.optim.base_lr * cfg.data.batch_size / 256.0


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray  # [total_steps] learning rate
    weight_decay: np.ndarray  # [total_steps] weight decay of the regularised parameters
    momentum: np.ndarray  # [total_steps] EMA momentum of the target encoder
    steps_per_epoch: int
    # the method's own per-step values by name (DINO's teacher temperature), which the loop
    # hands to the method's step as ``batch["hyper"]``
    method: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of linear lr warm-up: ``schedule.warmup_epochs * steps_per_epoch``, rounded."""
    return round(cfg.schedule.warmup_epochs * steps_per_epoch)


# (cfg, steps_per_epoch, total_steps) -> {name: [total_steps] array}: a method's own schedules
MethodSchedules = Callable[[TrainConfig, int, int], dict[str, np.ndarray]]


def build_schedules(
    cfg: TrainConfig, steps_per_epoch: int, method_schedules: MethodSchedules | None = None
) -> Schedules:
    """All schedules of a run: ``steps_per_epoch`` is ``len(loader)`` (batches per rank and epoch).

    Total steps are ``schedule.steps`` when set, else ``schedule.epochs * steps_per_epoch``;
    warmup is ``schedule.warmup_epochs * steps_per_epoch`` steps (at most all of them).

    - lr: warmup from 0 to :func:`peak_lr`, cosine to ``optim.min_lr`` (MOS appendix D, UniVIP
      section 4 "cosine learning rate decay ... warm-up period of 4 epochs");
    - weight decay: cosine ``optim.weight_decay -> optim.weight_decay_end``, no warmup
      (MOS: 0.04 -> 0.4; constant for SGD/LARS recipes);
    - momentum: cosine ``ema.start -> ema.end`` (MOS 0.992 -> 1, UniVIP 0.99 -> 1; BYOL's
      ``1 - (1 - m0) (cos(pi k / K) + 1) / 2``);
    - the method's own (``method_schedules``, from its registration in ``train.methods``).
    """
    if steps_per_epoch < 1:
        raise ValueError(
            f"the loader yields {steps_per_epoch} batches per epoch: the data set is smaller than "
            "one global batch (data.batch_size)"
        )
    total = cfg.schedule.steps or cfg.schedule.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    return Schedules(
        lr=cosine_schedule(peak_lr(cfg), cfg.optim.min_lr, total, warmup),
        weight_decay=cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=cosine_schedule(cfg.ema.start, cfg.ema.end, total),
        steps_per_epoch=steps_per_epoch,
        method=method_schedules(cfg, steps_per_epoch, total) if method_schedules else {},
    )
