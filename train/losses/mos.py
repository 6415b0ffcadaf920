"""MOS losses: Multiple Object Stitching (Shen, Liu, Wang; arXiv 2506.07364), section 3.2.

Four views of a batch of ``B`` single-object samples feed the loss:

- ``m1``, ``m2``: two stitched (multi-object) views; image ``i`` of a stitched view holds the
  samples ``members[i]`` (``[B, grid * grid]``, one sample index per cell);
- ``s1``, ``s2``: two plain single-object views, image ``i`` holds sample ``i``
  (``members = arange(B)[:, None]``).

The base encoder + projector + predictor gives predictions ``p_*`` and the momentum encoder +
projector gives projections ``z_*`` (stop-gradient). Every term is a cross-entropy between soft
targets, built from which samples two images share (paper eq. 8-10, appendix B eq. 16-17), and
the softmax of cosine similarities over temperature (eq. 11-13); the total is their sum (eq. 14).

Conventions (decided here, the trainer relies on them):

- Sample indices in ``members`` are *global*: ``rank * B_local + local_index``
  (:func:`global_members`, :func:`global_single_members`). Keys and their members are gathered
  from every rank, so targets are built against the global batch, and a query only ever shares
  samples with keys built from the same samples, whichever rank holds them.
- :func:`soft_contrastive` is the plain cross-entropy; the MoCo v3 factor ``2 * temperature``
  (``contrastive_loss(...) * 2T`` in facebookresearch/moco-v3, whose base-momentum framework
  the paper adopts, sec. 3.2 and 4.1) is applied by :class:`MOSLoss` (and
  ``train.losses.mocov3``), so that :func:`soft_contrastive` stays comparable with
  ``F.cross_entropy``. ``MOSLoss(scale_by_2tau=False)`` gives the unscaled sum. (The MOS
  reference code, github.com/visresearch/MultipleObjectStitching, could not be read when this
  was written; the factor and the symmetrisation below follow MoCo v3.)
- Each term is symmetrised the MoCo v3 way, ``loss(q1, k2) + loss(q2, k1)`` (a sum, not a mean):
  a query from one augmentation pipeline is contrasted with keys from the other one (the paper's
  Aug. 1/3 vs. Aug. 2/4 of table 6, BYOL's asymmetric blur/solarize pairs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TEMPERATURE = 0.2  # appendix D: "The temperature coefficient is set to 0.2"


# --------------------------------------------------------------------------- distributed helpers


def _world_and_rank() -> tuple[int, int]:
    """(world size, rank); ``(1, 0)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` ``[B, ...]`` from every rank in rank order -> ``[W * B, ...]``.

    No gradient flows through the result (used for stop-gradient keys and integer members).
    Every rank must pass the same shape (``all_gather`` needs equal sizes). With no process
    group, or a world of one, returns ``x`` detached.
    """
    world, _ = _world_and_rank()
    if world == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def global_members(members: Tensor, local_batch_size: int) -> Tensor:
    """Local sample indices ``[B, M]`` -> global ones, ``rank * local_batch_size + members``.

    ``local_batch_size`` is the number of single-object samples per rank (equal on all ranks).
    Gathered keys are laid out rank after rank, so global index ``g`` is sample ``g % B`` of
    rank ``g // B``, which is also its row among gathered single-object keys.
    """
    _, rank = _world_and_rank()
    return members + rank * local_batch_size


def global_single_members(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Members of a plain single-object batch, in global indices: ``[B, 1]``."""
    local = torch.arange(batch_size, dtype=torch.int64, device=device)[:, None]
    return global_members(local, batch_size)


# ------------------------------------------------------------------------------------ targets


def _check_members(name: str, members: Tensor) -> None:
    if members.dim() != 2:
        raise ValueError(
            f"{name} must be [B, M] (M objects per image), got shape {tuple(members.shape)}"
        )
    if members.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 sample indices, got {members.dtype}")


def soft_targets(members_q: Tensor, members_k: Tensor, num_samples: int | None = None) -> Tensor:
    """Soft targets by shared-sample count (eq. 8-10, appendix B eq. 16-17).

    Args:
        members_q: ``[Bq, Mq]`` int64, sample index of every object (cell) of each query image.
        members_k: ``[Bk, Mk]`` int64, same for each key image. Use global indices under DDP.
        num_samples: an upper bound on the sample indices (``world * B_local`` for global
            indices). When given, the indices are trusted and nothing waits on the device;
            when ``None`` it is read from the members (a device-to-host sync) and checked.

    Returns:
        ``[Bq, Bk]`` float32. ``counts[i, j] = sum_{a, b} [members_q[i, a] == members_k[j, b]]``
        (pairs of cells, so a sample twice in an image counts twice), each row divided by its
        sum. A row whose image shares no sample with any key is **all zeros** (no NaN): it
        carries no positive, and :func:`soft_contrastive` leaves such rows out of its mean.

    Single vs. single (``arange(B)[:, None]`` both sides) gives the identity (MoCo v3 labels);
    stitched vs. single gives ``1/M`` on the ``M`` members (eq. 8); stitched vs. stitched gives
    the overlap counts normalised (eq. 9-10).
    """
    _check_members("members_q", members_q)
    _check_members("members_k", members_k)
    if members_q.numel() == 0 or members_k.numel() == 0:
        return torch.zeros(members_q.shape[0], members_k.shape[0], device=members_q.device)
    if num_samples is None:
        if int(members_q.min()) < 0 or int(members_k.min()) < 0:
            raise ValueError("members must be non-negative sample indices")
        num_samples = 1 + max(int(members_q.max()), int(members_k.max()))
    device = members_q.device

    def histogram(members: Tensor) -> Tensor:  # [B, M] -> [B, N]: copies of sample n in image b
        hist = torch.zeros(members.shape[0], num_samples, device=device)
        return hist.scatter_add_(1, members.to(device), torch.ones(members.shape, device=device))

    # sum over cell pairs of [m_q == m_k] = <hist_q[i], hist_k[j]> (exact small integers)
    counts = histogram(members_q) @ histogram(members_k).T  # [Bq, Bk]
    row_sum = counts.sum(dim=1, keepdim=True)
    return counts / row_sum.clamp_min(1.0)  # rows with no overlap stay 0


# ------------------------------------------------------------------------------------ loss


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
            against the gathered keys (from :func:`soft_targets` on gathered global members).
            With no process group both are the same thing.
        temperature: softmax temperature ``tau``.
        gather: gather ``k`` from all ranks (no gradient) so the contrast spans the global
            batch. Every ``torch.distributed`` call is skipped without a process group.

    Returns:
        Scalar ``mean_i -sum_j targets[i, j] * log_softmax(q_i . k_j / tau)_j`` over the query
        rows whose target row is non-zero (all of them in MOS; 0 if there is none). Not scaled
        by ``2 * tau``; :class:`MOSLoss` does that.
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
        _, rank = _world_and_rank()
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


class MOSLoss(nn.Module):
    """Sum of the three MOS terms (eq. 14), each symmetrised over the two view pairs.

    - multiple-to-single (eq. 11): ``H(p_m1, z_s2) + H(p_m2, z_s1)``, targets stitched vs. single;
    - multiple-to-multiple (eq. 12): ``H(p_m1, z_m2) + H(p_m2, z_m1)``, targets by overlap count;
    - single-to-single (eq. 13): ``H(p_s1, z_s2) + H(p_s2, z_s1)``, identity targets (MoCo v3).

    ``H`` is :func:`soft_contrastive` times ``2 * temperature`` when ``scale_by_2tau`` (the MoCo v3
    convention MOS inherits; it keeps the gradient scale independent of ``tau``). A weight of 0
    skips a term (the paper's ablation, table 4); weights 1 are eq. 14.

    All members are global sample indices (:func:`global_members`); key members are gathered
    here, like the keys, so the caller passes only this rank's ``[B, M]`` tensors.
    """

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        scale_by_2tau: bool = True,
        weight_m2s: float = 1.0,
        weight_m2m: float = 1.0,
        weight_s2s: float = 1.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.scale = 2.0 * temperature if scale_by_2tau else 1.0
        self.weights = {"m2s": weight_m2s, "m2m": weight_m2m, "s2s": weight_s2s}
        self.gather = gather

    def _term(
        self, q: Tensor, k_all: Tensor, members_q: Tensor, members_k_all: Tensor, num_samples
    ) -> Tensor:
        """One direction of one term; keys and their members already gathered (``[W*Bk, .]``)."""
        targets = soft_targets(members_q, members_k_all, num_samples)  # [Bq, W * Bk]
        return self.scale * soft_contrastive(q, k_all, targets, self.temperature, gather=False)

    def forward(
        self,
        p_m1: Tensor,
        p_m2: Tensor,
        p_s1: Tensor,
        p_s2: Tensor,
        z_m1: Tensor,
        z_m2: Tensor,
        z_s1: Tensor,
        z_s2: Tensor,
        members_m1: Tensor,
        members_m2: Tensor,
        members_s: Tensor,
    ) -> dict[str, Tensor]:
        """Predictions ``p_*`` and momentum projections ``z_*`` are ``[B, D]``; members are
        ``[B, grid * grid]`` (stitched views) and ``[B, 1]`` (single views, shared by s1 and s2),
        global int64 indices.

        Returns ``{"loss": total, "m2s": ..., "m2m": ..., "s2s": ...}``; backpropagate ``loss``,
        log the others (skipped terms are 0).
        """
        zero = p_m1.new_zeros((), dtype=torch.float32)
        world, _ = _world_and_rank()
        n = world * members_s.shape[0] if self.gather else None  # global indices < W * B
        # every key tensor (and its members) is gathered once, however many terms use it
        gathered: dict[int, Tensor] = {}

        def g(x: Tensor) -> Tensor:
            if not self.gather:
                return x.detach()
            if id(x) not in gathered:
                gathered[id(x)] = all_gather_no_grad(x)
            return gathered[id(x)]

        terms: dict[str, Tensor] = {}
        if self.weights["m2s"]:  # eq. 11
            terms["m2s"] = self._term(p_m1, g(z_s2), members_m1, g(members_s), n) + self._term(
                p_m2, g(z_s1), members_m2, g(members_s), n
            )
        if self.weights["m2m"]:  # eq. 12
            terms["m2m"] = self._term(p_m1, g(z_m2), members_m1, g(members_m2), n) + self._term(
                p_m2, g(z_m1), members_m2, g(members_m1), n
            )
        if self.weights["s2s"]:  # eq. 13
            terms["s2s"] = self._term(p_s1, g(z_s2), members_s, g(members_s), n) + self._term(
                p_s2, g(z_s1), members_s, g(members_s), n
            )
        total = zero
        for name, value in terms.items():  # eq. 14
            total = total + self.weights[name] * value
        out = {"loss": total}
        for name in ("m2s", "m2m", "s2s"):
            out[name] = terms.get(name, zero)
        return out
