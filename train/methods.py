"""Method registry: name -> how to build the model, the loss, the step and the views.

Adding a method is one loss file in ``train/losses/`` (the loss and its config dataclass, with
the same field names) plus one :func:`register` call here: the config dataclass, a recipe
(config defaults taken from the method's paper), the view set it reads from the loader, and a
step function ``(model, batch) -> {"loss": ..., terms...}`` that
sends the views through the branches and calls the model's loss (``model.loss``, built by the
method's ``build_loss``) on their outputs. Layers to a checked config (the recipe under the
layers, the ``loss`` section against the loss dataclass): :mod:`train.resolve`.

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
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import Tensor, nn

from pipeline.layout import MOS_GRID_CHOICES, MOS_SCALE_CHOICES
from train.config import TrainConfig
from train.losses.byol import BYOLLoss, BYOLLossConfig
from train.losses.dino import DINOConfig, DINOLoss, teacher_temp_schedule
from train.losses.mocov3 import MoCoV3Loss, MoCoV3LossConfig
from train.losses.mos import (
    MOSLoss,
    MOSLossConfig,
    global_members,
    global_single_members,
    object_members,
)
from train.losses.univip import UniVIPLoss, UniVIPLossConfig
from train.models import (
    DINOHead,
    Encoder,
    SSLModel,
    build_backbone,
    freeze_patch_embed,
    has_batchnorm,
    mlp,
)
from train.schedules import MethodSchedules

__all__ = [
    "METHODS",
    "Method",
    "build_model",
    "forward_equivalents",
    "get_method",
    "register",
]


@dataclass(frozen=True)
class Method:
    name: str
    views: str  # the loader's view set: "mos" | "univip" | "multicrop"
    loss_config: type  # dataclass of the loss's hyper-parameters (the config's ``loss`` section)
    build_loss: Callable[[object], nn.Module]
    step: Callable[[SSLModel, dict], dict[str, Tensor]]  # views -> branches -> model.loss
    terms: tuple[str, ...]  # loss terms logged besides "loss"
    recipe: dict = field(default_factory=dict)  # config defaults, nested like the YAML file
    build_extra: Callable[[TrainConfig, int], dict[str, nn.Module]] | None = None
    summary: str = ""
    # (cfg, backbone feature size) -> (projector, predictor), when not the MLPs of
    # model.projector / model.predictor (DINO: its own head, no predictor)
    build_heads: Callable[[TrainConfig, int], tuple[nn.Module, nn.Module]] | None = None
    # the method's own per-step schedules, read by its step from batch["hyper"]
    schedules: MethodSchedules | None = None
    # (model, this step's hyper values) after backward and clipping, before the update
    on_gradients: Callable[[SSLModel, dict[str, float]], None] | None = None


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


def forward_equivalents(cfg: TrainConfig) -> float:
    """Backbone cost of one training sample of ``cfg``: a pass with gradient counts 3, one
    without 1, each times its pixels over ``data.size ** 2``. MOS (paper form) 9, symmetric
    16; MoCo v3 and BYOL 8; UniVIP 8 + 4 K (instance_size / size)^2; DINO 8 + 3 per local
    crop times (local_size / size)^2. ``ssl-cli bench quality`` spends equal budgets in these
    units, and the trainer's start estimates a CPU step with them."""
    d = cfg.data
    if cfg.method == "mos":
        loss = METHODS["mos"].build_loss(cfg.loss)  # the loss knows which views it needs
        return 3.0 * len(loss.query_views) + 1.0 * len(loss.key_views)
    if cfg.method == "univip":
        area = (d.instance_size / d.size) ** 2
        return 3.0 * 2 + 2 + d.num_instances * area * (3 + 1)
    if cfg.method in ("byol", "mocov3"):
        return 3.0 * 2 + 2
    if cfg.method == "dino":  # every crop through the student, the 2 globals through the teacher
        v = cfg.data.views
        area = (v.get("local_size", 96) / d.size) ** 2
        return 3.0 * 2 + 2 + v.get("num_local", 0) * area * 3
    raise ValueError(f"no forward-equivalent count for method {cfg.method!r}")


