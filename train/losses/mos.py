"""MOS losses: Multiple Object Stitching (Shen, Liu, Wang; arXiv 2506.07364), section 3.2.

Four views of a batch of ``B`` single-object samples:

- ``multi1``, ``multi2``: two stitched (multi-object) views; image ``i`` of a stitched view
  holds the samples ``members[i]`` (``[B, r * r]``, one sample index per object / coarse cell);
- ``single1``, ``single2``: two plain single-object views, image ``i`` holds sample ``i``
  (``members = arange(B)[:, None]``).

The base encoder + projector + predictor gives predictions (queries) and the momentum encoder +
projector gives projections (keys, stop-gradient). Every term is a cross-entropy between soft
targets, built from which samples two images share (eq. 8-10, appendix B eq. 16-17), and the
softmax of cosine similarities over temperature (eq. 11-13); the total is their weighted sum
(eq. 14). Section 3.2 sends one stitched and one single view through the base branch and the
other stitched view and both single views through the momentum branch (``form="paper"``,
:data:`MOS_FORMS`); ``form="symmetric"`` sends every view through both and symmetrises every
term.

Conventions (decided here, the trainer relies on them):

- Sample indices in ``members`` are *global*: ``rank * B_local + local_index``
  (:func:`global_members`, :func:`global_single_members`). Keys and their members are gathered
  from every rank, so targets are built against the global batch, and a query only ever shares
  samples with keys built from the same samples, whichever rank holds them.
- :func:`soft_contrastive` is the plain cross-entropy of eq. 11-13 (PatchMix's
  ``MultiTempContrastiveLoss``: ``SoftTargetCrossEntropy`` of cosine logits over tau). MoCo v3's
  factor ``2 * temperature`` is an option of :class:`MOSLoss` (``scale_by_2tau``), off by
  default; ``train.losses.mocov3`` applies it, as MoCo v3 does.
- Every (query, key) pair crosses the two augmentation pipelines (table 6: Aug. 1/3 vs. 2/4,
  BYOL's asymmetric blur/solarize): the ``1`` views use the first, the ``2`` views the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

# soft_contrastive and the gather live with the other contrastive losses and collectives; they
# stay importable from here (DEFAULT_TEMPERATURE: appendix D, "The temperature coefficient is
# set to 0.2")
from train.distributed import all_gather_no_grad, world_and_rank
from train.losses.contrastive import DEFAULT_TEMPERATURE, soft_contrastive

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MOSLoss",
    "MOSLossConfig",
    "MOS_FORMS",
    "MOS_VIEWS",
    "all_gather_no_grad",
    "global_members",
    "global_single_members",
    "object_members",
    "soft_contrastive",
    "soft_targets",
]


@dataclass(frozen=True)
class MOSLossConfig:
    """The MOS loss's hyper-parameters (the config's ``loss`` section for ``method: mos``), each
    declared once: :class:`MOSLoss` takes the same names and these defaults."""

    temperature: float = DEFAULT_TEMPERATURE  # MOS appendix D: 0.2
    # "paper": section 3.2's 2 + 3 passes, one direction per term (PatchMix main_pretrain.py
    # feeds the same views); "symmetric": every view through both branches, both directions
    form: Literal["paper", "symmetric"] = "paper"
    # MoCo v3's 2 * tau factor: neither MOS eq. 11-13 nor PatchMix has it (docs/methods.md)
    scale_by_2tau: bool = False
    # eq. 14 is the plain sum; PatchMix halves the two stitched terms (0.5, 0.5, 1);
    # 0 drops a term (table 4 ablation)
    weight_m2s: float = 1.0
    weight_m2m: float = 1.0
    weight_s2s: float = 1.0


# --------------------------------------------------------------------------- global indices


def object_members(batch: dict, view: int) -> Tensor:
    """Members per object, ``[B, r*r]``: one entry per coarse cell of the stitched image.

    The loader reports one member per crop (``[B, M]``; a cell with scale ``s_j`` holds
    ``s_j**2`` smaller views of one sample). MOS counts objects: "each synthesized multi-object
    image contains r^2 objects, each of which includes s^2 views" (section 3.1), and its soft
    targets weigh images by shared objects (eqs. 8-10), so every cell counts once.
    """
    members = batch[f"members{view}"]
    layout = batch.get(f"layout{view}")
    if layout is None:  # already one member per object
        return members
    first = torch.as_tensor(layout.first_crop_of_cell, device=members.device)
    return members.index_select(1, first)


def global_members(members: Tensor, local_batch_size: int) -> Tensor:
    """Local sample indices ``[B, M]`` -> global ones, ``rank * local_batch_size + members``.

    ``local_batch_size`` is the number of single-object samples per rank (equal on all ranks).
    Gathered keys are laid out rank after rank, so global index ``g`` is sample ``g % B`` of
    rank ``g // B``, which is also its row among gathered single-object keys.
    """
    _, rank = world_and_rank()
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
        hist = torch.zeros(members.shape[0], num_samples, device=device, dtype=torch.float32)
        ones = torch.ones(members.shape, device=device, dtype=torch.float32)
        return hist.scatter_add_(1, members.to(device), ones)

    # sum over cell pairs of [m_q == m_k] = <hist_q[i], hist_k[j]> (exact small integers). In
    # float32 with autocast off: under bf16 autocast the product and the division would run in
    # bf16 (1/3 -> 0.33398), and the targets would not be the eq. 8-10 values
    with torch.autocast(device_type=device.type, enabled=False):
        counts = histogram(members_q) @ histogram(members_k).T  # [Bq, Bk]
        row_sum = counts.sum(dim=1, keepdim=True)
        return counts / row_sum.clamp_min(1.0)  # rows with no overlap stay 0


# which (query, key) view pairs each term contrasts, per form of the loss
MOS_FORMS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    # MOS section 3.2: the base branch sees one stitched and one single view (q^, q), the
    # momentum branch the other stitched view and both single views (k^, k, k'):
    # L_m2s = H(q^, k) (eq. 11), L_m2m = H(q^, k^) (eq. 12), L_s2s = H(q, k') (eq. 13).
    # PatchMix (visresearch/patchmix, main_pretrain.py) feeds exactly these views: base
    # single 1 + mix 2, momentum single 1 + single 2 + mix 1.
    "paper": {
        "m2s": (("multi2", "single1"),),
        "m2m": (("multi2", "multi1"),),
        "s2s": (("single1", "single2"),),
    },
    # every view through both branches, every term symmetrised the MoCo v3 way
    # (loss(q1, k2) + loss(q2, k1)): 4 passes with gradient + 4 without, against 2 + 3
    "symmetric": {
        "m2s": (("multi1", "single2"), ("multi2", "single1")),
        "m2m": (("multi1", "multi2"), ("multi2", "multi1")),
        "s2s": (("single1", "single2"), ("single2", "single1")),
    },
}
MOS_VIEWS = ("single1", "single2", "multi1", "multi2")


class MOSLoss(nn.Module):
    """The three MOS terms (eq. 11-13), weighted and summed (eq. 14).

    ``form`` says which views each term contrasts (:data:`MOS_FORMS`):

    - ``"paper"`` (default, section 3.2): ``m2s = H(p_multi2, z_single1)``,
      ``m2m = H(p_multi2, z_multi1)``, ``s2s = H(p_single1, z_single2)``; the step needs the
      predictions of ``single1, multi2`` and the momentum projections of ``single1, single2,
      multi1`` only (:attr:`query_views`, :attr:`key_views`);
    - ``"symmetric"``: each term summed over both directions, every view through both branches.

    ``H`` is :func:`soft_contrastive` (a plain cross-entropy, as eq. 11-13 and PatchMix's
    ``MultiTempContrastiveLoss``), times ``2 * temperature`` with ``scale_by_2tau`` (MoCo v3's
    convention, off by default: neither the paper nor PatchMix has it). ``weight_*`` multiply
    the terms in the total (eq. 14 is the plain sum: 1, 1, 1; PatchMix halves the two stitched
    terms: ``weight_m2s = weight_m2m = 0.5``); a weight of 0 skips a term (table 4 ablation).

    All members are global sample indices (:func:`global_members`); keys and their members are
    gathered here, so the caller passes only this rank's ``[B, D]`` / ``[B, M]`` tensors.
    """

    terms = ("m2s", "m2m", "s2s")

    def __init__(
        self,
        temperature: float = MOSLossConfig.temperature,
        form: str = MOSLossConfig.form,
        scale_by_2tau: bool = MOSLossConfig.scale_by_2tau,
        weight_m2s: float = MOSLossConfig.weight_m2s,
        weight_m2m: float = MOSLossConfig.weight_m2m,
        weight_s2s: float = MOSLossConfig.weight_s2s,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if form not in MOS_FORMS:
            raise ValueError(f"unknown MOS loss form {form!r}; choose one of: {sorted(MOS_FORMS)}")
        self.temperature = temperature
        self.form = form
        self.scale = 2.0 * temperature if scale_by_2tau else 1.0
        self.weights = {"m2s": weight_m2s, "m2m": weight_m2m, "s2s": weight_s2s}
        self.gather = gather
        pairs = [p for t in self.terms if self.weights[t] for p in MOS_FORMS[form][t]]
        # views in MOS_VIEWS order, so that the step's passes have a fixed order
        self.query_views = tuple(v for v in MOS_VIEWS if any(q == v for q, _ in pairs))
        self.key_views = tuple(v for v in MOS_VIEWS if any(k == v for _, k in pairs))

    def _direction(
        self, q: Tensor, k_all: Tensor, members_q: Tensor, members_k_all: Tensor, num_samples
    ) -> Tensor:
        """One (query, key) pair; keys and their members already gathered (``[W*Bk, .]``)."""
        targets = soft_targets(members_q, members_k_all, num_samples)  # [Bq, W * Bk]
        return self.scale * soft_contrastive(q, k_all, targets, self.temperature, gather=False)

    def forward(
        self,
        queries: dict[str, Tensor],
        keys: dict[str, Tensor],
        members: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """The loss from views by name.

        Args:
            queries: base-branch predictions ``[B, D]`` for (at least) :attr:`query_views`.
            keys: momentum projections ``[B, D]`` (stop-gradient) for :attr:`key_views`.
            members: ``[B, M]`` global int64 sample indices per view name: ``[B, r*r]`` for
                ``multi1``/``multi2`` (one entry per object), ``[B, 1]`` for ``single1`` and
                ``single2`` (:func:`global_single_members`; one tensor may serve both).

        Returns ``{"loss": total, "m2s": ..., "m2m": ..., "s2s": ...}``; backpropagate ``loss``,
        log the others (skipped terms are 0).
        """
        missing = [v for v in self.query_views if v not in queries]
        missing += [v for v in self.key_views if v not in keys]
        missing += [v for v in set(self.query_views + self.key_views) if v not in members]
        if missing:
            raise ValueError(f"MOSLoss(form={self.form!r}) needs views {sorted(set(missing))}")
        first = queries[self.query_views[0]]
        zero = first.new_zeros((), dtype=torch.float32)
        world, _ = world_and_rank()
        b = members[self.query_views[0]].shape[0]
        n = world * b if self.gather else None  # global indices < W * B
        # every key tensor (and its members) is gathered once, however many terms use it
        gathered: dict[int, Tensor] = {}

        def g(x: Tensor) -> Tensor:
            if not self.gather:
                return x.detach()
            if id(x) not in gathered:
                gathered[id(x)] = all_gather_no_grad(x)
            return gathered[id(x)]

        out: dict[str, Tensor] = {"loss": zero}
        for name in self.terms:
            weight = self.weights[name]
            if not weight:
                out[name] = zero
                continue
            value = zero
            for qv, kv in MOS_FORMS[self.form][name]:
                value = value + self._direction(
                    queries[qv], g(keys[kv]), members[qv], g(members[kv]), n
                )
            out[name] = value
            out["loss"] = out["loss"] + weight * value  # eq. 14
        return out
