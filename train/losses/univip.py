"""UniVIP losses (Li et al., CVPR 2022, "UniVIP: A Unified Framework for Self-Supervised Visual
Pre-training"), section 3, eq. 2-12.

Inputs, per image of a batch of ``B`` scene pairs with ``K`` instances in their overlap:

- ``p1, p2``: ``[B, D]`` online predictions of scene views s1, s2 (``f_o1, f_o2``);
- ``z1, z2``: ``[B, D]`` target projections of s1, s2 (``f_t1, f_t2``, stop-gradient);
- ``inst``: ``[B, D]`` the model's linear map of the K concatenated online instance outputs
  (eq. 4; the linear layer belongs to the model);
- ``o``: ``[B, K, D]`` online instance outputs ``o_1..o_K``; ``t``: ``[B, K, D]`` target instance
  projections ``t_1..t_K`` (stop-gradient).

Conventions decided here:

- **Scene terms (eq. 3, 6) default to BYOL's normalised MSE** ``2 - 2 cos`` per direction
  (``form="mse"``), not the paper's literal negative cosine of eq. 2 / 5 (``form="cosine"``).
  UniVIP section 4 "fully follows" ORL (Xie et al., NeurIPS 2021) on COCO, and ORL's head
  (Jiahao000/ORL, ``openselfsup/models/heads/latent_pred_head.py``) computes
  ``2 * (1 - mean(cos(pred, target)))``, summed over the two directions by its BYOL. The two
  forms differ by a constant and a factor 2, so ``-cos`` halves the gradient at the same
  learning rate; with ``"mse"`` the scene term is exactly :func:`train.losses.byol.byol_loss`,
  and the UniVIP-vs-BYOL comparison (UniVIP table 7, BYOL trained by the same recipe) is not
  confounded by a gradient scale.
- **Instance term (eq. 11) stays the paper's** ``-sum_mn cos(o_m, t_n) y_mn``. It is a cosine
  weighted by the transport plan; no reference implementation writes it otherwise (ORL has no
  such term). As the plan has total mass 1, ``2 - 2 sum cos y = sum y |o^ - t^|^2`` would only add
  a constant and double the gradient. Hence with the default ``"mse"`` scene form each scene
  cosine weighs twice a plan-weighted instance cosine; ``form="cosine"`` gives eq. 12's equal
  weighting literally.
- Every target-network tensor (``z1, z2, t``) is detached inside the loss.
- The transport plan (eq. 7) is computed without gradient, like the assignments of SwAV and the
  flows of DeepEMD's Sinkhorn layer: the cost (eq. 8) and marginals (eq. 9-10) are detached, the
  plan is a constant weight, and eq. 11 gives gradient to ``o`` through the cosine only.
- Plan layout: ``plan[b, m, n]``, row ``m`` = online instance ``o_m`` (supplier, mass ``b_m`` of
  eq. 9), column ``n`` = target instance ``t_n`` (demander, mass ``a_n`` of eq. 10), as in eq. 7
  (``sum_n y_mn = b_m``, ``sum_m y_mn = a_n``).
- **Sinkhorn as in OTA** (Ge et al., CVPR 2021, "Optimal transport assignment for object
  detection"), which UniVIP follows for eq. 7 ("Following [15]"): entropic regularisation
  ``eps = 0.1`` and 50 iterations (:data:`DEFAULT_EPS`, :data:`DEFAULT_ITERS`).
- **Marginals are the raw dot products of eq. 9-10** by default (``cosine_marginals=False``),
  computed in float32 outside autocast (projection norms are not bounded; under fp16 autocast a
  product of two norm-300 vectors overflows). Masses are normalised per image, so a common
  scale of the features cancels; an image whose masses all clamp to 0 gets uniform masses.
  ``cosine_marginals=True`` L2-normalises the vectors first (see :func:`instance_marginals`).
  The plan has total mass 1 per image, so eq. 11 is a weighted mean of cosines in ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.losses.byol import normalized_mse


@dataclass(frozen=True)
class UniVIPLossConfig:
    """The UniVIP loss's hyper-parameters (the config's ``loss`` section for ``method:
    univip``), each declared once: :class:`UniVIPLoss` takes the same names and defaults."""

    # scene-scene (eq. 3) and scene-instance (eq. 6) distance: "mse" = 2 - 2 cos, ORL's
    # LatentPredictHead and our BYOL's (equal gradients, so UniVIP vs BYOL is not confounded,
    # table 7); "cosine" = -cos, eq. 2 / 5 as written
    scene_form: Literal["mse", "cosine"] = "mse"
    sinkhorn_eps: float = 0.1  # OTA's entropic regularisation; costs (eq. 8) lie in [0, 2]
    sinkhorn_iters: int = 50  # OTA's Sinkhorn iterations
    cosine_marginals: bool = False  # eq. 9-10 as written: raw dot products


DEFAULT_EPS = UniVIPLossConfig.sinkhorn_eps
DEFAULT_ITERS = UniVIPLossConfig.sinkhorn_iters
DEFAULT_SCENE_FORM = UniVIPLossConfig.scene_form
DEFAULT_COSINE_MARGINALS = UniVIPLossConfig.cosine_marginals


def negative_cosine(x: Tensor, y: Tensor) -> Tensor:
    """``-cos(x, sg(y))`` per row (eq. 2 and eq. 5): ``[B, D], [B, D] -> [B]``, in ``[-1, 1]``."""
    return -F.cosine_similarity(x, y.detach(), dim=-1)


# form name -> per-row distance ``[B, D], [B, D] -> [B]`` (target detached)
SCENE_FORMS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": normalized_mse,  # BYOL eq. 2 / ORL's head: 2 - 2 cos, in [0, 4]
    "cosine": negative_cosine,  # UniVIP eq. 2 / 5: -cos, in [-1, 1]
}


def _scene_distance(form: str) -> Callable[[Tensor, Tensor], Tensor]:
    if form not in SCENE_FORMS:
        raise ValueError(f"unknown scene form {form!r}; choose one of: {', '.join(SCENE_FORMS)}")
    return SCENE_FORMS[form]


def scene_loss(
    p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, form: str = DEFAULT_SCENE_FORM
) -> Tensor:
    """Symmetric scene-scene loss (eq. 3), batch mean.

    ``p1, p2`` ``[B, D]`` online predictions of s1, s2; ``z1, z2`` ``[B, D]`` target projections.
    Returns ``mean d(p1, z2) + mean d(p2, z1)`` with ``d`` from :data:`SCENE_FORMS`: ``"mse"``
    ``2 - 2 cos`` (equal to :func:`train.losses.byol.byol_loss`, in ``[0, 8]``) or ``"cosine"``
    ``-cos`` (eq. 2, in ``[-2, 2]``).
    """
    d = _scene_distance(form)
    return d(p1, z2).mean() + d(p2, z1).mean()  # eq. 3


def scene_instance_loss(
    inst: Tensor, z1: Tensor, z2: Tensor, form: str = DEFAULT_SCENE_FORM
) -> Tensor:
    """Scene-instance affinity (eq. 5-6), batch mean.

    ``inst`` ``[B, D]`` is ``I = f_linear(concat(o_1..o_K))`` (eq. 4, computed by the model);
    ``z1, z2`` ``[B, D]`` target projections of the two scene views. Both views hold the same K
    instances, so ``I`` is pulled towards both: ``mean d(I, z1) + mean d(I, z2)``, ``d`` as in
    :func:`scene_loss` (``"cosine"`` is eq. 5 literally).
    """
    d = _scene_distance(form)
    return d(inst, z1).mean() + d(inst, z2).mean()  # eq. 6


def _normalise_marginal(x: Tensor) -> Tensor:
    """``[B, K]`` non-negative -> rows summing to 1; an all-zero row becomes uniform ``1/K``."""
    total = x.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1])
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), uniform)


@torch.no_grad()
def sinkhorn(
    cost: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float = DEFAULT_EPS,
    iters: int = DEFAULT_ITERS,
    rounded: bool = True,
) -> Tensor:
    """Entropic optimal transport by log-domain Sinkhorn-Knopp (eq. 7, appendix A.4).

    Solves ``min_y <cost, y> - eps * H(y)`` with ``y.sum(2) = a`` and ``y.sum(1) = b``.

    Args:
        cost: ``[B, M, N]`` transport cost (eq. 8).
        a: ``[B, M]`` non-negative **row** masses. In UniVIP, rows are the online instances
            ``o_m`` and ``a`` is the paper's ``b_m`` (eq. 9).
        b: ``[B, N]`` non-negative **column** masses: target instances ``t_n``, the paper's
            ``a_n`` (eq. 10).
        eps: entropic regularisation; the updates run on ``log`` potentials with ``logsumexp``,
            so ``eps = 1e-3`` (near-exact transport) stays finite.
        iters: number of (row, column) update pairs. Convergence is slow when ``eps`` is small
            against the cost range, so the iterate is then rounded onto the marginals
            (:func:`_round_to_marginals`), which makes both marginals exact. With OTA's
            ``eps = 0.1, iters = 50`` (the defaults), about one random 4 x 4 problem (costs in
            ``[0, 2]``) in ten stays over 1e-3, at worst about 1e-2, entrywise from the converged
            entropic plan; the rounding still makes the marginals exact.
        rounded: with ``False``, return the Sinkhorn iterate itself, before that rounding: it
            meets the column masses (the last update) and the row masses only approximately.
            Same as POT's ``ot.sinkhorn`` after ``iters`` iterations on the transposed problem.

    Returns:
        ``[B, M, N]`` float32 plan, rows summing to normalised ``a``, columns to normalised ``b``
        (each sums to 1 in total). Masses are normalised inside; an all-zero ``a`` or ``b`` row is
        replaced by the uniform distribution (no NaN); zero entries give zero rows/columns.
        Computed under ``torch.no_grad()``: the plan is a constant for the loss.

    Raises:
        ValueError: on mismatched shapes or negative masses.
    """
    if cost.dim() != 3 or a.shape != cost.shape[:2] or b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"expected cost [B, M, N], a [B, M], b [B, N]; got {tuple(cost.shape)}, "
            f"{tuple(a.shape)}, {tuple(b.shape)}"
        )
    if eps <= 0 or iters < 1:
        raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    if bool((a < 0).any()) or bool((b < 0).any()):
        raise ValueError("marginals a and b must be non-negative")
    scaled = cost.float() / eps  # [B, M, N]
    a = _normalise_marginal(a.float())
    b = _normalise_marginal(b.float())
    log_a, log_b = a.log(), b.log()  # -inf where a mass is 0: that row / column stays empty
    u = torch.zeros_like(log_a)  # log row scaling, f / eps
    v = torch.zeros_like(log_b)  # log column scaling, g / eps
    for _ in range(iters):
        u = log_a - torch.logsumexp(v[:, None, :] - scaled, dim=2)  # fit rows
        v = log_b - torch.logsumexp(u[:, :, None] - scaled, dim=1)  # fit columns
    plan = torch.exp(u[:, :, None] + v[:, None, :] - scaled)  # y_mn
    return _round_to_marginals(plan, a, b) if rounded else plan


def _round_to_marginals(plan: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Project an approximate plan onto ``{y >= 0: y.sum(2) = a, y.sum(1) = b}``.

    Altschuler, Weed, Rigollet (NeurIPS 2017), algorithm 2 ("round"): scale down the rows that
    carry too much mass, then the columns, and give the missing mass back as the rank-one
    ``err_a err_b^T / |err_a|_1``. The change is at most about twice the marginal error left by
    the iterations, and the result meets both marginals to float precision, so a few Sinkhorn
    iterations suffice even when ``eps`` is small and convergence is slow.
    ``plan`` ``[B, M, N]``, ``a`` ``[B, M]``, ``b`` ``[B, N]`` normalised.
    """
    rows = plan.sum(dim=2)
    plan = plan * torch.where(rows > 0, a / rows, torch.ones_like(a)).clamp(max=1.0)[:, :, None]
    cols = plan.sum(dim=1)
    plan = plan * torch.where(cols > 0, b / cols, torch.ones_like(b)).clamp(max=1.0)[:, None, :]
    err_a = (a - plan.sum(dim=2)).clamp_min(0)  # [B, M]
    err_b = (b - plan.sum(dim=1)).clamp_min(0)  # [B, N]
    missing = err_a.sum(dim=1).clamp_min(torch.finfo(plan.dtype).tiny)  # [B]
    return plan + err_a[:, :, None] * err_b[:, None, :] / missing[:, None, None]