def build_model(cfg: TrainConfig, method: Method | None = None) -> tuple[SSLModel, nn.Module]:
    """The method's model (backbone + heads + EMA target + extras + loss) and, second, its loss
    module: the same object as ``model.loss``, a submodule of the model. ``method``: the
    registry entry of ``cfg.method`` when the caller has it already (:func:`build_parts`)."""
    method = method if method is not None else get_method(cfg.method)
    backbone = build_backbone(cfg.model)
    if cfg.model.freeze_patch_embed:
        freeze_patch_embed(backbone)
    feat_dim = backbone.num_features
    if method.build_heads is not None:
        projector, predictor = method.build_heads(cfg, feat_dim)
        out_dim = cfg.model.projector[-1]
    else:
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
    if cfg.model.batch_views == "auto":
        group = not has_batchnorm(backbone)
    else:
        group = cfg.model.batch_views == "grouped"
    online = Encoder(backbone, projector, group_views=group)
    model = SSLModel(online, predictor, loss, method.step, extra)
    return model, model.loss


# --------------------------------------------------------------------------------------- MOS


def _mos_step(model: SSLModel, batch: dict) -> dict[str, Tensor]:
    """The loss's query views through the base branch, its key views through the momentum one,
    then :class:`~train.losses.mos.MOSLoss` on them by view name.

    With ``loss.form = "paper"`` (section 3.2) that is ``single1, multi2`` with gradient and
    ``single1, single2, multi1`` without: 2 + 3 passes. Members per object, made global for
    the gathered keys.
    """
    b = batch["single1"].shape[0]
    single = global_single_members(b, device=batch["single1"].device)
    members = {
        "single1": single,
        "single2": single,
        "multi1": global_members(object_members(batch, 1), b),
        "multi2": global_members(object_members(batch, 2), b),
    }
    loss = model.loss
    queries = dict(zip(loss.query_views, model.predict([batch[v] for v in loss.query_views])))
    keys = dict(zip(loss.key_views, model.project_target([batch[v] for v in loss.key_views])))
    return model.loss(queries, keys, members)


register(
    Method(
        name="mos",
        views="mos",
        loss_config=MOSLossConfig,
        build_loss=lambda c: MOSLoss(**asdict(c)),
        step=_mos_step,
        terms=("m2s", "m2m", "s2s"),
        # MOS appendix D, ViT-S/16 on ImageNet-1K, value by value. "PatchMix" is the same
        # group's code (visresearch/patchmix, config/pretrain/vit_small_pretrain.py), cited
        # where our copy of the paper lost the number.
        recipe={
            "data": {
                "batch_size": 1024,  # appendix D: "with a batch size of 1024"
                "size": 224,  # section 4.1: ImageNet images at 224 x 224
                "views": {
                    # appendix D: "both r and s are randomly sampled from" a set lost in our
                    # copy; {1, 2} is our reading of table 5, declared once in pipeline/layout.py
                    "grid_choices": list(MOS_GRID_CHOICES),
                    "scale_choices": list(MOS_SCALE_CHOICES),
                },
            },
            "model": {
                "backbone": "vit_small_patch16_224",  # ViT-S/16
                "drop_path_rate": 0.1,  # appendix D: "DropConnect with drop rate of 0.1"
                "projector": [4096, 4096, 256],  # appendix D: 3-layer MLP, 4096 hidden, 256 out
                "predictor": [4096, 256],  # appendix D: 2-layer MLP
                "projector_last_bn": True,  # MoCo v3 heads (PatchMix contrast_momentum.py)
                "predictor_last_bn": False,  # PatchMix builds the predictor without it
            },
            "optim": {
                "name": "adamw",  # appendix D: AdamW
                "base_lr": 5e-4,  # lost in our copy; PatchMix ViT-S: 5e-4 per 256
                "min_lr": 1e-6,  # PatchMix ViT-S: min_lr 1e-6
                "weight_decay": 0.04,  # appendix D: cosine from 0.04 ...
                "weight_decay_end": 0.4,  # ... to 0.4
            },
            # 300 epochs: tables 1, 3 (ViT-S/16, 300 epochs); appendix D: 10 warmup epochs
            "schedule": {"epochs": 300, "warmup_epochs": 10},
            "ema": {"start": 0.992, "end": 1.0},  # appendix D: cosine from 0.992 to 1.0
        },
        summary="Multiple Object Stitching: multi-to-single, multi-to-multi, single-to-single",
    )
)


