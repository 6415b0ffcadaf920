"""Contrastive cross-entropy against gathered keys, shared by MOS and MoCo v3.

:func:`soft_contrastive` is MOS's eq. 11-13 (Shen, Liu, Wang; arXiv 2506.07364): the
cross-entropy between soft targets and the softmax of cosine similarities over a temperature,
the keys gathered from every rank without gradient. With identity targets it is MoCo v3's
InfoNCE (Chen, Xie, He, ICCV 2021) before its ``2 * tau`` factor (``train.losses.mocov3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.distributed import all_gather_no_grad, world_and_rank

__all__ = ["DEFAULT_TEMPERATURE", "soft_contrastive"]

# MOS appendix D ("The temperature coefficient is set to 0.2") and MoCo v3's ViT setting
DEFAULT_TEMPERATURE = 0.2


def soft_contrastive(
    q: Tensor,
    k: Tensor,
    targets: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    gather: bool = True,
) -> Tensor:
    """Cross-entropy between soft targets and ``softmax(cos(q, k) / temperature)`` (eq. 11-13).

    Args:
        q: ``[Bq, D]`` queries (predictions of the base branch), gradient flows.
        k: ``[Bk, D]`` keys (momentum projections), detached here (stop-gradient).
        targets: ``[Bq, Bk]`` targets against this rank's keys, placed at this rank's columns
            of the global batch (MoCo v3's ``labels + N * rank``), or ``[Bq, W * Bk]`` targets
            against the gathered keys (from :func:`train.losses.mos.soft_targets` on gathered
            global members).
            With no process group both are the same thing.
        temperature: softmax temperature ``tau``.
        gather: gather ``k`` from all ranks (no gradient) so the contrast spans the global
            batch. Every ``torch.distributed`` call is skipped without a process group.

    Returns:
        Scalar ``mean_i -sum_j targets[i, j] * log_softmax(q_i . k_j / tau)_j`` over the query
        rows whose target row is non-zero (all of them in MOS; 0 if there is none). Not scaled
        by ``2 * tau``; :class:`train.losses.mos.MOSLoss` does that.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q must be [Bq, D] and k [Bk, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if targets.dim() != 2 or targets.shape[0] != q.shape[0]:
        raise ValueError(f"targets must be [Bq={q.shape[0]}, Bk], got {tuple(targets.shape)}")
    local_keys = k.shape[0]
    k_all = all_gather_no_grad(k) if gather else k.detach()  # [W * Bk, D]
    targets = targets.to(device=q.device, dtype=torch.float32)
    if targets.shape[1] != k_all.shape[0]:
        if targets.shape[1] != local_keys:
            raise ValueError(
                f"targets have {targets.shape[1]} columns; expected {local_keys} (this rank's keys) "
                f"or {k_all.shape[0]} (gathered keys)"
            )
        _, rank = world_and_rank()
        padded = targets.new_zeros(targets.shape[0], k_all.shape[0])
        padded[:, rank * local_keys : (rank + 1) * local_keys] = targets
        targets = padded

    with torch.autocast(device_type=q.device.type, enabled=False):  # softmax in float32
        q = F.normalize(q.float(), dim=1)
        k_all = F.normalize(k_all.float(), dim=1)
        logits = q @ k_all.T / temperature  # [Bq, W * Bk], cosine similarity / tau
        per_row = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)  # [Bq]
    has_positive = (targets.sum(dim=1) > 0).to(per_row.dtype)
    return (per_row * has_positive).sum() / has_positive.sum().clamp_min(1.0)
