"""Method registry: name -> how to build the model, the loss, the step and the views.

Adding a method is one loss file in ``train/losses/`` plus one :func:`register` call here: a
loss-config dataclass, a recipe (config defaults taken from the method's paper), the view set it
reads from the loader, and a step function ``(model, loss, batch) -> {"loss": ..., terms...}``.

Which features feed each loss (``p``: online backbone -> projector -> predictor; ``z``: EMA
backbone -> EMA projector, stop-gradient):

- **mos** (MOS section 3.2, MoCo v3 framework): ``p`` and ``z`` of the four views single1,
  single2, multi1, multi2; :class:`train.losses.mos.MOSLoss` with global members.
- **univip** (UniVIP section 3, BYOL framework): ``p1, p2, z1, z2`` of the two scenes; the K
  instances through both branches: ``o`` = online *predictions* (the online network of BYOL
  and UniVIP eq. 2 includes the predictor, and eq. 9-11 pair ``o`` with target projections the
  way eq. 2 pairs ``p`` with ``z``), ``t`` = target projections; ``I`` = the model's linear map
  of ``concat(o_1..o_K)`` (eq. 4, ``K * D -> D``).
- **byol**: ``p1, p2, z1, z2`` of two crops, :func:`train.losses.byol.byol_loss`.
- **mocov3**: the same four tensors, :func:`train.losses.mocov3.mocov3_loss` (keys gathered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from train.config import ConfigError, TrainConfig, deep_merge, from_dict
from train.losses.byol import BYOLLoss
from train.losses.mocov3 import MoCoV3Loss
from train.losses.mos import DEFAULT_TEMPERATURE, MOSLoss, global_members, global_single_members
from train.losses.univip import DEFAULT_EPS, DEFAULT_ITERS, UniVIPLoss
from train.models import Encoder, SSLModel, build_backbone, mlp

__all__ = [
    "METHODS",
    "Method",
    "build_model",
    "get_method",
    "register",
    "resolve_config",
    "validate_config",
]


@dataclass(frozen=True)
class Method:
    name: str
    views: str  # the loader's view set: "mos" | "univip" | "multicrop"
    loss_config: type  # dataclass of the loss's hyper-parameters (the config's ``loss`` section)
    build_loss: Callable[[object], nn.Module]
    step: Callable[[SSLModel, nn.Module, dict], dict[str, Tensor]]
    terms: tuple[str, ...]  # loss terms logged besides "loss"
    recipe: dict = field(default_factory=dict)  # config defaults, nested like the YAML file
    build_extra: Callable[[TrainConfig, int], dict[str, nn.Module]] | None = None
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises with the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        ) from None


def build_model(cfg: TrainConfig) -> tuple[SSLModel, nn.Module]:
    """The method's model (backbone + heads + EMA target + extras) and its loss module."""
    method = get_method(cfg.method)
    backbone = build_backbone(cfg.model)
    feat_dim = backbone.num_features
    projector = mlp(feat_dim, cfg.model.projector, last_bn=cfg.model.projector_last_bn)
    out_dim = cfg.model.projector[-1]
    predictor = mlp(out_dim, cfg.model.predictor, last_bn=cfg.model.predictor_last_bn)
    if cfg.model.predictor[-1] != out_dim:
        raise ValueError(
            f"model.predictor must end with the projector's output size {out_dim}, "
            f"got {list(cfg.model.predictor)}"
        )
    loss = method.build_loss(cfg.loss)
    extra = method.build_extra(cfg, out_dim) if method.build_extra else None

    def step(model: SSLModel, batch: dict) -> dict[str, Tensor]:
        return method.step(model, loss, batch)

    return SSLModel(Encoder(backbone, projector), predictor, step, extra), loss


# --------------------------------------------------------------------------------------- MOS


@dataclass(frozen=True)
class MOSLossConfig:
    temperature: float = DEFAULT_TEMPERATURE  # MOS appendix D: 0.2
    scale_by_2tau: bool = True  # MoCo v3's 2 * tau factor (train.losses.mos)
    weight_m2s: float = 1.0  # eq. 14; 0 drops a term (table 4 ablation)
    weight_m2m: float = 1.0
    weight_s2s: float = 1.0