# ------------------------------------------------------------------------------------ UniVIP


# UniVIP section 4 "Optimization" on COCO, which "fully follow[s]" ORL (Jiahao000/ORL,
# configs/selfsup/orl/coco/stage1/r50_bs512_ep800.py, its BYOL stage on COCO), value by value.
# BYOL, the baseline on the same shards, uses the same recipe (UniVIP table 7 compares them).
_COCO_R50_RECIPE = {
    "model": {
        "backbone": "resnet50",  # UniVIP section 4, ORL: ResNet-50
        "drop_path_rate": 0.0,
        "projector": [4096, 256],  # ORL neck: 2 layers, 4096 hidden, 256 out
        "predictor": [4096, 256],  # ORL LatentPredictHead: 2 layers, 4096 hidden, 256 out
        "projector_last_bn": False,  # ORL: with_last_bn=False
        "predictor_last_bn": False,
        "batch_views": "per_view",  # ORL/BYOL: one online_net(img) call per view
        "sync_bn": True,  # ORL: norm_cfg=dict(type="SyncBN") in the backbone, sync_bn heads
    },
    "optim": {
        "name": "sgd",  # UniVIP section 4, ORL: SGD
        "base_lr": 0.2,  # UniVIP: base lr 0.2; ORL: lr 0.4 at batch 512 = 0.2 per 256
        "min_lr": 0.0,  # ORL: CosineAnnealing, min_lr=0
        "weight_decay": 1e-4,  # UniVIP section 4, ORL: 0.0001
        "weight_decay_end": 1e-4,  # constant
        "momentum": 0.9,  # UniVIP section 4, ORL: 0.9
    },
    # ORL: total_epochs = 800, linear warmup over 4 epochs (warmup_iters=4, by epoch)
    "schedule": {"epochs": 800, "warmup_epochs": 4},
    "ema": {"start": 0.99, "end": 1.0},  # ORL: base_momentum=0.99, BYOLHook end_momentum=1
}


def _univip_extra(cfg: TrainConfig, dim: int) -> dict[str, nn.Module]:
    # eq. 4: I = f_linear(concat(o_1, ..., o_K)), K * D -> D
    return {"instance_map": nn.Linear(cfg.data.num_instances * dim, dim)}


def _univip_step(model: SSLModel, batch: dict) -> dict[str, Tensor]:
    """Scenes and instances through both branches, ``I`` from the online instance predictions."""
    instances = batch["instances"]  # [B, K, 3, h, w]
    b, k = instances.shape[:2]
    flat = instances.flatten(0, 1)  # [B * K, 3, h, w]
    p1, p2, o = model.predict([batch["scene1"], batch["scene2"], flat])
    z1, z2, t = model.project_target([batch["scene1"], batch["scene2"], flat])
    o = o.view(b, k, -1)  # [B, K, D] online instance outputs
    t = t.view(b, k, -1)  # [B, K, D] target instance projections
    inst = model.extra["instance_map"](o.flatten(1))  # eq. 4, [B, D]
    return model.loss(p1, p2, z1, z2, inst, o, t)  # eq. 12


register(
    Method(
        name="univip",
        views="univip",
        loss_config=UniVIPLossConfig,
        build_loss=lambda c: UniVIPLoss(**asdict(c)),
        step=_univip_step,
        terms=("scene", "scene_instance", "instance"),
        build_extra=_univip_extra,
        recipe={
            "data": {
                "batch_size": 512,  # ORL: 64 per GPU x 8 GPUs
                "size": 224,  # ORL: RandomResizedCrop(224)
                "instance_size": 96,  # UniVIP section 3.3: instances resized to 96 x 96
                "num_instances": 4,  # UniVIP table 8(c): K = 4 is best
            },
            **_COCO_R50_RECIPE,
        },
        summary="UniVIP: scene-scene, scene-instance, instance-instance (optimal transport)",
    )
)


# ------------------------------------------------------------------------- BYOL and MoCo v3


def _two_view_step(model: SSLModel, batch: dict) -> dict[str, Tensor]:
    """The first two global crops through both branches (BYOL and MoCo v3)."""
    crops = batch["crops"]
    if len(crops) < 2:
        raise ValueError(f"two-view methods need at least 2 global crops, got {len(crops)}")
    p1, p2 = model.predict(crops[:2])
    z1, z2 = model.project_target(crops[:2])
    return model.loss(p1, p2, z1, z2)


