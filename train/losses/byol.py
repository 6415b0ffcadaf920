"""BYOL loss (Grill et al., NeurIPS 2020, "Bootstrap Your Own Latent"), eq. 2 and its symmetrisation.

``L(p, z) = || p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)``, with ``p`` the online prediction and
``z`` the target projection (stop-gradient). The total is ``L(p1, z2) + L(p2, z1)`` (the paper's
``L + L~``), each averaged over the batch. UniVIP's scene terms use this loss by default
(``train.losses.univip.scene_loss``, ORL's head); UniVIP eq. 2 writes ``-cos``, which differs by
a constant and a factor 2 (``loss.scene_form: cosine``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """BYOL eq. 2 per row: ``2 - 2 cos(p, sg(z))``, ``[B, D], [B, D] -> [B]``, in ``[0, 4]``."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=-1)


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric BYOL loss, batch mean.

    ``p1, p2`` ``[B, D]``: online predictions of views 1 and 2; ``z1, z2`` ``[B, D]``: target
    projections of views 1 and 2 (detached here). Returns ``mean L(p1, z2) + mean L(p2, z1)``.
    """
    return normalized_mse(p1, z2).mean() + normalized_mse(p2, z1).mean()


@dataclass(frozen=True)
class BYOLLossConfig:
    """BYOL's loss has no hyper-parameter: the config's ``loss`` section for ``method: byol`` is
    empty."""


class BYOLLoss(nn.Module):
    """:func:`byol_loss` as a module with the losses' common output: ``{"loss": total}``."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        return {"loss": byol_loss(p1, p2, z1, z2)}