def instance_cost(o: Tensor, t: Tensor) -> Tensor:
    """Eq. 8: ``c_mn = 1 - cos(o_m, t_n)``, ``[B, K, D], [B, K, D] -> [B, K, K]``."""
    return 1.0 - F.normalize(o, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)


def instance_marginals(
    o: Tensor,
    t: Tensor,
    f_o1: Tensor,
    f_o2: Tensor,
    f_t1: Tensor,
    f_t2: Tensor,
    cosine: bool = DEFAULT_COSINE_MARGINALS,
) -> tuple[Tensor, Tensor]:
    """Eq. 9-10: masses of the online (rows) and target (columns) instances.

    ``b_m = max(o_m . (f_t1 + f_t2) / 2, 0)`` (eq. 9) and ``a_n = max(t_n . (f_o1 + f_o2) / 2, 0)``
    (eq. 10): an instance weighs by how much it agrees with the *other* network's view of the
    whole scene. ``o, t`` ``[B, K, D]``, scene features ``[B, D]``; returns ``(b, a)``, both
    ``[B, K]`` float32, non-negative, unnormalised (:func:`sinkhorn` normalises per image).

    Default (``cosine=False``): the raw dot products as written. Masses are renormalised per
    image, so only their ratios matter: a common scale of all features cancels, while an
    instance with a larger projection norm weighs more. The products run in float32 with
    autocast off, since projection norms are unbounded and fp16 overflows past 65504.
    With ``cosine=True`` every vector is L2-normalised first, so masses depend on direction only.
    """
    with torch.autocast(device_type=o.device.type, enabled=False):
        o, t = o.float(), t.float()
        f_o1, f_o2, f_t1, f_t2 = f_o1.float(), f_o2.float(), f_t1.float(), f_t2.float()
        if cosine:
            o, t = F.normalize(o, dim=-1), F.normalize(t, dim=-1)
            f_o1, f_o2 = F.normalize(f_o1, dim=-1), F.normalize(f_o2, dim=-1)
            f_t1, f_t2 = F.normalize(f_t1, dim=-1), F.normalize(f_t2, dim=-1)
        scene_t = (f_t1 + f_t2) / 2  # [B, D]
        scene_o = (f_o1 + f_o2) / 2
        row_mass = torch.einsum("bkd,bd->bk", o, scene_t).clamp_min(0)  # eq. 9, b_m
        col_mass = torch.einsum("bkd,bd->bk", t, scene_o).clamp_min(0)  # eq. 10, a_n
    return row_mass, col_mass


