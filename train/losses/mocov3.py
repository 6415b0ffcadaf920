"""MoCo v3 loss (Chen, Xie, He, ICCV 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), as MOS's single-to-single term alone.

``ctr(q, k) = 2 * tau * CE(q . k_all / tau, labels)`` with the keys gathered from every rank
(no gradient) and the positive of query ``i`` at column ``rank * B + i``; the total is
``ctr(q1, k2) + ctr(q2, k1)``. This is :func:`train.losses.contrastive.soft_contrastive` with identity
targets, i.e. MOS's eq. 13 without the stitched terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from train.losses.contrastive import DEFAULT_TEMPERATURE, soft_contrastive


@dataclass(frozen=True)
class MoCoV3LossConfig:
    """The MoCo v3 loss's hyper-parameter (the config's ``loss`` section for ``method: mocov3``)."""

    temperature: float = DEFAULT_TEMPERATURE  # MoCo v3 ViT: --moco-t=.2


def infonce(q: Tensor, k: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """One direction: ``2 * tau * CE``, ``q`` ``[B, D]`` against this rank's keys ``k`` ``[B, D]``
    and, under ``torch.distributed``, every other rank's keys as negatives."""
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must pair row by row, got {tuple(q.shape)} and {tuple(k.shape)}")
    # targets against this rank's keys; soft_contrastive places them at this rank's columns
    identity = torch.eye(q.shape[0], device=q.device)
    return 2.0 * temperature * soft_contrastive(q, k, identity, temperature)


def mocov3_loss(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Symmetric MoCo v3 loss: ``q1, q2`` ``[B, D]`` predictions of the base encoder for views 1
    and 2, ``k1, k2`` ``[B, D]`` momentum projections (stop-gradient). Default ``tau = 0.2``
    (MoCo v3's ViT setting, also MOS's)."""
    return infonce(q1, k2, temperature) + infonce(q2, k1, temperature)


class MoCoV3Loss(nn.Module):
    """:func:`mocov3_loss` as a module with the losses' common output: ``{"loss": total}``."""

    def __init__(self, temperature: float = MoCoV3LossConfig.temperature) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> dict[str, Tensor]:
        return {"loss": mocov3_loss(q1, q2, k1, k2, self.temperature)}
