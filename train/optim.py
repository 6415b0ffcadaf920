"""Optimizers: AdamW (MOS, MoCo v3), SGD (UniVIP on COCO) and LARS (BYOL on ImageNet).

Parameters go into two groups: ``regularized`` (weights of rank >= 2) and ``plain`` (biases and
other 1-D parameters: norms, BN affine; DINO's ``get_params_groups``). With
``optim.exclude_bias_norm`` the plain group gets no weight decay and, under LARS, no trust-ratio
adaptation (BYOL appendix C). The loop sets ``lr`` and ``weight_decay`` of every group at every
step from the schedules (:func:`set_hyperparameters`); nothing else changes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.config import OptimConfig

__all__ = ["LARS", "build_optimizer", "clip_gradients", "param_groups", "set_hyperparameters"]


def param_groups(model: nn.Module, exclude_bias_norm: bool = True) -> list[dict]:
    """Trainable parameters split into ``regularized`` and ``plain`` groups (see module doc)."""
    regularized, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exclude_bias_norm and (p.ndim <= 1 or name.endswith(".bias")):
            plain.append(p)
        else:
            regularized.append(p)
    groups = [{"params": regularized, "regularized": True, "lars_adapt": True}]
    if plain:
        groups.append({"params": plain, "regularized": False, "lars_adapt": False})
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017; BYOL appendix C).

    For a parameter ``w`` with gradient ``g`` in a group with ``lars_adapt``:
    ``g <- g + wd * w``, ``g <- g * eta * ||w|| / ||g||`` (when both norms are > 0), then
    ``v <- momentum * v + g`` and ``w <- w - lr * v``. Groups without ``lars_adapt`` take plain
    SGD with momentum.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_adapt=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over :func:`param_groups`; lr and weight decay start
    at 0 and are set per step by :func:`set_hyperparameters`. ``fused`` selects the fused CUDA
    kernels of AdamW / SGD."""
    groups = param_groups(model, cfg.exclude_bias_norm)
    if cfg.name == "adamw":
        kwargs = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, weight_decay=0.0, **kwargs)
    if cfg.name == "sgd":
        kwargs = {"fused": True} if fused else {}
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=0.0, **kwargs)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of: adamw, sgd, lars")


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's lr for every group and weight decay for the regularised group(s)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("regularized", True) else 0.0


@torch.no_grad()
def clip_gradients(params: list[Tensor], max_norm: float, per_param: bool = False) -> None:
    """Clip gradients to ``max_norm``: the global norm over all of ``params``
    (``torch.nn.utils.clip_grad_norm_``, MoCo v3's and most recipes' form) or, with
    ``per_param``, each parameter's gradient on its own, scaled by ``max_norm / (norm + 1e-6)``
    where that is below 1 (DINO's ``utils.clip_gradients``, ``--clip_grad 3.0``)."""
    if not per_param:
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    for p in params:
        if p.grad is None:
            continue
        coef = max_norm / (torch.linalg.vector_norm(p.grad) + 1e-6)
        p.grad.mul_(torch.clamp(coef, max=1.0))