def _object_members(batch: dict, view: int) -> Tensor:
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


def _mos_step(model: SSLModel, loss: nn.Module, batch: dict) -> dict[str, Tensor]:
    """Four views through both branches; members per object, made global for gathered keys."""
    views = [batch["single1"], batch["single2"], batch["multi1"], batch["multi2"]]
    p_s1, p_s2, p_m1, p_m2 = model.predict(views)
    z_s1, z_s2, z_m1, z_m2 = model.project_target(views)
    b = batch["single1"].shape[0]
    return loss(
        p_m1,
        p_m2,
        p_s1,
        p_s2,
        z_m1,
        z_m2,
        z_s1,
        z_s2,
        global_members(_object_members(batch, 1), b),
        global_members(_object_members(batch, 2), b),
        global_single_members(b, device=p_s1.device),
    )


register(
    Method(
        name="mos",
        views="mos",
        loss_config=MOSLossConfig,
        build_loss=lambda c: MOSLoss(
            temperature=c.temperature,
            scale_by_2tau=c.scale_by_2tau,
            weight_m2s=c.weight_m2s,
            weight_m2m=c.weight_m2m,
            weight_s2s=c.weight_s2s,
        ),
        step=_mos_step,
        terms=("m2s", "m2m", "s2s"),
        # MOS appendix D, ViT-S/16 on ImageNet-1K. The lr value is lost from our copy of the
        # paper; 5e-4 per 256 (2e-3 at 1024) with min 1e-6 is the authors' PatchMix recipe
        # (visresearch/patchmix), which appendix D otherwise matches (AdamW, 10 warmup epochs,
        # wd cosine 0.04 -> 0.4, DropPath 0.1, 3/2-layer heads 4096 -> 256, tau 0.2).
        recipe={
            "data": {"batch_size": 1024, "size": 224},
            "model": {
                "backbone": "vit_small_patch16_224",
                "drop_path_rate": 0.1,
                "projector": [4096, 4096, 256],
                "predictor": [4096, 256],
                "projector_last_bn": True,
                "predictor_last_bn": False,
            },
            "optim": {
                "name": "adamw",
                "base_lr": 5e-4,
                "min_lr": 1e-6,
                "weight_decay": 0.04,
                "weight_decay_end": 0.4,
            },
            "schedule": {"epochs": 300, "warmup_epochs": 10},
            "ema": {"start": 0.992, "end": 1.0},
        },
        summary="Multiple Object Stitching: multi-to-single, multi-to-multi, single-to-single",
    )
)


# ------------------------------------------------------------------------------------ UniVIP


@dataclass(frozen=True)
class UniVIPLossConfig:
    sinkhorn_eps: float = DEFAULT_EPS
    sinkhorn_iters: int = DEFAULT_ITERS
    cosine_marginals: bool = True  # train.losses.univip.instance_marginals


# UniVIP section 4 "Optimization" on COCO (following ORL, the BYOL COCO setting): SGD,
# momentum 0.9, wd 1e-4, cosine lr with base 0.2 at batch 512 (0.1 per 256), 4 warmup epochs,
# 800 epochs, EMA 0.99 -> 1; ResNet-50 with BYOL's heads (2-layer MLPs, 4096 hidden, 256 out).
# BYOL, the baseline on the same shards, uses the same recipe.
_COCO_R50_RECIPE = {
    "model": {
        "backbone": "resnet50",
        "drop_path_rate": 0.0,
        "projector": [4096, 256],
        "predictor": [4096, 256],
        "projector_last_bn": False,
        "predictor_last_bn": False,
    },
    "optim": {
        "name": "sgd",
        "base_lr": 0.1,
        "min_lr": 0.0,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "momentum": 0.9,
    },
    "schedule": {"epochs": 800, "warmup_epochs": 4},
    "ema": {"start": 0.99, "end": 1.0},
}


def _univip_extra(cfg: TrainConfig, dim: int) -> dict[str, nn.Module]:
    # eq. 4: I = f_linear(concat(o_1, ..., o_K)), K * D -> D
    return {"instance_map": nn.Linear(cfg.data.num_instances * dim, dim)}


