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

- Scene terms use the paper's negative cosine (eq. 2, 5), not BYOL's ``2 - 2 cos``: values lie in
  ``[-1, 1]`` per direction, and the gradient is half that of ``2 - 2 cos``.
- Every target-network tensor (``z1, z2, t``) is detached inside the loss.
- The transport plan (eq. 7) is computed without gradient, like the assignments of SwAV and the
  flows of DeepEMD's Sinkhorn layer: the cost (eq. 8) and marginals (eq. 9-10) are detached, the
  plan is a constant weight, and eq. 11 gives gradient to ``o`` through the cosine only.
- Plan layout: ``plan[b, m, n]``, row ``m`` = online instance ``o_m`` (supplier, mass ``b_m`` of
  eq. 9), column ``n`` = target instance ``t_n`` (demander, mass ``a_n`` of eq. 10), as in eq. 7
  (``sum_n y_mn = b_m``, ``sum_m y_mn = a_n``).
- Marginal features are L2-normalised before the dot products of eq. 9-10 (see
  :func:`instance_marginals`); the plan is normalised to total mass 1 per image, so eq. 11 is a
  weighted mean of cosines in ``[-1, 1]`` per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EPS = 0.05  # entropic regularisation; costs lie in [0, 2]
DEFAULT_ITERS = 100


def negative_cosine(x: Tensor, y: Tensor) -> Tensor:
    """``-cos(x, sg(y))`` per row (eq. 2 and eq. 5): ``[B, D], [B, D] -> [B]``."""
    return -F.cosine_similarity(x, y.detach(), dim=-1)


def scene_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric scene-scene loss (eq. 3) of BYOL's negative cosine (eq. 2), batch mean.

    ``p1, p2`` ``[B, D]`` online predictions of s1, s2; ``z1, z2`` ``[B, D]`` target projections.
    Returns ``mean(-cos(p1, z2)) + mean(-cos(p2, z1))``, in ``[-2, 2]``.
    """
    return negative_cosine(p1, z2).mean() + negative_cosine(p2, z1).mean()  # eq. 3


def scene_instance_loss(inst: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Scene-instance affinity (eq. 5-6), batch mean.

    ``inst`` ``[B, D]`` is ``I = f_linear(concat(o_1..o_K))`` (eq. 4, computed by the model);
    ``z1, z2`` ``[B, D]`` target projections of the two scene views. Both views hold the same K
    instances, so ``I`` is pulled towards both: ``mean(-cos(I, z1)) + mean(-cos(I, z2))``.
    """
    return negative_cosine(inst, z1).mean() + negative_cosine(inst, z2).mean()  # eq. 6


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
            (:func:`_round_to_marginals`), which makes both marginals exact.

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
    return _round_to_marginals(plan, a, b)


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
    cosine: bool = True,
) -> tuple[Tensor, Tensor]:
    """Eq. 9-10: masses of the online (rows) and target (columns) instances.

    ``b_m = max(o_m . (f_t1 + f_t2) / 2, 0)`` (eq. 9) and ``a_n = max(t_n . (f_o1 + f_o2) / 2, 0)``
    (eq. 10): an instance weighs by how much it agrees with the *other* network's view of the
    whole scene. ``o, t`` ``[B, K, D]``, scene features ``[B, D]``; returns ``(b, a)``, both
    ``[B, K]``, non-negative, unnormalised (:func:`sinkhorn` normalises).

    With ``cosine`` (default) every vector is L2-normalised first, so masses depend on direction
    only. The paper writes raw dot products; since the masses are renormalised per image, the
    two differ only in letting feature norms (arbitrary after the projection heads) reweight
    instances. ``cosine=False`` gives the literal formula.
    """
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
    cosine_marginals: bool = True,
) -> Tensor:
    """Instance-instance discrimination by optimal transport (eq. 8-11), batch mean.

    ``o`` ``[B, K, D]`` online instance outputs (gradient flows), ``t`` ``[B, K, D]`` target
    instance projections (detached); ``f_o1, f_o2`` ``[B, D]`` online scene outputs, ``f_t1,
    f_t2`` ``[B, D]`` target scene projections (marginals only, no gradient).

    Returns ``mean_b -sum_{m, n} cos(o_m, t_n) * y_mn`` (eq. 11) with ``y`` the Sinkhorn plan for
    cost eq. 8 and masses eq. 9 (rows) / eq. 10 (columns), in ``[-1, 1]``.
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

    ``forward`` returns ``{"loss": total, "scene": ..., "scene_instance": ..., "instance": ...}``;
    backpropagate ``loss``, log the others.
    """

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        iters: int = DEFAULT_ITERS,
        cosine_marginals: bool = True,
    ) -> None:
        super().__init__()
        if eps <= 0 or iters < 1:
            raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
        self.eps = eps
        self.iters = iters
        self.cosine_marginals = cosine_marginals

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
            "scene": scene_loss(p1, p2, z1, z2),  # eq. 3
            "scene_instance": scene_instance_loss(inst, z1, z2),  # eq. 6
            "instance": instance_loss(
                o, t, p1, p2, z1, z2, self.eps, self.iters, self.cosine_marginals
            ),  # eq. 11
        }
        total = terms["scene"] + terms["scene_instance"] + terms["instance"]  # eq. 12
        return {"loss": total, **terms}