def instance_loss(
    o: Tensor,
    t: Tensor,
    f_o1: Tensor,
    f_o2: Tensor,
    f_t1: Tensor,
    f_t2: Tensor,
    eps: float = DEFAULT_EPS,
    iters: int = DEFAULT_ITERS,
    cosine_marginals: bool = DEFAULT_COSINE_MARGINALS,
) -> Tensor:
    """Instance-instance discrimination by optimal transport (eq. 8-11), batch mean.

    ``o`` ``[B, K, D]`` online instance outputs (gradient flows), ``t`` ``[B, K, D]`` target
    instance projections (detached); ``f_o1, f_o2`` ``[B, D]`` online scene outputs, ``f_t1,
    f_t2`` ``[B, D]`` target scene projections (marginals only, no gradient).

    Returns ``mean_b -sum_{m, n} cos(o_m, t_n) * y_mn`` (eq. 11, the paper's weighted cosine;
    see the module docstring) with ``y`` the Sinkhorn plan (``eps``, ``iters``) for cost eq. 8
    and masses eq. 9 (rows) / eq. 10 (columns) (``cosine_marginals``: see
    :func:`instance_marginals`), in ``[-1, 1]``.
    """
    if o.dim() != 3 or o.shape != t.shape:
        raise ValueError(
            f"o and t must both be [B, K, D], got {tuple(o.shape)} and {tuple(t.shape)}"
        )
    t = t.detach()
    with torch.no_grad():
        row_mass, col_mass = instance_marginals(
            o.detach(),
            t,
            f_o1.detach(),
            f_o2.detach(),
            f_t1.detach(),
            f_t2.detach(),
            cosine_marginals,
        )
        plan = sinkhorn(instance_cost(o.detach(), t), row_mass, col_mass, eps, iters)  # eq. 7
    similarity = F.normalize(o, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)  # [B, K, K]
    return -(similarity * plan.to(similarity.dtype)).sum(dim=(1, 2)).mean()  # eq. 11