def _univip_step(model: SSLModel, loss: nn.Module, batch: dict) -> dict[str, Tensor]:
    """Scenes and instances through both branches, ``I`` from the online instance predictions."""
    instances = batch["instances"]  # [B, K, 3, h, w]
    b, k = instances.shape[:2]
    flat = instances.flatten(0, 1)  # [B * K, 3, h, w]
    p1, p2, o = model.predict([batch["scene1"], batch["scene2"], flat])
    z1, z2, t = model.project_target([batch["scene1"], batch["scene2"], flat])
    o = o.view(b, k, -1)  # [B, K, D] online instance outputs
    t = t.view(b, k, -1)  # [B, K, D] target instance projections
    inst = model.extra["instance_map"](o.flatten(1))  # eq. 4, [B, D]
    return loss(p1, p2, z1, z2, inst, o, t)


register(
    Method(
        name="univip",
        views="univip",
        loss_config=UniVIPLossConfig,
        build_loss=lambda c: UniVIPLoss(
            eps=c.sinkhorn_eps, iters=c.sinkhorn_iters, cosine_marginals=c.cosine_marginals
        ),
        step=_univip_step,
        terms=("scene", "scene_instance", "instance"),
        build_extra=_univip_extra,
        recipe={
            "data": {"batch_size": 512, "size": 224, "instance_size": 96, "num_instances": 4},
            **_COCO_R50_RECIPE,
        },
        summary="UniVIP: scene-scene, scene-instance, instance-instance (optimal transport)",
    )
)


# ------------------------------------------------------------------------- BYOL and MoCo v3


@dataclass(frozen=True)
class BYOLLossConfig:
    pass


@dataclass(frozen=True)
class MoCoV3LossConfig:
    temperature: float = DEFAULT_TEMPERATURE  # MoCo v3 ViT: 0.2


def _two_view_step(model: SSLModel, loss: nn.Module, batch: dict) -> dict[str, Tensor]:
    """The first two global crops through both branches (BYOL and MoCo v3)."""
    crops = batch["crops"]
    if len(crops) < 2:
        raise ValueError(f"two-view methods need at least 2 global crops, got {len(crops)}")
    p1, p2 = model.predict(crops[:2])
    z1, z2 = model.project_target(crops[:2])
    return loss(p1, p2, z1, z2)


register(
    Method(
        name="byol",
        views="multicrop",
        loss_config=BYOLLossConfig,
        build_loss=lambda c: BYOLLoss(),
        step=_two_view_step,
        terms=(),
        # BYOL as the baseline on the same shards as UniVIP: UniVIP's COCO optimisation (the
        # ORL/BYOL COCO setting); BYOL's ImageNet recipe (LARS, base lr 0.2, wd 1.5e-6,
        # EMA 0.996) is in docs/training.md.
        recipe={
            "data": {"batch_size": 512, "size": 224},
            **_COCO_R50_RECIPE,
        },
        summary="BYOL: 2 - 2 cos between online predictions and target projections",
    )
)

register(
    Method(
        name="mocov3",
        views="multicrop",
        loss_config=MoCoV3LossConfig,
        build_loss=lambda c: MoCoV3Loss(temperature=c.temperature),
        step=_two_view_step,
        terms=(),
        # MoCo v3 (Chen, Xie, He 2021) ViT-S/16: AdamW, base lr 1.5e-4, wd 0.1, 40 warmup
        # epochs, 3-layer projector / 2-layer predictor (4096 -> 256), momentum 0.99 -> 1, tau 0.2.
        recipe={
            "data": {"batch_size": 1024, "size": 224},
            "model": {
                "backbone": "vit_small_patch16_224",
                "drop_path_rate": 0.0,
                "projector": [4096, 4096, 256],
                "predictor": [4096, 256],
                "projector_last_bn": True,
                "predictor_last_bn": False,
            },
            "optim": {
                "name": "adamw",
                "base_lr": 1.5e-4,
                "min_lr": 0.0,
                "weight_decay": 0.1,
                "weight_decay_end": 0.1,
            },
            "schedule": {"epochs": 300, "warmup_epochs": 40},
            "ema": {"start": 0.99, "end": 1.0},
        },
        summary="MoCo v3: InfoNCE between predictions and gathered momentum keys",
    )
)