register(
    Method(
        name="byol",
        views="multicrop",
        loss_config=BYOLLossConfig,
        build_loss=lambda c: BYOLLoss(**asdict(c)),
        step=_two_view_step,
        terms=(),
        # BYOL as the baseline on the same shards as UniVIP, with UniVIP's COCO recipe (the
        # ORL stage-1 BYOL run on COCO; UniVIP table 7 compares the two on it). BYOL's own
        # ImageNet recipe (LARS, base lr 0.2, wd 1.5e-6, EMA 0.996) is in docs/training.md.
        recipe={
            "data": {"batch_size": 512, "size": 224},  # ORL: batch 512, 224-px crops
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
        build_loss=lambda c: MoCoV3Loss(**asdict(c)),
        step=_two_view_step,
        terms=(),
        # MoCo v3 (Chen, Xie, He, ICCV 2021) ViT-S/16, value by value from its reference
        # recipe (facebookresearch/moco-v3, CONFIG.md: main_moco.py -a vit_small -b 1024
        # --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --epochs=300 --warmup-epochs=40
        # --stop-grad-conv1 --moco-m-cos --moco-t=.2) and its paper (section 4.1, table 1).
        recipe={
            "data": {"batch_size": 1024, "size": 224},  # -b 1024; 224-px crops
            "model": {
                "backbone": "vit_small_patch16_224",  # -a vit_small
                "drop_path_rate": 0.0,  # MoCo v3 ViTs: no stochastic depth
                "projector": [4096, 4096, 256],  # section 4.1: 3-layer projector, 4096 -> 256
                "predictor": [4096, 256],  # section 4.1: 2-layer predictor
                "projector_last_bn": True,  # moco-v3 _build_mlp(last_bn=True) for the projector
                "predictor_last_bn": False,  # and last_bn=False for the predictor
                "freeze_patch_embed": True,  # --stop-grad-conv1 (section 4.2)
            },
            "optim": {
                "name": "adamw",  # --optimizer=adamw
                "base_lr": 1.5e-4,  # --lr=1.5e-4 (per 256, main_moco.py scales by batch/256)
                "min_lr": 0.0,  # main_moco.py: cosine decay to 0
                "weight_decay": 0.1,  # --weight-decay=.1 (constant)
                "weight_decay_end": 0.1,
            },
            "schedule": {"epochs": 300, "warmup_epochs": 40},  # --epochs=300 --warmup-epochs=40
            "ema": {"start": 0.99, "end": 1.0},  # --moco-m 0.99 (default) with --moco-m-cos
        },
        summary="MoCo v3: InfoNCE between predictions and gathered momentum keys",
    )
)


# -------------------------------------------------------------------------------------- DINO


def _dino_heads(cfg: TrainConfig, feat_dim: int) -> tuple[nn.Module, nn.Module]:
    """The DINO head as the projector (student and, by EMA copy, teacher) and no predictor:
    DINO compares the two networks' head outputs directly."""
    num_global = cfg.data.views.get("num_global", 2)
    if num_global != 2:  # main_dino.py: teacher(images[:2]), DINOLoss chunks the teacher in 2
        raise ValueError(f"DINO uses two global crops, got data.views.num_global={num_global}")
    head = DINOHead(feat_dim, cfg.model.projector, cfg.loss.out_dim, cfg.loss.norm_last_layer)
    return head, nn.Identity()


def _dino_schedules(cfg: TrainConfig, steps_per_epoch: int, total: int) -> dict:
    """The teacher temperature per step and, as 1.0 / 0.0, whether the head's last layer is
    frozen (``epoch < loss.freeze_last_layer``, epochs counted as the reference does)."""
    epoch = np.arange(total) // steps_per_epoch
    return {
        "teacher_temp": teacher_temp_schedule(cfg.loss, steps_per_epoch, total),
        "freeze_last_layer": (epoch < cfg.loss.freeze_last_layer).astype(np.float64),
    }


def _dino_cancel_last_layer(model: SSLModel, hyper: dict[str, float]) -> None:
    """``utils.cancel_gradients_last_layer``: no gradient, so no update (AdamW skips a parameter
    without one, weight decay included), for the student head's last layer while frozen."""
    if hyper.get("freeze_last_layer", 0.0):
        for p in model.online.projector.last_layer.parameters():
            p.grad = None


def _dino_step(model: SSLModel, batch: dict) -> dict[str, Tensor]:
    """Every crop through the student (globals and locals, each size its own backbone call:
    ``MultiCropWrapper``), the two global crops through the teacher, then eq. 3 at this
    step's teacher temperature."""
    crops = batch["crops"]
    if len(crops) < 2:
        raise ValueError(f"DINO needs the two global crops, got {len(crops)} crops")
    student = model.predict(crops)  # the predictor is the identity: student head outputs
    teacher = model.project_target(crops[:2])
    return model.loss(student, teacher, batch["hyper"]["teacher_temp"])


register(
    Method(
        name="dino",
        views="multicrop",
        loss_config=DINOConfig,
        # the loss takes its own three fields of the config (the rest: head and schedules)
        build_loss=lambda c: DINOLoss(
            out_dim=c.out_dim, student_temp=c.student_temp, center_momentum=c.center_momentum
        ),
        step=_dino_step,
        terms=(),
        build_heads=_dino_heads,
        schedules=_dino_schedules,
        on_gradients=_dino_cancel_last_layer,
        # DINO (Caron et al. 2021) ViT-S/16 on ImageNet: the paper's section 3.1 and "Implementation
        # details" (section 4 opening), and facebookresearch/dino: main_dino.py's argument defaults
        # and its README's ViT-S/16 recommendation ("Boosting DINO performance").
        recipe={
            "data": {
                "batch_size": 1024,  # paper: "batch size of 1024" for ViT-S/16
                "size": 224,  # paper: 2 global views at 224^2
                "views": {
                    "num_global": 2,
                    "global_scale": [0.4, 1.0],  # --global_crops_scale 0.4 1
                    "num_local": 8,  # --local_crops_number 8
                    "local_size": 96,  # paper: local views at 96^2
                    "local_scale": [0.05, 0.4],  # --local_crops_scale 0.05 0.4
                },
            },
            "model": {
                "backbone": "vit_small_patch16_224",  # ViT-S/16 (--arch vit_small)
                "drop_path_rate": 0.1,  # --drop_path_rate 0.1 (student only)
                "projector": [2048, 2048, 256],  # DINOHead: nlayers 3, hidden 2048, bottleneck 256
                "batch_views": "grouped",  # MultiCropWrapper: one backbone call per crop size
            },
            "optim": {
                "name": "adamw",  # paper and --optimizer adamw
                "base_lr": 5e-4,  # paper: lr = 0.0005 * batchsize / 256 (--lr 0.0005)
                "min_lr": 1e-6,  # --min_lr 1e-6
                "weight_decay": 0.04,  # paper: cosine from 0.04 ...
                "weight_decay_end": 0.4,  # ... to 0.4
                "clip_grad": 3.0,  # --clip_grad 3.0
                "clip_per_param": True,  # utils.clip_gradients: each parameter on its own
            },
            # --epochs 100 (the README's vanilla ViT-S/16 run); paper: 10 warm-up epochs
            "schedule": {"epochs": 100, "warmup_epochs": 10},
            "ema": {"start": 0.996, "end": 1.0},  # paper and --momentum_teacher: cosine 0.996 -> 1
            "loss": {
                "out_dim": 65536,  # paper and --out_dim 65536
                "norm_last_layer": True,  # --norm_last_layer (default); README: false for more
                "student_temp": 0.1,  # paper section 3.1: tau_s = 0.1
                # paper: "linear warm-up for tau_t from 0.04 to 0.07 during the first 30 epochs";
                # README's ViT-S/16 recommendation (--teacher_temp 0.07
                # --warmup_teacher_temp_epochs 30); main_dino.py's default is 0.04 throughout
                "warmup_teacher_temp": 0.04,
                "teacher_temp": 0.07,
                "warmup_teacher_temp_epochs": 30,
                "center_momentum": 0.9,  # paper eq. 4: m = 0.9
                "freeze_last_layer": 1,  # --freeze_last_layer 1
            },
        },
        summary="DINO: self-distillation, centred and sharpened teacher over multi-crop views",
    )
)
