"""``ssl-cli bench quality``: representation quality of each method at an equal compute budget.

One plan (:class:`QualityPlan`) trains every ``(method, seed)`` on the same labelled shards for
the same budget, then evaluates frozen features of the final checkpoint:

- weighted kNN (k = 20, T = 0.07, DINO) on the **online** and the **momentum** branch;
- the fast linear probe (:func:`train.eval.classify.train_linear_probe`) on both branches;
- two references, measured once per backbone: the same backbone at random initialisation,
  and kNN on raw pixels (the centre crops, flattened).

The budget is equal **compute** per run, stated two ways, and both are reported with the steps
each method got:

- ``--budget-fe N``: forward-equivalents per run. A backbone pass with gradient counts 3
  (forward + backward), one without gradient 1, each scaled by its pixels against a
  ``data.size`` view (:func:`forward_equivalents`): MOS (section 3.2's 2 + 3 passes) costs 9
  per sample, MoCo v3 and BYOL 8, UniVIP 8 + K instance passes, DINO 8 + its local crops.
- ``--budget-seconds S`` (default of the recipes): wall-clock training time. Each method's step
  time is measured once on the real loader (a few steps after a warm-up), and its step count
  is ``S / step time``, fixed in ``OUT/plan.json`` so that a resumed or re-run table trains the
  same schedules.

With ``objects_train`` / ``objects_val`` (shard folders built with ``--annotations``, e.g. the
scenes of ``ssl-cli data scenes``), every run and both references are also evaluated on objects
(:func:`train.eval.objects.evaluate_objects`): the object kNN and linear probe over ground-truth
boxes (RoIAlign on the last feature map, at ``objects_size``) and the multi-label image probe's
macro mAP. The pretraining set (``train``) may then be unlabelled scenes while ``bank`` / ``val``
hold labelled single objects for the kNN.

Every run is an ordinary ``ssl-cli pretrain`` run directory (``OUT/runs/METHOD-seedN``) with
exact resume, and its evaluation is written next to it (``quality.json``): a killed table
re-run with the same command resumes the run in flight and skips finished ones. kNN against
steps is logged during each run (``eval.every``, both branches). ``report.json``,
``table.md`` (mean, standard deviation and spread over seeds) and ``curves.png`` (kNN against
forward-equivalents spent, the axis on which the methods' budgets are equal, per method;
references as horizontal lines) are written at the end.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.eval import EvalLoader
from shards.atomic import atomic_write_json
from train.config import ConfigError, TrainConfig, deep_merge, parse_assignment, to_dict
from train.data import build_loader
from train.distributed import cleanup_distributed, init_distributed, resolve_device
from train.eval.features import extract_features, fit_input_size, load_backbones
from train.eval.objects import evaluate_objects
from train.eval.probes import LinearProbeConfig, knn_accuracy, probe_accuracy, train_linear_probe
from train.loop import build_parts, check_config, pretrain
from train.methods import build_model, forward_equivalents, get_method
from train.resolve import resolve_config
from train.runinfo import describe_device, library_versions
from train.schedules import warmup_steps
from train.tools.bench import measure_steps

__all__ = [
    "RECIPES",
    "QualityPlan",
    "run_quality",
]

# The CPU recipe: ~10 minutes per run on 2 cores, 32-px inputs. Our choices, for a budget a
# paper's recipe was not written for: small backbones (a 4-block ViT-Ti/4 for the ViT methods,
# ResNet-18 for the ResNet ones) and 1024-wide heads. Optimisers are the methods' own kinds:
# AdamW at PatchMix's ViT-T CIFAR lr (2e-3 per 256) for the ViTs, SGD at the ORL lr (0.2 per
# 256) for the ResNets. The ViTs take MOS appendix D's ViT-T/2 CIFAR values for the rest:
# - the momentum encoder, a cosine from 0 to 1 (measured at 600,000 forward-equivalents, three
#   seeds: +1.2 probe points for MOS and +2.5 for MoCo v3 over 0.99 -> 1, and the target
#   branch level with the online one);
# - weight decay 0.1, constant ("The weight decay is 0.1"), and a warm-up of 100 of its 800
#   epochs, i.e. 12.5% of the steps (measured at 600,000 forward-equivalents, three seeds on
#   one machine: +1.3 online-probe points for MOS over our earlier 0.05 and 10%).
# The ResNets keep 0.99 -> 1 (ORL starts at 0.99; at a few hundred steps BYOL's 0.996 would
# leave the target near its init) and a warm-up of 10% of the steps (our choice).
_VIT_CPU = {
    "model": {
        "backbone": "vit_tiny_patch16_224",
        "img_size": 32,
        "patch_size": 4,
        "backbone_kwargs": {"depth": 4},
        "drop_path_rate": 0.1,
        "projector": [1024, 1024, 256],
        "predictor": [1024, 256],
        "freeze_patch_embed": False,
    },
    "ema": {"start": 0.0, "end": 1.0},
    "optim": {
        "name": "adamw",
        "base_lr": 2e-3,
        "min_lr": 1e-6,
        "weight_decay": 0.1,  # MOS appendix D, ViT-T/2 CIFAR
        "weight_decay_end": 0.1,
    },
}
_RESNET_CPU = {
    "model": {"backbone": "resnet18", "projector": [1024, 256], "predictor": [1024, 256]},
    "optim": {
        "name": "sgd",
        "base_lr": 0.2,
        "min_lr": 0.0,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
    },
}
# DINO on top of the ViT layer, our choices for runs of a few hundred steps (its ImageNet recipe
# counts 100 epochs): 6 local crops of 16 px (the reference's 96 of 224, about the same share
# of the 32-px global side: 0.43 against 0.5), so the ViT takes 16-px inputs as well
# (dynamic_img_size: timm interpolates the position embedding, as DINO's ViT does); a
# 4,096-prototype head of the ViT heads' 1,024 width (65,536 outputs of 10 views at batch 128
# would dominate a CPU step); the teacher temperature at main_dino.py's default 0.04 without
# its 30-epoch warm-up, and the last layer never frozen (a run here is a few epochs at most);
# the EMA from 0.99, as the ResNets: a teacher that starts as a copy of the student (the ViT
# layer's 0 -> 1) is the setting DINO's section 5.2 reports to fail.
_DINO_CPU = {
    "data": {"views": {"num_local": 6, "local_size": 16}},
    "model": {
        "backbone_kwargs": {"depth": 4, "dynamic_img_size": True},
        "projector": [1024, 1024, 256],
    },
    "ema": {"start": 0.99, "end": 1.0},
    "loss": {
        "out_dim": 4096,
        "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0,
        "freeze_last_layer": 0,
    },
}
_CPU_COMMON = {
    "data": {"batch_size": 128, "size": 32, "instance_size": 16, "num_instances": 4},
    "ema": {"start": 0.99, "end": 1.0},
    "run": {"device": "cpu", "log_every": 10, "tensorboard": False, "progress": False},
}
# The GPU recipe: the methods' own recipes (heads, optimisers, EMA) on 32-px inputs with
# ViT-S/4 and ResNet-18 (CIFAR-sized inputs), batch 512, compiled, bf16.
_GPU_COMMON = {
    "data": {"batch_size": 512, "size": 32, "instance_size": 16, "num_instances": 4},
    "run": {"device": "cuda", "precision": "auto", "compile": True, "log_every": 50},
}
_VIT_GPU = {
    "model": {
        "backbone": "vit_small_patch16_224",
        "img_size": 32,
        "patch_size": 4,
        "drop_path_rate": 0.1,
        "freeze_patch_embed": False,
    }
}
_RESNET_GPU = {"model": {"backbone": "resnet18"}}
_DINO_GPU = {
    "data": {"views": {"num_local": 8, "local_size": 16}},
    "model": {"backbone_kwargs": {"dynamic_img_size": True}},
}

VIT_METHODS = ("mos", "mocov3", "dino")

RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "common": _CPU_COMMON,
        "vit": _VIT_CPU,
        "resnet": _RESNET_CPU,
        "dino": _DINO_CPU,
        "budget_seconds": 600.0,
        "eval_evals": 4,  # kNN evaluations during a run
        # warm-up, a fraction of the steps: MOS appendix D (100 of 800 epochs) for the ViTs
        "warmup": {"vit": 0.125, "resnet": 0.1},
    },
    "gpu": {
        "common": _GPU_COMMON,
        "vit": _VIT_GPU,
        "resnet": _RESNET_GPU,
        "dino": _DINO_GPU,
        "budget_seconds": 1800.0,
        "eval_evals": 8,
        "warmup": {"vit": 0.1, "resnet": 0.1},  # our choice, for a few hundred epochs' worth
    },
}

KNN_K, KNN_T = 20, 0.07  # DINO's weighted kNN
# What the summary keeps of each object evaluation (train.eval.objects.evaluate_objects's rows).
OBJECT_METRICS = ("object_knn_top1", "object_linear_top1", "image_map")
_CALIBRATION_WARMUP, _CALIBRATION_STEPS = 3, 8


def _manifest(shards: Path) -> dict:
    """The shard folder's ``manifest.json``, read once; its sample count checked."""
    path = shards / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        int(manifest["counts"]["samples"])
        return manifest
    except FileNotFoundError:
        raise ValueError(
            f"{shards}: no manifest.json (not a finished `ssl-cli shards build`)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None


@dataclass
class QualityPlan:
    """What a table trains and evaluates; ``OUT/plan.json`` once calibrated."""

    train: str
    val: str
    out: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    bank: str | None = None  # kNN memory bank / probe training set [default: train]
    recipe: str = "cpu"
    budget_seconds: float | None = None
    budget_fe: int | None = None
    eval_every: int | None = None
    device: str = "auto"
    assignments: tuple[str, ...] = ()
    steps: dict[str, int] = field(default_factory=dict)  # per method, once calibrated
    calibration: dict[str, dict] = field(default_factory=dict)
    train_samples: int = 0  # from the train shards' manifest, read once by build()
    objects_train: str | None = None  # shards with ground truth: object probes' training set
    objects_val: str | None = None  # ... and their scored set
    objects_size: int | None = None  # input side of the object probes [default: data.size]
    objects_features: str = "roi"  # how a box gets its feature (train.eval.objects.BOX_FEATURES)

    @classmethod
    def build(cls, **kwargs: Any) -> QualityPlan:

        plan = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
        if plan.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {plan.recipe!r}; choose one of {sorted(RECIPES)}")
        for m in plan.methods:
            try:
                get_method(m)
            except ValueError as e:
                raise ConfigError(f"--methods: {e}") from None
        if len(set(plan.methods)) != len(plan.methods) or len(set(plan.seeds)) != len(plan.seeds):
            raise ConfigError("--methods and --seeds must not repeat an entry")
        plan.bank = plan.bank or plan.train
        if (plan.objects_train is None) != (plan.objects_val is None):
            raise ConfigError("--objects-train and --objects-val go together")
        names = ["train", "val", "bank"]
        if plan.objects_train is not None:
            names += ["objects_train", "objects_val"]
        for name in names:
            path = Path(getattr(plan, name))
            option = "--" + name.replace("_", "-")
            if not path.is_dir():
                raise ConfigError(f"{option}: {path} is not a directory")
            manifest = _manifest(path)
            if name == "train":
                plan.train_samples = int(manifest["counts"]["samples"])
            if name in ("val", "bank") and not manifest["counts"].get("labelled"):
                raise ConfigError(
                    f"{option}: {path} holds no class labels, which the kNN and linear probe "
                    "need (pretraining on unlabelled scenes: give labelled --bank and --val)"
                )
            if name.startswith("objects") and "annotations" not in manifest:
                raise ConfigError(
                    f"{option}: {path} has no ground truth; build it with "
                    "`ssl-cli shards build SRC OUT --annotations instances.json`"
                )
        if plan.budget_fe is None and plan.budget_seconds is None:
            plan.budget_seconds = RECIPES[plan.recipe]["budget_seconds"]
        if plan.budget_fe is not None:
            plan.budget_seconds = None

        for m in plan.methods:  # every check of the run now (--dry-run too), not after an hour
            cfg = plan.config(m, plan.seeds[0], steps=1)
            try:  # data.views keys the method's view set does not take, the model
                check_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"{m}: {e}") from None
            if plan.train_samples < cfg.data.batch_size:
                raise ConfigError(
                    f"--train: {plan.train} holds {plan.train_samples} samples, fewer than one "
                    f"batch of {cfg.data.batch_size} ({m}, recipe {plan.recipe}); use more "
                    "shards, or a smaller batch (data.batch_size=N)"
                )
        saved = Path(plan.out) / "plan.json"
        if saved.exists():
            plan._adopt(json.loads(saved.read_text()))
        return plan

    # ---------------------------------------------------------------------------- configs

    def _identity(self) -> dict:
        """What must match for a saved plan's step counts to be reused."""
        keys = (
            "train",
            "val",
            "bank",
            "recipe",
            "budget_seconds",
            "budget_fe",
            "device",
            "assignments",
        )
        d = asdict(self)
        identity = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}
        if self.objects_train is not None:  # absent otherwise: older plans stay valid
            for k in ("objects_train", "objects_val", "objects_size", "objects_features"):
                identity[k] = d[k]
        return identity

    def _adopt(self, saved: dict) -> None:
        if saved.get("identity") != self._identity():
            raise ValueError(
                f"{self.out}/plan.json was made with other options ({saved.get('identity')}); "
                "use another --out, or the same options to resume"
            )
        self.steps = {k: int(v) for k, v in saved.get("steps", {}).items()}
        self.calibration = saved.get("calibration", {})

    def save(self) -> None:
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"identity": self._identity(), "steps": self.steps, "calibration": self.calibration}
        atomic_write_json(out / "plan.json", data)

    def run_dir(self, method: str, seed: int) -> Path:
        return Path(self.out) / "runs" / f"{method}-seed{seed}"

    def config(self, method: str, seed: int, steps: int) -> TrainConfig:
        """The resolved config of one run of ``steps`` steps."""

        r = RECIPES[self.recipe]
        family = "vit" if method in VIT_METHODS else "resnet"
        layer = deep_merge(r["common"], r[family])
        if method in r:  # a method's own layer (DINO's local crops and head)
            layer = deep_merge(layer, r[method])
        batch = layer["data"]["batch_size"]
        steps_per_epoch = max(self.train_samples // batch, 1)
        every = self.eval_every
        if every is None:
            every = max(math.ceil(steps / r["eval_evals"]), 1)  # no eval a step before the end
        layer = deep_merge(
            layer,
            {
                "method": method,
                "data": {"shards": self.train},
                "schedule": {
                    "steps": steps,
                    "epochs": max(math.ceil(steps / steps_per_epoch), 1),
                    "warmup_epochs": r["warmup"][family] * steps / steps_per_epoch,
                },
                "run": {"seed": seed, "out": str(self.run_dir(method, seed)),
                        "ckpt_every": max(math.ceil(steps / 4), 1), "keep_last": 1},
                "eval": {"every": every, "train": self.bank, "val": self.val,
                         "k": KNN_K, "temperature": KNN_T, "branch": "both"},
            },
        )  # fmt: skip
        if self.device != "auto":
            layer = deep_merge(layer, {"run": {"device": self.device}})
        layers = [layer] + [parse_assignment(a) for a in self.assignments]
        return resolve_config(*layers)

    def describe(self) -> str:
        lines = [
            f"bench quality: {len(self.methods)} methods x {len(self.seeds)} seeds, "
            f"recipe {self.recipe}, train {self.train}, bank {self.bank}, val {self.val}, "
            f"out {self.out}",
            (
                f"budget: {self.budget_fe} forward-equivalents per run"
                if self.budget_fe
                else f"budget: {self.budget_seconds:g} s of training per run (step time measured "
                "per method)"
            ),
        ]
        if self.objects_train is not None:
            lines.append(
                f"objects: probes trained on {self.objects_train}, scored on {self.objects_val}, "
                f"input {self.objects_size or 'data.size'} px, box features {self.objects_features}"
                + (" (crops at data.size)" if self.objects_features == "crop" else "")
            )
        for m in self.methods:
            cfg = self.config(m, self.seeds[0], steps=self.steps.get(m, 1))
            fe = forward_equivalents(cfg)
            steps = self.steps.get(m) or (
                self._fe_steps(cfg) if self.budget_fe else "measured at the start"
            )
            lines.append(
                f"  {m}: {cfg.model.backbone}, batch {cfg.data.batch_size}, {fe:g} "
                f"forward-equivalents per sample, steps {steps}"
            )
            if isinstance(steps, int):
                lines.append("    " + self._schedule_line(m, steps))
        for a in self.assignments:
            key = a.partition("=")[0].strip()
            values = {m: self._resolved(m, key) for m in self.methods}
            shown = ", ".join(f"{m} {v}" for m, v in values.items())
            lines.append(f"  override {a}: resolves to {shown}")
        return "\n".join(lines)

    def _schedule_line(self, method: str, steps: int) -> str:
        """The schedule values a run of ``steps`` steps resolves to, as its trainer sees them."""
        cfg = self.config(method, self.seeds[0], steps=steps)
        o, e = cfg.optim, cfg.ema
        per_epoch = max(self.train_samples // cfg.data.batch_size, 1)
        warmup = max(0, min(warmup_steps(cfg, per_epoch), steps))  # as cosine_schedule clamps
        wd = f"{o.weight_decay:g}" + (
            "" if o.weight_decay_end == o.weight_decay else f" -> {o.weight_decay_end:g}"
        )
        return (
            f"{o.name} lr {o.base_lr:g} per 256, weight decay {wd}, warm-up {warmup} of "
            f"{steps} steps, momentum {e.start:g} -> {e.end:g}, kNN every {cfg.eval.every} steps"
        )

    def _resolved(self, method: str, key: str) -> Any:
        node: Any = to_dict(self.config(method, self.seeds[0], steps=self.steps.get(method, 1)))
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def _fe_steps(self, cfg: TrainConfig) -> int:
        per_step = forward_equivalents(cfg) * cfg.data.batch_size
        return max(int(self.budget_fe // per_step), 1)


# ----------------------------------------------------------------------------------- running


def _calibrate(plan: QualityPlan, method: str, log: Callable[[str], None]) -> int:
    """Steps that fit ``budget_seconds`` for ``method``: its end-to-end step time measured on
    the real loader after a warm-up."""

    if plan.budget_fe is not None:
        steps = plan._fe_steps(plan.config(method, plan.seeds[0], steps=1))
        plan.calibration[method] = {"forward_equivalents_budget": plan.budget_fe}
        return steps
    cfg = plan.config(method, plan.seeds[0], steps=1000)
    info = init_distributed(cfg.run.device)
    try:
        loader = build_loader(cfg, info)
        parts = build_parts(cfg, info, loader=loader)
        parts.model.train()
        m = measure_steps(parts, loader, _CALIBRATION_WARMUP, _CALIBRATION_STEPS)
        loader.close()
    finally:
        cleanup_distributed(info)
    step_seconds = m["seconds"] / m["steps"]
    steps = max(int(plan.budget_seconds / step_seconds), 1)
    plan.calibration[method] = {"step_seconds": round(step_seconds, 4), **m}
    log(f"  {method}: {step_seconds:.3f} s per step -> {steps} steps in {plan.budget_seconds:g} s")
    return steps


@torch.no_grad()
def _evaluate_backbones(
    backbones: dict[str, torch.nn.Module], plan: QualityPlan, size: int, device: torch.device
) -> dict[str, dict]:
    """kNN and the fast linear probe of each backbone on the plan's train/val shards."""

    results = {}
    for name, backbone in backbones.items():
        backbone.to(device)
        feats = []
        for split in (plan.bank, plan.val):
            with EvalLoader(split, size=size, batch_size=256, device=str(device)) as loader:
                feats.append(extract_features(backbone, loader))
        bank, queries = feats
        classes = max(bank.num_classes, queries.num_classes)
        knn = knn_accuracy(
            bank.features, bank.labels, queries.features, queries.labels, classes, KNN_K, KNN_T
        )
        with torch.enable_grad():
            probe = train_linear_probe(bank.features, bank.labels, classes, LinearProbeConfig())
        lin = probe_accuracy(probe, queries.features, queries.labels)
        results[name] = {"knn_top1": knn.top1, "knn_top5": knn.top5, "linear_top1": lin.top1}
        backbone.to("cpu")
    return results


def _pixel_knn(plan: QualityPlan, size: int, device: torch.device) -> dict:
    """kNN on raw pixels: the centre crops, flattened (cosine similarity, as every kNN here)."""

    def pixels(split: str):
        xs, ys = [], []
        with EvalLoader(split, size=size, batch_size=256, device=str(device)) as loader:
            classes = loader.num_classes
            for batch in loader:
                xs.append(batch["image"].flatten(1).float())
                ys.append(batch["label"])
        return torch.cat(xs), torch.cat(ys), classes

    bx, by, c1 = pixels(plan.bank)
    qx, qy, c2 = pixels(plan.val)
    acc = knn_accuracy(bx, by, qx, qy, max(c1, c2), KNN_K, KNN_T)
    return {"knn_top1": acc.top1, "knn_top5": acc.top5}


def _references(plan: QualityPlan, log: Callable[[str], None]) -> dict:
    """Random-init backbones (one per architecture, seed 0) and raw-pixel kNN, cached."""

    path = Path(plan.out) / "references.json"
    if path.exists():
        return json.loads(path.read_text())
    refs: dict[str, Any] = {}
    done_arch: dict[str, str] = {}
    for m in plan.methods:
        cfg = plan.config(m, 0, steps=1)
        device = resolve_device(cfg.run.device)
        arch = cfg.model.backbone
        if arch in done_arch:
            refs[f"random_init/{m}"] = refs[f"random_init/{done_arch[arch]}"]
            continue
        torch.manual_seed(0)
        model, _ = build_model(cfg)
        log(f"reference: {arch} at random init")
        res = _evaluate_backbones({"online": model.online.backbone}, plan, cfg.data.size, device)
        refs[f"random_init/{m}"] = {"backbone": arch, **res["online"]}
        if plan.objects_train is not None:
            obj = _evaluate_objects({}, plan, cfg, device, log)
            refs[f"random_init/{m}"]["objects"] = obj["rows"]["random_init"]
            refs["raw_pixels_objects"] = obj["rows"]["raw_pixels"]
        done_arch[arch] = m
    cfg = plan.config(plan.methods[0], 0, steps=1)
    log("reference: kNN on raw pixels")
    refs["raw_pixels"] = _pixel_knn(plan, cfg.data.size, resolve_device(cfg.run.device))
    path.write_text(json.dumps(refs, indent=1) + "\n")
    return refs


def _evaluate_objects(
    backbones: dict[str, torch.nn.Module],
    plan: QualityPlan,
    cfg: TrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """The object probes of ``backbones`` (and, with none given, of the references) on the
    plan's ``objects_train`` / ``objects_val`` shards, at ``objects_size``."""

    size = plan.objects_size or cfg.data.size
    crop = plan.objects_features == "crop"
    for backbone in backbones.values():
        fit_input_size(backbone, cfg.data.size if crop else size)
    return evaluate_objects(
        backbones,
        cfg,
        plan.objects_train,
        plan.objects_val,
        size=size,
        box_features=plan.objects_features,
        crop_size=cfg.data.size if crop else None,
        references=not backbones,
        k=KNN_K,
        temperature=KNN_T,
        device=device,
        log=lambda line: log(f"    objects: {line}"),
    )


def _one_run(plan: QualityPlan, method: str, seed: int, log: Callable[[str], None]) -> dict:

    run_dir = plan.run_dir(method, seed)
    result_path = run_dir / "quality.json"
    if result_path.exists():
        log(f"{method} seed {seed}: done ({result_path})")
        return json.loads(result_path.read_text())
    steps = plan.steps[method]
    cfg = plan.config(method, seed, steps)
    log(f"{method} seed {seed}: {steps} steps")
    t0 = time.perf_counter()
    out = pretrain(cfg, log=lambda msg: None)
    seconds = time.perf_counter() - t0
    backbones, info = load_backbones(run_dir, "both")
    device = resolve_device(cfg.run.device)
    results = _evaluate_backbones(backbones, plan, cfg.data.size, device)
    if plan.objects_train is not None:
        objects = _evaluate_objects(backbones, plan, cfg, device, log)["rows"]
        for branch in results:
            results[branch]["objects"] = objects[branch]
    fe = forward_equivalents(cfg)
    curve = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "eval/knn_top1" in record:
            curve.append(
                {
                    "step": record["step"],
                    "target": record["eval/knn_top1"],
                    "online": record.get("eval/knn_online_top1"),
                }
            )
    result = {
        "method": method,
        "seed": seed,
        "backbone": cfg.model.backbone,
        "steps": steps,
        "step_reached": info["step"],
        "train_seconds_this_call": round(seconds, 1),
        "start_step": out["start_step"],  # > 0: resumed, the seconds are the tail's only
        "forward_equivalents_per_sample": fe,
        "forward_equivalents": fe * steps * cfg.data.batch_size,
        "images": steps * cfg.data.batch_size,
        "branches": results,
        "knn_curve": curve,
        "final_step": out["step"],
    }
    atomic_write_json(result_path, result)
    t, o = results["target"], results["online"]
    log(
        f"  kNN target {t['knn_top1']:.2f} online {o['knn_top1']:.2f}, linear target "
        f"{t['linear_top1']:.2f} online {o['linear_top1']:.2f} ({seconds:.0f} s of training)"
    )
    if "objects" in t:
        log(
            "  objects: "
            + "; ".join(
                f"{b} kNN {results[b]['objects']['object_knn_top1']:.2f}, linear "
                f"{results[b]['objects']['object_linear_top1']:.2f}, mAP "
                f"{results[b]['objects']['image_map']:.2f}"
                for b in ("target", "online")
            )
        )
    return result


def _spread(values: Sequence[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def _train_seconds(runs: list[dict]) -> dict | None:
    """The spread of the training seconds of the runs trained from step 0 in one call (a
    resumed run's seconds are its last call's only); ``None`` when every run was resumed."""
    whole = [r["train_seconds_this_call"] for r in runs if r.get("start_step", 0) == 0]
    return {**_spread(whole), "resumed": len(runs) - len(whole)} if whole else None


def summarise(runs: list[dict], refs: dict) -> dict:
    """Per method: mean / std / range over seeds of every metric, steps and budget."""
    table: dict[str, dict] = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        row = {
            "backbone": rs[0]["backbone"],
            "steps": rs[0]["steps"],
            "forward_equivalents": rs[0]["forward_equivalents"],
            "train_seconds": _train_seconds(rs),
        }
        for branch in ("target", "online"):
            for metric in ("knn_top1", "linear_top1"):
                row[f"{branch}/{metric}"] = _spread([r["branches"][branch][metric] for r in rs])
            if all("objects" in r["branches"][branch] for r in rs):
                for metric in OBJECT_METRICS:
                    row[f"{branch}/objects/{metric}"] = _spread(
                        [r["branches"][branch]["objects"][metric] for r in rs]
                    )
        table[m] = row
    return {"methods": table, "references": refs}


def _markdown(summary: dict, plan: QualityPlan) -> str:
    """``table.md``: the methods' table, the object table (with ground truth), the references
    and what the figures are (seeds, kNN settings, budget)."""
    one_seed = len(plan.seeds) == 1

    def cell(s: dict) -> str:  # one seed has no spread: its value alone
        if one_seed:
            return f"{s['mean']:.2f}"
        return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.1f}–{s['max']:.1f})"

    lines = [
        "| method | backbone | steps | forward-equivalents | train s | kNN target | kNN online "
        "| linear target | linear online |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, row in summary["methods"].items():
        lines.append(
            f"| {m} | {row['backbone']} | {row['steps']} | {row['forward_equivalents']:.3g} "
            f"| {_seconds_cell(row['train_seconds'])} | {cell(row['target/knn_top1'])} "
            f"| {cell(row['online/knn_top1'])} | {cell(row['target/linear_top1'])} "
            f"| {cell(row['online/linear_top1'])} |"
        )
    refs = summary["references"]
    if any("target/objects/object_knn_top1" in row for row in summary["methods"].values()):
        lines += ["", *_objects_table(summary["methods"], refs, plan.objects_features, cell)]
    lines += ["", f"References: kNN on raw pixels {refs['raw_pixels']['knn_top1']:.2f}."]
    for ref in _random_inits(refs):
        lines.append(
            f"Random init {ref['backbone']}: kNN {ref['knn_top1']:.2f}, linear "
            f"{ref['linear_top1']:.2f}."
        )
    if one_seed:
        spread = f"One seed ({plan.seeds[0]}), no spread; "
    else:
        seeds = ", ".join(map(str, plan.seeds))
        spread = f"Mean ± standard deviation (min–max) over seeds {seeds}; "
    budget = (
        f"{plan.budget_fe} forward-equivalents" if plan.budget_fe else f"{plan.budget_seconds:g} s"
    )
    lines += ["", f"{spread}kNN k = {KNN_K}, T = {KNN_T}; budget {budget} of training per run."]
    return "\n".join(lines) + "\n"


def _seconds_cell(spread: dict | None) -> str:
    """Mean training seconds of the runs trained in one call, the resumed ones counted apart."""
    if spread is None:
        return "— (resumed)"
    resumed = spread.get("resumed", 0)
    return f"{spread['mean']:.0f}" + (f" ({resumed} resumed, left out)" if resumed else "")


def _random_inits(refs: dict) -> list[dict]:
    """The random-init references, one per backbone (methods of one backbone share theirs)."""
    seen: dict[str, dict] = {}
    for key, ref in refs.items():
        if key.startswith("random_init/") and ref["backbone"] not in seen:
            seen[ref["backbone"]] = ref
    return list(seen.values())


def _objects_table(methods: dict, refs: dict, features: str, cell: Callable) -> list[str]:
    """The object table: object kNN, object linear and image mAP of both branches per method,
    then the random-init and raw-pixel references."""
    how = (
        "each box cut out at data.size and embedded alone"
        if features == "crop"
        else "RoIAlign on the last feature map"
    )
    lines = [
        f"Objects (ground-truth boxes of the scenes; {how}):",
        "",
        "| method | object kNN target | object kNN online | object linear target "
        "| object linear online | image mAP target | image mAP online |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, row in methods.items():
        if "target/objects/object_knn_top1" not in row:
            continue
        cells = [
            cell(row[f"{b}/objects/{metric}"])
            for metric in OBJECT_METRICS
            for b in ("target", "online")
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for ref in _random_inits(refs):
        if "objects" in ref:
            o = ref["objects"]
            lines.append(
                f"| random init {ref['backbone']} | {o['object_knn_top1']:.2f} | | "
                f"{o['object_linear_top1']:.2f} | | {o['image_map']:.2f} | |"
            )
    if "raw_pixels_objects" in refs:
        o = refs["raw_pixels_objects"]
        lines.append(
            f"| raw pixels | {o['object_knn_top1']:.2f} | | {o['object_linear_top1']:.2f} "
            f"| | {o['image_map']:.2f} | |"
        )
    return lines


def _plot(runs: list[dict], refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for i, m in enumerate(methods):
        for j, r in enumerate(x for x in runs if x["method"] == m):
            # compute, not steps: methods spend different forward-equivalents per step
            per_step = r["forward_equivalents"] / max(r["steps"], 1) / 1e3
            xs = [p["step"] * per_step for p in r["knn_curve"]]
            ax.plot(xs, [p["target"] for p in r["knn_curve"]], color=colours[i % len(colours)],
                    alpha=0.8, label=f"{m} (target)" if j == 0 else None)  # fmt: skip
            online = [p["online"] for p in r["knn_curve"]]
            if all(v is not None for v in online):
                ax.plot(xs, online, color=colours[i % len(colours)], ls=":", alpha=0.6,
                        label=f"{m} (online)" if j == 0 else None)  # fmt: skip
    ax.axhline(refs["raw_pixels"]["knn_top1"], color="k", ls="--", lw=1, label="raw pixels")
    seen = set()
    for key, ref in refs.items():
        if key.startswith("random_init/") and ref["backbone"] not in seen:
            seen.add(ref["backbone"])
            ax.axhline(ref["knn_top1"], color="grey", ls="-.", lw=1,
                       label=f"random init {ref['backbone']}")  # fmt: skip
    ax.set_xlabel(
        "thousands of forward-equivalents (a backbone pass on a view: 3 with gradient, 1 without)"
    )
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(plan: QualityPlan, log: Callable[[str], None] = print) -> dict:
    """Calibrate, train and evaluate every run of ``plan`` (resuming), write the report."""

    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    log(plan.describe())
    for m in plan.methods:
        if m not in plan.steps:
            plan.steps[m] = _calibrate(plan, m, log)
            plan.save()
    plan.save()
    refs = _references(plan, log)
    # seed-major: an interrupted table holds every method at the seeds it reached
    runs = [_one_run(plan, m, s, log) for s in plan.seeds for m in plan.methods]
    runs.sort(key=lambda r: (plan.methods.index(r["method"]), plan.seeds.index(r["seed"])))
    summary = summarise(runs, refs)

    device = resolve_device(plan.config(plan.methods[0], 0, steps=1).run.device)
    report = {
        "plan": {**plan._identity(), "methods": list(plan.methods), "seeds": list(plan.seeds),
                 "steps": plan.steps, "calibration": plan.calibration},
        "device": describe_device(device),
        "versions": library_versions(),
        "summary": summary,
        "runs": runs,
        "configs": {m: to_dict(plan.config(m, plan.seeds[0], plan.steps[m])) for m in plan.methods},
        "files": {"json": str(out / "report.json"), "table": str(out / "table.md"),
                  "png": str(out / "curves.png")},
    }  # fmt: skip
    (out / "table.md").write_text(_markdown(summary, plan))
    _plot(runs, refs, out / "curves.png")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