# ------------------------------------------------------------------------------- resolution


def resolve_config(*layers: dict) -> TrainConfig:
    """The typed config from layers of nested dicts, later layers winning.

    The method (``method`` key of the merged layers, default ``mos``) puts its recipe under the
    layers; the ``loss`` section is checked against the method's loss dataclass. Unknown keys,
    wrong types and out-of-range values raise :class:`ConfigError`.
    """
    merged: dict = {}
    for layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"a config layer must be a mapping, got {type(layer).__name__}")
        merged = deep_merge(merged, layer)
    name = merged.get("method", TrainConfig.method)
    if not isinstance(name, str):
        raise ConfigError(f"method: expected str, got {type(name).__name__} {name!r}")
    try:
        method = get_method(name)
    except ValueError as e:
        raise ConfigError(f"method: {e}") from None
    merged = deep_merge(method.recipe, merged)
    merged["method"] = name
    loss = merged.pop("loss", None)
    cfg = from_dict(TrainConfig, merged)
    loss_cfg = from_dict(method.loss_config, {} if loss is None else loss, prefix="loss.")
    cfg = cfg.replace(loss=loss_cfg)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Range checks that types alone cannot express; raises :class:`ConfigError`."""
    checks = [
        ("data.batch_size", cfg.data.batch_size >= 1, ">= 1"),
        ("data.size", cfg.data.size >= 1, ">= 1"),
        ("data.instance_size", cfg.data.instance_size >= 1, ">= 1"),
        ("data.num_instances", cfg.data.num_instances >= 1, ">= 1"),
        (
            "data.num_threads",
            cfg.data.num_threads is None or cfg.data.num_threads >= 1,
            ">= 1 or null",
        ),
        ("data.workers", cfg.data.workers is None or cfg.data.workers >= 0, ">= 0 or null"),
        ("data.synthetic_samples", cfg.data.synthetic_samples >= 1, ">= 1"),
        (
            "model.projector",
            all(s >= 1 for s in cfg.model.projector) and cfg.model.projector,
            "non-empty, sizes >= 1",
        ),
        (
            "model.predictor",
            all(s >= 1 for s in cfg.model.predictor) and cfg.model.predictor,
            "non-empty, sizes >= 1",
        ),
        ("model.drop_path_rate", 0.0 <= cfg.model.drop_path_rate < 1.0, "in [0, 1)"),
        ("optim.base_lr", cfg.optim.base_lr >= 0, ">= 0"),
        ("optim.min_lr", cfg.optim.min_lr >= 0, ">= 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, ">= 0"),
        ("optim.weight_decay_end", cfg.optim.weight_decay_end >= 0, ">= 0"),
        ("optim.momentum", 0.0 <= cfg.optim.momentum < 1.0, "in [0, 1)"),
        ("optim.betas", all(0.0 <= b < 1.0 for b in cfg.optim.betas), "in [0, 1)"),
        ("optim.lars_eta", cfg.optim.lars_eta > 0, "> 0"),
        ("optim.clip_grad", cfg.optim.clip_grad >= 0, ">= 0 (0 disables clipping)"),
        ("schedule.epochs", cfg.schedule.epochs >= 1, ">= 1"),
        ("schedule.steps", cfg.schedule.steps is None or cfg.schedule.steps >= 1, ">= 1 or null"),
        ("schedule.warmup_epochs", cfg.schedule.warmup_epochs >= 0, ">= 0"),
        ("ema.start", 0.0 <= cfg.ema.start <= 1.0, "in [0, 1]"),
        ("ema.end", 0.0 <= cfg.ema.end <= 1.0, "in [0, 1]"),
        ("run.log_every", cfg.run.log_every >= 1, ">= 1"),
        ("run.ckpt_every", cfg.run.ckpt_every >= 1, ">= 1"),
        ("run.keep_last", cfg.run.keep_last >= 1, ">= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}, got {_value(cfg, key)!r}")


def _value(cfg: TrainConfig, key: str) -> object:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
