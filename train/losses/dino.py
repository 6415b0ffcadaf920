"""DINO loss (Caron et al., ICCV 2021, "Emerging Properties in Self-Supervised Vision
Transformers", section 3.1, eq. 2-4 and algorithm 1; reference code facebookresearch/dino,
``main_dino.py``: ``DINOLoss``).

For teacher outputs ``t_i`` of the global views ``i`` and student outputs ``s_v`` of every
view ``v`` (``[B, K]`` logits each, ``K`` = the head's ``out_dim``)::

    P_t,i = softmax((t_i - c) / tau_t)           sharpened and centred, no gradient
    log P_s,v = log_softmax(s_v / tau_s)
    L = mean over pairs (i, v), v != i, of  mean over the batch of  -sum_k P_t,i log P_s,v

(eq. 3: every global teacher view against every student view but itself.) After the loss,
the centre moves by EMA: ``c <- m c + (1 - m) mean(t)`` over the teacher outputs of every
global view of every rank (eq. 4; the reference all-reduces the batch sum and divides by
``len(t) * world_size``). The centre is a buffer: it is in the model's ``state_dict``, and so
in every checkpoint (a resumed run continues from the same centre, as the reference's
``dino_loss.state_dict()`` in its checkpoint).

The teacher temperature changes during training (a linear warm-up by epoch); the loop passes
each step's value from the run's precomputed schedules (:func:`teacher_temp_schedule`).
Logits are taken in float32 whatever the autocast: a softmax at ``tau_t = 0.04`` over 65,536
entries is not meaningful in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.distributed import all_reduce_sum, world_and_rank

__all__ = ["DINOConfig", "DINOLoss", "dino_cross_entropy", "teacher_temp_schedule"]


@dataclass(frozen=True)
class DINOConfig:
    """DINO's own parameters (the config's ``loss`` section for ``method: dino``): the loss's,
    and the head's, which exists only for this loss. Defaults are ``main_dino.py``'s argument
    defaults; the method's recipe (``train.methods``) sets the ViT-S/16 values."""

    out_dim: int = 65536  # --out_dim: prototypes, the head's output size
    norm_last_layer: bool = True  # --norm_last_layer: weight norm g frozen at 1
    student_temp: float = 0.1  # DINOLoss(student_temp=0.1); paper section 3.1: tau_s = 0.1
    warmup_teacher_temp: float = 0.04  # --warmup_teacher_temp
    teacher_temp: float = 0.04  # --teacher_temp (after the warm-up)
    warmup_teacher_temp_epochs: int = 0  # --warmup_teacher_temp_epochs
    center_momentum: float = 0.9  # DINOLoss(center_momentum=0.9); paper eq. 4: m = 0.9
    freeze_last_layer: int = 1  # --freeze_last_layer: epochs without last-layer updates

    def __post_init__(self) -> None:
        checks = [
            ("out_dim", self.out_dim >= 1, ">= 1"),
            ("student_temp", self.student_temp > 0, "> 0"),
            ("warmup_teacher_temp", self.warmup_teacher_temp > 0, "> 0"),
            ("teacher_temp", self.teacher_temp > 0, "> 0"),
            ("warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs >= 0, ">= 0"),
            ("center_momentum", 0 <= self.center_momentum <= 1, "in [0, 1]"),
            ("freeze_last_layer", self.freeze_last_layer >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")


def teacher_temp_schedule(cfg: DINOConfig, steps_per_epoch: int, total_steps: int) -> np.ndarray:
    """``[total_steps]`` teacher temperatures: the reference's per-epoch schedule
    (``np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)``, then
    ``teacher_temp``), read at each step's epoch ``step // steps_per_epoch``."""
    epoch = np.arange(total_steps) // max(steps_per_epoch, 1)
    warm = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    temps = np.full(total_steps, cfg.teacher_temp, dtype=np.float64)
    in_warmup = epoch < len(warm)
    temps[in_warmup] = warm[epoch[in_warmup]]
    return temps


def dino_cross_entropy(
    student: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float
) -> Tensor:
    """Eq. 3: the mean over pairs ``(i, v)``, ``v != i``, of the batch mean of
    ``-sum_k P_t,i[k] log_softmax(s_v / tau_s)[k]``; the first ``len(teacher_probs)`` student
    views are the global views the teacher saw, in the same order."""
    if len(teacher_probs) > len(student):
        raise ValueError(
            f"{len(teacher_probs)} teacher views but only {len(student)} student views"
        )
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total = student[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, q in enumerate(teacher_probs):
        for v, lp in enumerate(log_p):
            if v == i:  # the same view through both networks: skipped (eq. 3, v != x)
                continue
            total = total + torch.sum(-q * lp, dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("DINO needs at least two views (one global and one other)")
    return total / pairs


class DINOLoss(nn.Module):
    """Eq. 3 with centring (eq. 4) as a module: ``forward(student, teacher, teacher_temp)`` with
    ``student`` the head outputs of every view (globals first) and ``teacher`` those of the
    global views; returns ``{"loss": L}`` and updates the centre."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], teacher_temp: float
    ) -> dict[str, Tensor]:
        teacher = [t.detach().float() for t in teacher]
        probs = [F.softmax((t - self.center) / teacher_temp, dim=-1) for t in teacher]
        loss = dino_cross_entropy(student, probs, self.student_temp)
        self.update_center(torch.cat(teacher))
        return {"loss": loss}

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """``c <- m c + (1 - m) * mean`` of the teacher outputs ``[N, K]`` of every rank."""
        world, _ = world_and_rank()
        batch_center = all_reduce_sum(teacher.sum(dim=0, keepdim=True))
        batch_center = batch_center / (teacher.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