class UniVIPLoss(nn.Module):
    """Eq. 12: ``L_scene + L_scene-instance + L_instance``, equally weighted.

    Args:
        sinkhorn_eps, sinkhorn_iters: Sinkhorn regularisation and iterations (eq. 7; OTA's
            0.1 and 50).
        cosine_marginals: L2-normalise before the dot products of eq. 9-10 (default: raw).
        scene_form: ``"mse"`` (BYOL / ORL ``2 - 2 cos``, default) or ``"cosine"`` (``-cos``,
            eq. 2 / 5 literally) for the scene (eq. 3) and scene-instance (eq. 6) terms.

    ``forward`` returns ``{"loss": total, "scene": ..., "scene_instance": ..., "instance": ...}``;
    backpropagate ``loss``, log the others.
    """

    def __init__(
        self,
        scene_form: str = UniVIPLossConfig.scene_form,
        sinkhorn_eps: float = UniVIPLossConfig.sinkhorn_eps,
        sinkhorn_iters: int = UniVIPLossConfig.sinkhorn_iters,
        cosine_marginals: bool = UniVIPLossConfig.cosine_marginals,
    ) -> None:
        super().__init__()
        if sinkhorn_eps <= 0 or sinkhorn_iters < 1:
            raise ValueError(
                f"need sinkhorn_eps > 0 and sinkhorn_iters >= 1, got {sinkhorn_eps}, "
                f"{sinkhorn_iters}"
            )
        _scene_distance(scene_form)  # fail early on an unknown form
        self.eps = sinkhorn_eps
        self.iters = sinkhorn_iters
        self.cosine_marginals = cosine_marginals
        self.scene_form = scene_form

    def forward(
        self,
        p1: Tensor,
        p2: Tensor,
        z1: Tensor,
        z2: Tensor,
        inst: Tensor,
        o: Tensor,
        t: Tensor,
    ) -> dict[str, Tensor]:
        """``p1, p2, z1, z2, inst`` ``[B, D]``; ``o, t`` ``[B, K, D]`` (see the module docstring).
        The online scene predictions ``p1, p2`` are eq. 10's ``f_o1, f_o2``; ``z1, z2`` are
        eq. 9's ``f_t1, f_t2``."""
        terms = {
            "scene": scene_loss(p1, p2, z1, z2, self.scene_form),  # eq. 3
            "scene_instance": scene_instance_loss(inst, z1, z2, self.scene_form),  # eq. 6
            "instance": instance_loss(
                o, t, p1, p2, z1, z2, self.eps, self.iters, self.cosine_marginals
            ),  # eq. 11
        }
        total = terms["scene"] + terms["scene_instance"] + terms["instance"]  # eq. 12
        return {"loss": total, **terms}
