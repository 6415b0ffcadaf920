"""Models by composition: a timm backbone, MLP heads built from lists of sizes, an EMA target.

Nothing here inherits from a base method. One :class:`SSLModel` holds

- ``online``: :class:`Encoder` = backbone + projector (trained by gradient);
- ``predictor``: MLP on the online projections (BYOL / MoCo v3 / MOS / UniVIP all have one);
- ``target``: a copy of ``online`` updated only by :func:`update_momentum` (the momentum /
  EMA encoder, stop-gradient), built without stochastic depth or dropout
  (:func:`deterministic_copy`, as MoCo v3, DINO and PatchMix build theirs): a deterministic
  function of its weights and input, BatchNorm batch statistics aside;
- ``extra``: method-specific trainable modules (UniVIP's instance linear map, eq. 4);
- ``loss``: the method's loss module (``train.losses``), a registered submodule: it moves to
  the model's device with it, and any state it holds is in the model's ``state_dict`` and so in
  every checkpoint (the four losses today hold none, so their ``state_dict`` is empty);

and ``momentum_pairs``, the explicit list of ``(online, ema)`` module pairs that
:func:`update_momentum` walks (solo-learn's ``momentum_pairs``). The method's step function
(``train.methods``) decides which views go through which branch and calls ``model.loss`` on
their outputs, as DINO's loop calls ``dino_loss(student_output, teacher_output, epoch)``;
``SSLModel.forward`` only calls the step, so that DDP sees one forward per step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from train.config import ModelConfig

__all__ = [
    "DINOHead",
    "Encoder",
    "SSLModel",
    "build_backbone",
    "deterministic_copy",
    "freeze_patch_embed",
    "has_batchnorm",
    "has_local_batchnorm",
    "has_sync_batchnorm",
    "mlp",
    "update_momentum",
    "WeightNormLinear",
]


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """``timm.create_model(cfg.backbone, num_classes=0, ...)``: pooled features ``[B, F]``.

    ``img_size`` / ``patch_size`` are passed only when set (ViTs; e.g. ``vit_tiny_patch16_224``
    with ``img_size=32, patch_size=2`` is MOS's ViT-T/2 for CIFAR). Never downloads weights.
    """
    import timm

    kwargs = dict(cfg.backbone_kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if not timm.is_model(cfg.backbone):
        close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:12]
        raise ValueError(
            f"unknown timm backbone {cfg.backbone!r}; e.g. {', '.join(close) or 'see timm.list_models()'}"
        )
    try:
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm.create_model({cfg.backbone!r}, **{kwargs}): {e}") from None


def freeze_patch_embed(backbone: nn.Module) -> int:
    """MoCo v3's ViT trick (section 4.2, "random patch projection"): keep the patch projection
    at its random initialisation (no gradient, so the optimizer never sees it). Returns the
    number of frozen tensors; a backbone without ``patch_embed`` raises ``ValueError``."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if not isinstance(patch_embed, nn.Module):
        raise ValueError(
            f"model.freeze_patch_embed needs a ViT-style backbone with a patch_embed module; "
            f"{type(backbone).__name__} has none (--set model.freeze_patch_embed=false)"
        )
    params = list(patch_embed.parameters())
    for p in params:
        p.requires_grad_(False)
    return len(params)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers (whose statistics span the samples of a call)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def has_sync_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds SyncBatchNorm layers (statistics over every rank's samples)."""
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def has_local_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers that are not SyncBatchNorm: their running
    statistics differ from rank to rank under DDP."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        for m in module.modules()
    )


def deterministic_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every stochastic layer switched off: dropout rates and
    stochastic-depth / drop-block probabilities set to 0 (timm's ``DropPath``, ``DropBlock2d``
    and the attention dropout read them at call time). Train-mode BatchNorm still uses batch
    statistics, the one non-determinism the momentum encoders of BYOL and MoCo v3 keep."""
    copy_ = copy.deepcopy(module)
    for m in copy_.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if isinstance(getattr(m, "drop_prob", None), float):
            m.drop_prob = 0.0
    return copy_


def mlp(in_dim: int, sizes: Sequence[int], last_bn: bool = False) -> nn.Sequential:
    """An MLP from a list of layer output sizes: ``[Linear, BN, ReLU] * (n - 1) + [Linear]``.

    Hidden layers have BatchNorm and ReLU (BYOL section 3.3, MoCo v3 section 4.1) and no bias
    (the BN shift replaces it). The last layer has a bias, or, with ``last_bn``, no bias and a
    ``BatchNorm1d(affine=False)`` after it (MoCo v3's projector, which MOS adopts).
    ``mlp(384, (4096, 4096, 256), last_bn=True)`` is MOS's 3-layer projector for ViT-S.
    """
    if not sizes:
        raise ValueError("an MLP needs at least one layer size")
    layers: list[nn.Module] = []
    dim = in_dim
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        layers.append(nn.Linear(dim, size, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(size), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(size, affine=False))
        dim = size
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation (Salimans & Kingma 2016):
    ``weight = g * v / ||v||`` per output row, ``g`` of shape ``[out, 1]``.

    The parameters are named ``weight_g`` and ``weight_v``, the keys of
    ``torch.nn.utils.weight_norm(nn.Linear(...))`` that DINO's head uses, so a checkpoint of
    DINO's head maps key for key; written as plain parameters (no forward pre-hook), so the
    module deep-copies into the EMA teacher like any other.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # torch's default init
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        v = self.weight_v
        weight = v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))
        return nn.functional.linear(x, weight)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, section 3.1 and appendix; ``DINOHead`` of
    facebookresearch/dino ``vision_transformer.py``): an MLP of ``sizes`` (hidden layers with
    GELU, no BatchNorm: the reference's ``use_bn_in_head=False``; the last size is the
    bottleneck, 256), an l2 normalisation, then a weight-normalised linear layer of ``out_dim``
    outputs (65,536) without bias.

    ``DINOHead(384, (2048, 2048, 256), 65536)`` is the reference's 3-layer head for ViT-S. The
    MLP's linear layers start from a truncated normal of std 0.02 with zero bias, the last
    layer from torch's default with ``g = 1``; with ``norm_last_layer`` ``g`` stays 1 (no
    gradient), so every output is a cosine between the normalised bottleneck and a prototype.
    """

    def __init__(
        self, in_dim: int, sizes: Sequence[int], out_dim: int, norm_last_layer: bool = True
    ) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("the DINO head needs at least its bottleneck size")
        layers: list[nn.Module] = []
        dim = in_dim
        for i, size in enumerate(sizes):
            layers.append(nn.Linear(dim, size))
            if i < len(sizes) - 1:
                layers.append(nn.GELU())
            dim = size
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class Encoder(nn.Module):
    """Backbone + projector. ``forward(views)`` runs a list of views and returns one projection
    ``[B_i, D]`` per view.

    With ``group_views`` views of equal shape share one backbone call (``torch.cat``: one big
    batch, better GPU use; exact for ViTs, whose LayerNorm is per sample). Without it every
    view is its own backbone call, so a ResNet's BatchNorm normalises each view as its own
    batch, as BYOL and ORL do (one ``online_net(img_v)`` per view). The projector always runs
    per view, so the heads' BN statistics are per view, as in BYOL and MoCo v3.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, group_views: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.group_views = group_views

    def features(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Backbone features ``[B_i, F]`` per view (views of equal shape grouped, if enabled)."""
        out: list[Tensor | None] = [None] * len(views)
        groups: dict[tuple, list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(tuple(v.shape[1:]) if self.group_views else (i,), []).append(i)
        for idx in groups.values():
            x = views[idx[0]] if len(idx) == 1 else torch.cat([views[i] for i in idx])
            feats = self.backbone(x).split([views[i].shape[0] for i in idx])
            for i, f in zip(idx, feats, strict=True):
                out[i] = f
        return out  # type: ignore[return-value]

    def forward(self, views: Sequence[Tensor]) -> list[Tensor]:
        return [self.projector(f) for f in self.features(views)]


class SSLModel(nn.Module):
    """Online encoder + predictor + EMA target (+ method extras) and the method's loss, see
    the module docstring.

    ``step_fn(model, batch) -> dict[str, Tensor]`` is the method's step (views through the
    branches, then ``model.loss`` on their outputs: the loss terms, ``"loss"`` to
    backpropagate); ``forward`` delegates to it.
    """

    def __init__(
        self,
        online: Encoder,
        predictor: nn.Module,
        loss: nn.Module,
        step_fn: Callable[[SSLModel, dict], dict[str, Tensor]],
        extra: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.online = online
        self.predictor = predictor
        self.target = deterministic_copy(online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.extra = nn.ModuleDict(extra or {})
        self.loss = loss
        self.step_fn = step_fn

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, ema)`` module pairs of identical structure, walked by ``update_momentum``."""
        return [(self.online, self.target)]

    def predict(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Online branch: backbone -> projector -> predictor, one ``[B_i, D]`` per view."""
        return [self.predictor(z) for z in self.online(views)]

    @torch.no_grad()
    def project_target(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Target branch (stop-gradient): EMA backbone -> EMA projector, ``[B_i, D]`` per view."""
        return [z.detach() for z in self.target(views)]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """The method's step on one batch (``Method.step``, e.g. ``train.methods._mos_step``):
        the views through the branches, then ``self.loss`` (e.g. MOS's eq. 11-13 summed as
        eq. 14). The trainer calls it as ``module(batch)``, where ``module`` is this model or
        its DDP wrapper: DDP synchronises gradients of what runs inside ``forward`` only."""
        return self.step_fn(self, batch)


@torch.no_grad()
def update_momentum(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``ema = m * ema + (1 - m) * online`` for every parameter of every pair (UniVIP eq. 1,
    BYOL, MoCo). Buffers (BN running statistics) are left to each module's own forward passes,
    as in BYOL and MoCo v3. ``momentum = 1`` leaves the EMA unchanged."""
    for online, ema in pairs:
        ema_params = list(ema.parameters())
        online_params = list(online.parameters())
        if len(ema_params) != len(online_params):
            raise ValueError("momentum pair modules have different parameter lists")
        if momentum < 1.0:
            torch._foreach_lerp_(ema_params, online_params, 1.0 - momentum)
