"""The pretraining loop (:func:`pretrain`), in named phases read top to bottom.

Set-up (:func:`build_parts`) makes the model, loss, optimizer, scaler, loader and the per-step
schedules; :func:`train_step` is one optimizer step. One start of a run (:func:`_pretrain`):
restore state (:func:`_read_resume`, :func:`_restore`), open the run (:func:`_open_run`: the
run directory's files and the metrics sinks behind :meth:`train.runlog.RunLog.write`), the step
loop (:func:`_step_loop`) with its metrics lines, non-finite-loss guard, periodic kNN
evaluation (``eval.every``, :func:`knn_step`) and checkpoints (:func:`_save`), and close.
``ssl-cli bench train`` times the same :func:`train_step`.

Resume semantics (``docs/training.md``): a checkpoint restores the model (online, predictor,
extras and EMA target), optimizer, grad scaler, step, RNG of every rank and the loader's data
position; schedules are recomputed from the config, which must match the checkpoint's except
for the keys in :data:`train.resume.RESUMABLE_KEYS`. Metrics logged after the resumed step are dropped
(``metrics.jsonl`` is cut, TensorBoard purged), so the curve continues as if never stopped;
W&B, which cannot rewind, continues the same W&B run from the first step it does not have
(:mod:`train.runlog`).
One exception: after a non-finite stop (``RUN/non-finite.json``), resuming from a checkpoint
before the bad step may lower ``optim.base_lr`` and set or lower ``optim.clip_grad``
(:func:`train.resume.check_resume_config`); the change is logged and recorded in ``run.json``.

Trust: before training, every shard is checked against its manifest (size, and sha256 unless
``verify_shards=False``; digests of unchanged files are cached in ``RUN/shards-checked.json``);
a checkpoint is written only when every loss so far, every weight and every optimizer state
tensor is finite; temporary files of an interrupted save are removed when the next run starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from shards.atomic import atomic_write_json, atomic_write_text
from train.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from train.config import ConfigError, TrainConfig, dump_yaml, to_dict
from train.data import (
    build_loader,
    check_data,
    real_view_set,
    shard_location,
    synthetic_loader,
)
from train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from train.eval.features import KNNMonitor
from train.methods import Method, build_model, forward_equivalents, get_method
from train.models import SSLModel, has_local_batchnorm, has_sync_batchnorm, update_momentum
from train.optim import build_optimizer, clip_gradients, set_hyperparameters
from train.resume import (
    NON_FINITE_FILE,
    check_resume_config,
    find_resume_checkpoint,
    read_non_finite,
)
from train.runinfo import run_info
from train.runlog import RunLog, require_wandb
from train.schedules import Schedules, build_schedules, peak_lr, warmup_steps

__all__ = [
    "NonFiniteLossError",
    "Parts",
    "COMPILED_MODULES",
    "build_monitor",
    "build_parts",
    "compile_modules",
    "distributed_model",
    "eta_seconds",
    "knn_step",
    "pretrain",
    "resolve_precision",
    "train_step",
]


class NonFiniteLossError(RuntimeError):
    """The loss, a weight or an optimizer state became NaN or infinite; no checkpoint was
    written after that step. ``step``: the first bad step (1-based), ``None`` if unknown."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


_ADVICE = (
    "run the same command again (the resume checks the newest kept checkpoint, and steps back "
    "to an older one if its weights or one forward pass are not sane) with a lower lr (--base-lr, or --set optim.base_lr=...) and/or gradient clipping "
    "(--set optim.clip_grad=1.0), which a resume after a non-finite stop allows, or with "
    "--precision fp32"
)


# ----------------------------------------------------------------------------------- set-up


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` on CPU. bf16/fp16 autocast is GPU-only here: on a
    CPU it would be slow and is refused with a clear error."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(
            f"precision {precision!r} (autocast) needs a CUDA GPU; this run is on {device.type}: "
            "use --precision fp32 (or auto)"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose one of: auto, fp32, bf16, fp16")
    return precision


def check_config(cfg: TrainConfig) -> None:
    """What only building reveals, checked before any work (``pretrain`` and ``--print-config``
    alike): the view set's options (``data.views``, sizes) and the model, built on the meta
    device (no memory, no weights): timm's arguments and the heads. A :class:`ConfigError`
    names the section."""
    real_view_set(get_method(cfg.method).views, cfg)
    try:
        with torch.device("meta"):
            build_model(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        kwargs = {"img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size,
                  **cfg.model.backbone_kwargs}  # fmt: skip
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
        raise ConfigError(f"model: {cfg.model.backbone} ({shown}) cannot be built: {e}") from None


@dataclass
class Parts:
    """Everything one training step needs."""

    cfg: TrainConfig
    info: DistInfo
    method: Method
    model: SSLModel  # the bare model (checkpoints, EMA)
    module: nn.Module  # what forward is called on: DDP(model) or model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    loader: Any
    schedules: Schedules
    terms: tuple[str, ...]  # "loss" then the method's terms, the order of train_step's output
    channels_last: bool
    compiled: tuple[str, ...] = ()  # the modules torch.compile runs (compile_modules)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.info.device.type, dtype=dtype)


def convert_sync_batchnorm(model: SSLModel) -> None:
    """Every BatchNorm of the model -> SyncBatchNorm, in place: the backbones (ORL's ResNet-50
    uses ``norm_cfg=dict(type="SyncBN")``, as BYOL does), the projectors, the predictor and the
    method's extra modules. Weights and running statistics are kept."""
    for enc in (model.online, model.target):
        enc.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(enc.backbone)
        enc.projector = nn.SyncBatchNorm.convert_sync_batchnorm(enc.projector)
    model.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(model.predictor)
    for name in list(model.extra):
        model.extra[name] = nn.SyncBatchNorm.convert_sync_batchnorm(model.extra[name])


# The modules ``run.compile`` compiles, by their names in the model: the backbones and heads,
# where the step's compute is. The loss and the method's extras stay eager: they are small, and
# the step function around them (collectives, Python control flow per method) would only add
# graph breaks.
COMPILED_MODULES = (
    "online.backbone",
    "online.projector",
    "predictor",
    "target.backbone",
    "target.projector",
)

# torch's own recompile limit (torch._dynamo.config.recompile_limit, 8) counts the graphs of
# one function, and compiled modules share functions: every head (its forward is torch's own,
# nn.Sequential) is traced through the one wrapper torch builds for ``nn.Module.compile``
# (torch._dynamo.external_utils.wrap_inline), and the online and target backbones through their
# class's ``forward``. Each module is seen with and without gradient (online, target), UniVIP's
# at two view sizes (scenes and instances), and the periodic kNN adds eval-mode graphs; past a
# limit torch runs the remaining calls eagerly after one warning, a slowdown nothing else
# reports. We give every compiled module the budget torch gives a function;
# tests/test_compile.py counts the graphs each method needs (UniVIP's small model: 4 + 4 in its
# first step), their reasons, and that no step after the first compiles again.
RECOMPILES_PER_MODULE = 8


def compile_modules(model: SSLModel, backend: str = "inductor") -> tuple[str, ...]:
    """``torch.compile`` the :data:`COMPILED_MODULES` of ``model`` in place (``nn.Module.compile``:
    the state-dict keys stay those of the plain model, so checkpoints do not change) and raise
    the recompile limit to :data:`RECOMPILES_PER_MODULE` per compiled module. Returns the names
    compiled.

    A module that holds SyncBatchNorm (the heads, and a ResNet's backbone, after
    :func:`convert_sync_batchnorm` under DDP on GPUs) is left eager: dynamo cannot trace
    SyncBatchNorm's forward in one graph (pytorch/pytorch#156680, open: it breaks the graph at
    ``torch.cuda.is_current_stream_capturing`` and ``batch_norm_gather_stats_with_counts``), and
    compile + DDP + SyncBatchNorm fails at compile time (pytorch/pytorch#107372, open). With
    MOS's and MoCo v3's ViTs that leaves the heads eager, a few MLP layers against the
    backbone's transformer blocks; a ResNet with SyncBatchNorm runs eager as a whole.
    ``backend``: torch.compile's (tests count graphs with ``"aot_eager"``, which compiles no
    kernels).
    """
    import torch._dynamo.config as dynamo_config

    names = tuple(n for n in COMPILED_MODULES if not has_sync_batchnorm(model.get_submodule(n)))
    # recompile_limit: torch >= 2.6; cache_size_limit before
    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = RECOMPILES_PER_MODULE * len(names)
    if getattr(dynamo_config, key) < limit:
        setattr(dynamo_config, key, limit)
    for name in names:
        model.get_submodule(name).compile(backend=backend)
    return names


def distributed_model(model: SSLModel, info: DistInfo) -> nn.Module:
    """``model`` wrapped in DDP (one device per rank on CUDA, gloo's CPU tensors otherwise).

    ``broadcast_buffers``: DDP's default (True) sends rank 0's buffers to every rank before each
    forward; here those are BatchNorm running statistics, the target encoder's included. With
    SyncBatchNorm everywhere (:func:`convert_sync_batchnorm`, GPU runs) every rank computes the
    same statistics from the same gathered batch moments, so the broadcast would re-send equal
    values each step, a collective the forward waits for: off. Where a BatchNorm stays
    per rank (CPU runs, ``model.sync_bn: false``) it stays on, so that every rank holds rank 0's
    statistics, the ones a checkpoint saves, as with DDP's default in BYOL's and MoCo v3's
    reference code.
    """
    cuda = info.device.type == "cuda"
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[info.device.index] if cuda else None,
        broadcast_buffers=has_local_batchnorm(model),
    )


def build_parts(cfg: TrainConfig, info: DistInfo, loader: Any = None) -> Parts:
    """Model on its device (SyncBN heads under DDP on CUDA, optionally compiled), optimizer,
    scaler, loader and schedules. The model's initial weights depend on ``run.seed`` only, so
    every rank builds the same model (DDP also broadcasts rank 0's)."""
    method = get_method(cfg.method)
    precision = resolve_precision(cfg.run.precision, info.device)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)
    model, _ = build_model(cfg, method)
    model.to(info.device)
    channels_last = cuda and cfg.run.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if info.world_size > 1 and cuda and cfg.model.sync_bn:
        # SyncBatchNorm runs on GPUs only; gloo/CPU runs keep per-rank BN statistics
        convert_sync_batchnorm(model)
    compiled = compile_modules(model) if cfg.run.compile else ()
    optimizer = build_optimizer(model, cfg.optim, fused=cuda)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    module: nn.Module = model
    if info.world_size > 1:
        module = distributed_model(model, info)
    if loader is None:
        loader = build_loader(cfg, info, method)
    schedules = build_schedules(cfg, len(loader), method.schedules)
    return Parts(
        cfg=cfg,
        info=info,
        method=method,
        model=model,
        module=module,
        optimizer=optimizer,
        scaler=scaler,
        precision=precision,
        loader=loader,
        schedules=schedules,
        terms=("loss", *method.terms),
        channels_last=channels_last,
        compiled=compiled,
    )


def _to_device(value: Any, device: torch.device, channels_last: bool) -> Any:
    """Tensors of a batch on ``device``; with ``channels_last``, float images in NHWC: ``[B, C,
    H, W]`` views, and ``[B, K, C, H, W]`` stacks of them (UniVIP's instances) laid out so that
    the step's ``flatten(0, 1)`` is an NHWC ``[B * K, C, H, W]`` view too. Otherwise the
    instance passes would meet channels-last weights with NCHW inputs (a layout conversion per
    convolution on a GPU, and under ``run.compile`` a graph of their own)."""
    if isinstance(value, dict):
        return {k: _to_device(v, device, channels_last) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_device(v, device, channels_last) for v in value]
    if isinstance(value, Tensor):
        value = value.to(device, non_blocking=True)
        if channels_last and value.is_floating_point():
            if value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            elif value.dim() == 5:
                nhwc = value.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                value = nhwc.view(value.shape)
        return value
    return value


def train_step(parts: Parts, batch: dict, step: int) -> Tensor:
    """One optimizer step at ``step`` (0-based) with that step's lr, weight decay and momentum.

    Returns the detached loss terms ``[len(parts.terms)]`` (float32, on the device: no host
    sync here).
    """
    s = parts.schedules
    set_hyperparameters(parts.optimizer, float(s.lr[step]), float(s.weight_decay[step]))
    batch = _to_device(batch, parts.info.device, parts.channels_last)
    hyper = {name: float(values[step]) for name, values in s.method.items()}
    if hyper:  # the method's own values of this step (DINO's teacher temperature)
        batch = {**batch, "hyper": hyper}
    with parts.autocast():
        # SSLModel.forward -> parts.method.step (views through the branches) -> model.loss
        # (the paper's total, e.g. MOS eq. 14), through DDP when there are several ranks
        out = parts.module(batch)
    loss = out["loss"]
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if parts.cfg.optim.clip_grad > 0:
        parts.scaler.unscale_(parts.optimizer)
        clip_gradients(
            [p for g in parts.optimizer.param_groups for p in g["params"]],
            parts.cfg.optim.clip_grad,
            per_param=parts.cfg.optim.clip_per_param,
        )
    if parts.method.on_gradients is not None:  # DINO: the last layer frozen in epoch 0
        parts.method.on_gradients(parts.model, hyper)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    update_momentum(parts.model.momentum_pairs, float(s.momentum[step]))
    return torch.stack([out[t].detach().float() for t in parts.terms])


# ------------------------------------------------------------------------- non-finite guard


class _FiniteGuard:
    """Remembers, on the device and without syncing, the first step whose loss terms were not
    all finite and their values; :meth:`check` syncs (all ranks) and raises."""

    def __init__(self, terms: tuple[str, ...], device: torch.device) -> None:
        self.terms = terms
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.values = torch.zeros(len(terms), device=device)

    def observe(self, step: int, values: Tensor) -> None:
        new = ~torch.isfinite(values).all() & (self.first_bad < 0)
        self.first_bad.masked_fill_(new, step)
        self.values = torch.where(new, values, self.values)

    def check(self) -> None:
        bad_step = int(self.first_bad)  # host sync
        flag = torch.full((1,), float(bad_step >= 0), device=self.first_bad.device)
        if float(all_reduce_max(flag)) > 0:  # a bad rank stops every rank
            if bad_step < 0:
                raise NonFiniteLossError(
                    "the loss became non-finite on another rank; stopping (no checkpoint written "
                    "after it)"
                )
            terms = ", ".join(
                f"{t}={v:.6g}" for t, v in zip(self.terms, self.values.tolist(), strict=True)
            )
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step + 1} ({terms}); stopping. No checkpoint was "
                f"written after that step: {_ADVICE}.",
                step=bad_step + 1,
            )


def _non_finite_state(parts: Parts) -> list[str]:
    """Names of the model's and the optimizer's floating tensors that hold a NaN or an inf
    (every rank checks its own; one host sync)."""
    named = [(f"model.{k}", v) for k, v in parts.model.state_dict().items()]
    for i, st in enumerate(parts.optimizer.state.values()):
        named += [(f"optimizer.state[{i}].{k}", v) for k, v in st.items()]
    named = [(k, v) for k, v in named if isinstance(v, Tensor) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
    return [k for (k, _), ok in zip(named, finite, strict=True) if not ok]


# ----------------------------------------------------------------------------------- outputs


# above this many seconds per step on a CPU, the start says so (a paper recipe on a laptop)
_SLOW_CPU_STEP_S = 10.0
_SLOW_CPU_RUN_S = 3600.0  # ... and the whole run more than this (a short run is left alone)


def schedule_warnings(cfg: TrainConfig, parts: Parts) -> list[str]:
    """What a run's start should point out before it trains: an lr warm-up longer than the
    run (the peak lr is never reached), and on a CPU a step so slow that the recipe is not
    meant for it (one backbone forward is timed to estimate the step)."""
    out = []
    sched = parts.schedules
    warmup = warmup_steps(cfg, sched.steps_per_epoch)
    if warmup > sched.total_steps:
        out.append(
            f"the lr warm-up (schedule.warmup_epochs={cfg.schedule.warmup_epochs:g}: {warmup} "
            f"steps) is longer than the run ({sched.total_steps} steps): the lr ends at "
            f"{sched.lr[-1]:.3g}, {sched.lr[-1] / max(peak_lr(cfg), 1e-30):.0%} of its peak; "
            "lower it, e.g. --set schedule.warmup_epochs=0"
        )
    if parts.info.device.type == "cpu" and not cfg.data.synthetic:
        per_step = _cpu_step_estimate(cfg, parts)
        total = per_step * sched.total_steps
        if per_step > _SLOW_CPU_STEP_S and total > _SLOW_CPU_RUN_S:
            out.append(
                f"on this CPU a step of this recipe takes about {per_step:.0f} s ({cfg.model.backbone} "
                f"at {cfg.data.size} px, global batch {cfg.data.batch_size}; one forward timed), "
                f"so {sched.total_steps} steps take about {_format_eta(total)}; for a first run on "
                "a CPU start from --config configs/demo_mos_cpu.yaml (or demo_univip_cpu.yaml)"
            )
    return out


@torch.no_grad()
def _cpu_step_estimate(cfg: TrainConfig, parts: Parts) -> float:
    """Seconds per step: one no-grad forward of the online backbone on 2 images, scaled by the
    method's forward-equivalents per sample (train.tools.quality) and this rank's batch."""
    backbone = parts.model.online.backbone
    x = torch.zeros(2, 3, cfg.data.size, cfg.data.size)
    was_training = backbone.training
    backbone.eval()
    backbone(x)  # allocations out of the way
    times = []
    for _ in range(3):  # the fastest of three: other load on the machine only slows a run
        t0 = time.perf_counter()
        backbone(x)
        times.append(time.perf_counter() - t0)
    per_image = min(times) / 2
    backbone.train(was_training)
    return per_image * forward_equivalents(cfg) * cfg.data.batch_size / parts.info.world_size


def eta_seconds(done: int, start: int, total: int, train_seconds: float) -> float | None:
    """Seconds left to step ``total`` at the cumulative rate of this start of the run:
    ``done - start`` steps took ``train_seconds`` of training (kNN evaluations and checkpoint
    saves not counted). ``None`` before the first step."""
    if done <= start or train_seconds <= 0:
        return None
    return (total - done) * train_seconds / (done - start)


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# -------------------------------------------------------------------------------- periodic kNN


def build_monitor(cfg: TrainConfig, info: DistInfo) -> KNNMonitor | None:
    """The periodic kNN of ``eval.every`` (``train.eval.features.KNNMonitor``: both eval loaders
    opened now, so unlabelled shards fail before training), or ``None`` when it is off."""
    if cfg.eval.every <= 0:
        return None

    e = cfg.eval
    return KNNMonitor(
        shard_location(e.train, "eval.train"),
        shard_location(e.val, "eval.val"),
        size=cfg.data.size,
        batch_size=e.batch_size,
        k=e.k,
        temperature=e.temperature,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        num_threads=cfg.data.num_threads,
    )


def knn_step(parts: Parts, monitor: KNNMonitor, step: int) -> dict:
    """kNN accuracy of the backbone of ``eval.branch`` after ``step`` steps (every rank calls
    it), under the run's autocast. The model is left in train mode and every RNG stream as it
    was (``capture_rng``/``restore_rng``), so an evaluated run trains exactly like one that is
    not. Returns the metrics line ``{"step", "eval/knn_top1", "eval/knn_top5"}`` of the
    branch (the target's with ``both``, which adds ``eval/knn_online_top1``/``_top5``)."""
    branch = parts.cfg.eval.branch
    encoders = {"target": parts.model.target}
    if branch == "online":
        encoders = {"online": parts.model.online}
    elif branch == "both":
        encoders["online"] = parts.model.online
    rng = capture_rng(parts.info.device)
    record: dict = {"step": step}
    try:
        for i, (name, encoder) in enumerate(encoders.items()):
            acc = monitor(encoder.backbone, parts.autocast, parts.channels_last)
            prefix = "eval/knn" if i == 0 else f"eval/knn_{name}"
            record[f"{prefix}_top1"], record[f"{prefix}_top5"] = acc.top1, acc.top5
    finally:
        parts.model.train()
        restore_rng(rng, parts.info.device)
    return record


# -------------------------------------------------------------------------------------- loop


def pretrain(
    cfg: TrainConfig,
    loader: Any = None,
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
    verify_shards: bool = True,
) -> dict:
    """Pretrain ``cfg.method`` into the run directory ``cfg.run.out``.

    Resumes from ``resume`` (a checkpoint file, as :func:`resolve_resume` returns it with the
    config that goes with it, or a run directory) or, if not given, from the newest checkpoint
    already in ``cfg.run.out``. ``loader``: any object with the loader
    interface (tests pass a :class:`train.synthetic.SyntheticLoader`); by default it is built
    from the config. Under ``torchrun`` every rank calls this. ``verify_shards``: check each
    shard's sha256 against the manifest before training (:func:`check_data`; sizes are always
    checked); ``False`` is ``--no-verify-shards``.

    Returns ``{"step", "start_step", "checkpoint", "metrics", "eval"}`` (start_step: where this
    call began, 0 or a resumed checkpoint's step; metrics: the training lines logged by this
    call; eval: its kNN lines, with ``eval.every``).
    Raises :class:`NonFiniteLossError` on a NaN/inf loss or weight, :class:`ConfigError` on a
    config that cannot run, :class:`pipeline.source.ShardError` on a shard that differs from
    its manifest, :class:`train.checkpoint.CheckpointWriteError` when a checkpoint cannot be
    written (disk full).
    """
    info = init_distributed(cfg.run.device)
    try:
        return _pretrain(cfg, info, loader, resume, log, verify_shards)
    finally:
        cleanup_distributed(info)


def _pretrain(
    cfg: TrainConfig, info: DistInfo, loader: Any, resume: Any, log: Callable, verify: bool
) -> dict:
    """One start of a run, phase by phase: restore state, open the run, the step loop (with its
    evaluations and checkpoints), close."""
    if not cfg.run.out:
        raise ConfigError("run.out: no run directory given (--out RUN)")
    run_dir = Path(cfg.run.out)
    check_config(cfg)
    _check_loggers(cfg, info)  # before any work: W&B on but not installed
    if info.is_main:
        _remove_temporaries(run_dir, log)
    resumed = _read_resume(cfg, info, run_dir, resume, log)
    check_data(cfg, info, run_dir, verify, log)
    run = _open_run(cfg, info, run_dir, loader, resumed, log)
    finished = False
    try:
        _step_loop(run)
        finished = True
    except NonFiniteLossError as e:
        run.record_non_finite(e)
        raise
    finally:  # also on a crash or a NaN: stop the loader's threads, flush the events
        run.close(ok=finished)
    if info.is_main and run.start >= run.total:
        log(f"nothing to do: {run_dir} is already trained to step {run.total}")
    return {
        "step": run.total,
        "start_step": run.start,
        "checkpoint": str(run.last_ckpt) if run.last_ckpt else None,
        "metrics": run.logged,
        "eval": run.evals,
    }


def _step_loop(run: _Run) -> None:
    """The steps from ``run.start`` to the last: next batch, :func:`train_step`, and at their
    intervals the metrics line, the kNN evaluation and the checkpoint."""
    cfg, parts = run.cfg, run.parts
    steps_per_epoch, total = run.steps_per_epoch, run.total
    batches = run.batches
    parts.model.train()
    for step in range(run.start, total):
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0 and step != run.start:  # a new epoch (the first is positioned already)
            parts.loader.set_epoch(epoch)
            batches = iter(parts.loader)
        batch = next(batches)

        values = train_step(parts, batch, step)

        run.observe(step, values)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == total:
            run.log_metrics(step)
        # before the checkpoint of the same step: a run resumed from that checkpoint never
        # lacks this line, and one resumed from an earlier checkpoint recomputes it
        if run.monitor is not None and (done % cfg.eval.every == 0 or done == total):
            run.evaluate(done)
        if done % cfg.run.ckpt_every == 0 or done == total:
            run.checkpoint(done)


# ------------------------------------------------------------------------ phases of a start


def _remove_temporaries(run_dir: Path, log: Callable) -> None:
    """Rank 0: remove the temporary files of a save that a kill interrupted."""
    removed, kept = remove_stale_temporaries(run_dir)
    if removed:
        log(
            f"removed {len(removed)} temporary file(s) of an interrupted save: "
            + ", ".join(str(p.relative_to(run_dir)) for p in removed)
        )
    for path in kept:
        log(f"kept {path}: its writer (PID {path.name.rsplit('-', 1)[1]}) is still running")


@dataclass
class _Resumed:
    """The checkpoint a start resumes from: its path, its contents (``None`` for a new run)
    and the changes a non-finite stop allowed (:func:`check_resume_config`)."""

    path: Path | None = None
    state: dict | None = None
    relaxed: list[str] = field(default_factory=list)


def _read_resume(
    cfg: TrainConfig, info: DistInfo, run_dir: Path, resume: Any, log: Callable
) -> _Resumed:
    """Find and load the checkpoint to resume (:func:`find_resume_checkpoint`) and check that
    this run may continue it: same config but :data:`RESUMABLE_KEYS`, same world size."""
    path = find_resume_checkpoint(run_dir, resume)
    if path is None:
        return _Resumed()
    state = load_checkpoint(path)
    non_finite = read_non_finite(path)
    if non_finite is not None:  # never call an untested checkpoint good
        path, state = _checked_after_non_finite(cfg, info, path, state, log, resume is None)
    relaxed = check_resume_config(cfg, state["config"], non_finite, int(state["step"]))
    if relaxed and info.is_main:
        log(
            f"resuming {path.name} after the non-finite stop at step "
            f"{non_finite['step']} with changed keys (allowed after a non-finite stop, "
            "docs/training.md): " + "; ".join(relaxed)
        )
    if state["world_size"] != info.world_size:
        raise ConfigError(
            f"cannot resume {path}: it was written by {state['world_size']} process(es), "
            f"this run has {info.world_size}; resume with the same number of processes"
        )
    return _Resumed(path, state, relaxed)


# a weight this large (absolute) is a diverged run, not a trained network
SANE_WEIGHT = 1e4


def checkpoint_problem(cfg: TrainConfig, state: dict, info: DistInfo) -> str | None:
    """Why the weights of ``state`` cannot be trained on, or ``None``: a non-finite tensor, a
    parameter beyond :data:`SANE_WEIGHT`, or a non-finite loss of one forward pass (no
    gradient) on a small random batch of the method's views. The model is built from ``cfg``
    (the config of the resuming run) and thrown away after."""
    model, _ = build_model(cfg)
    model.load_state_dict(state["model"])
    model.to(info.device)
    params = dict(model.named_parameters())
    for name, value in state["model"].items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{name} holds NaN or inf"
        if name in params and value.numel() and float(value.abs().max()) > SANE_WEIGHT:
            return f"{name} has a weight of {float(value.abs().max()):.3g} (a diverged run)"
    small = cfg.replace(data=dataclasses.replace(cfg.data, batch_size=4 * info.world_size))
    batch = next(iter(synthetic_loader(small, info, num_samples=8 * info.world_size)))
    hyper = {
        name: float(v[0])
        for name, v in build_schedules(cfg, 1, get_method(cfg.method).schedules).method.items()
    }
    if hyper:
        batch["hyper"] = hyper
    model.train()
    with torch.no_grad():
        out = model(batch)
    values = {k: float(v) for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        return (
            "one forward pass gives a non-finite loss ("
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + ")"
        )
    return None


def _checked_after_non_finite(
    cfg: TrainConfig, info: DistInfo, path: Path, state: dict, log: Callable, step_back: bool
) -> tuple[Path, dict]:
    """After a non-finite stop: ``path`` if it passes :func:`checkpoint_problem`, else (with
    ``step_back``: the checkpoint was not named by ``--resume``) the newest older kept one
    that does; each rank checks the same files in the same order. Raises
    :class:`NonFiniteLossError` when none passes."""
    candidates = [path]
    if step_back:
        older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        candidates += older[::-1]
    failed = []
    for candidate in candidates:
        if candidate != path:
            state = load_checkpoint(candidate)
        problem = checkpoint_problem(cfg, state, info)
        if problem is None:
            if info.is_main:
                log(
                    f"checked {candidate.name} after the non-finite stop: finite weights of "
                    "sane size, a finite loss on one forward pass"
                    + (f" (skipped, failing: {', '.join(failed)})" if failed else "")
                )
            return candidate, state
        failed.append(candidate.name)
        if info.is_main:
            log(f"{candidate.name} cannot be resumed after the non-finite stop: {problem}")
    raise NonFiniteLossError(
        f"no kept checkpoint of {path.parent.parent} passes the check after the non-finite stop "
        f"({', '.join(failed)}): start a new run directory with a lower lr"
    )


def _restore(parts: Parts, resumed: _Resumed) -> tuple[int, dict]:
    """Load the checkpoint into the parts (model, optimizer, scaler, this rank's RNG) and
    return ``(start step, data position)``; a new run seeds this rank's streams instead."""
    cfg, info = parts.cfg, parts.info
    state = resumed.state
    if state is None:
        seed = cfg.run.seed + info.rank  # per-rank streams (drop path), after the shared init
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return 0, {}
    steps_per_epoch = parts.schedules.steps_per_epoch
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    start = int(state["step"])
    position = state["loader"]
    if position["epoch"] * steps_per_epoch + position["batch"] != start:
        raise ConfigError(
            f"cannot resume {resumed.path}: its data position {position} does not match step "
            f"{start} with {steps_per_epoch} batches per epoch (did the data set change?)"
        )
    restore_rng(state["rng"][info.rank], info.device)
    resumed.state = None  # the checkpoint's tensors are in the parts now
    return start, position


def _write_run_files(
    cfg: TrainConfig, info: DistInfo, run_dir: Path, parts: Parts, start: int, resumed: _Resumed
) -> None:
    """Rank 0: the resolved ``config.yaml`` and this start's session appended to ``run.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(to_dict(cfg)))
    info_path = run_dir / "run.json"
    sessions = []
    if info_path.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            sessions = json.loads(info_path.read_text())["sessions"]
    session = run_info(info.device, info.world_size)
    session.update(
        start_step=start,
        resumed_from=str(resumed.path) if resumed.path else None,
        precision=parts.precision,
        steps_per_epoch=parts.schedules.steps_per_epoch,
        total_steps=parts.schedules.total_steps,
    )
    if resumed.relaxed:
        session["changed_after_non_finite"] = resumed.relaxed
    atomic_write_json(info_path, {"method": cfg.method, "sessions": [*sessions, session]})


def _open_run(
    cfg: TrainConfig,
    info: DistInfo,
    run_dir: Path,
    loader: Any,
    resumed: _Resumed,
    log: Callable,
) -> _Run:
    """Build the parts (:func:`build_parts`) and the periodic kNN, restore the checkpoint into
    them, write the run directory's files, open the metrics sinks (:class:`RunLog`) and put
    the loader at the start step. On any failure what was opened is closed again."""
    parts = build_parts(cfg, info, loader)
    with contextlib.ExitStack() as opened:
        if loader is None:  # a loader passed in belongs to the caller
            opened.callback(parts.loader.close)
        monitor = build_monitor(cfg, info)
        if monitor is not None:
            opened.callback(monitor.close)
        start, position = _restore(parts, resumed)
        if info.is_main:
            _write_run_files(cfg, info, run_dir, parts, start, resumed)
        runlog = _open_runlog(cfg, info, run_dir, start, parts.terms)
        if runlog is not None:
            opened.callback(runlog.close, ok=False)
        own = loader is None
        run = _Run(cfg, info, run_dir, parts, log, own, monitor, runlog, start, resumed.path)
        opened.pop_all()  # from here the run closes what it holds
    try:
        run.begin(position)
    except BaseException:
        run.close(ok=False)
        raise
    return run


class _Run:
    """One start of a run while it trains: the parts, the periodic kNN, rank 0's
    :class:`RunLog`, the progress bar, the loss-term sums of the current log window, the
    training-time clock (kNN and checkpoint saves excluded) and what this start logged."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        run_dir: Path,
        parts: Parts,
        log: Callable,
        own_loader: bool,
        monitor: KNNMonitor | None,
        runlog: RunLog | None,
        start: int,
        last_ckpt: Path | None,
    ) -> None:
        self.cfg, self.info, self.run_dir, self.parts, self.log = cfg, info, run_dir, parts, log
        self.own_loader = own_loader  # close the loader with the run (not one passed in)
        self.monitor = monitor  # the periodic kNN of eval.every, or None
        self.runlog = runlog  # rank 0's metrics sinks; None on the other ranks
        self.main = info.is_main
        self.steps_per_epoch = parts.schedules.steps_per_epoch
        self.total = parts.schedules.total_steps
        self.start = start  # the step this start begins at (0, or the checkpoint's)
        self.done = start  # steps done so far
        self.last_ckpt = last_ckpt  # the newest checkpoint written, or the one resumed
        self.logged: list[dict] = []  # the training lines of this start
        self.evals: list[dict] = []  # its kNN lines
        self.guard = _FiniteGuard(parts.terms, info.device)
        self.sums = torch.zeros(len(parts.terms), device=info.device)  # the log window's
        self.batches: Any = None  # the loader's iterator, from begin()
        self.bar = tqdm(
            total=self.total,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.main and cfg.run.progress and sys.stderr.isatty()),
        )
        self.t_begin = self.t_last = time.perf_counter()  # restarted by begin()
        self.n_since = 0  # steps in the current log window
        self.train_seconds = 0.0  # training time since this start

    def begin(self, position: dict) -> None:
        """The loader at the start step (``position``: the checkpoint's data position), the
        start line; the clocks start now."""
        cfg, parts = self.cfg, self.parts
        if self.start < self.total:
            epoch, index = divmod(self.start, self.steps_per_epoch)
            if index == 0:
                parts.loader.set_epoch(epoch)
            else:
                parts.loader.load_state_dict({**position, "epoch": epoch, "batch": index})
        self.batches = iter(parts.loader)
        if self.main:
            self.log(
                f"{cfg.method}: steps {self.start}/{self.total} ({self.steps_per_epoch} per "
                f"epoch), global batch {cfg.data.batch_size} on {self.info.world_size} x "
                f"{self.info.device}, {parts.precision}, run dir {self.run_dir}"
            )
            for warning in schedule_warnings(cfg, parts):
                self.log(f"warning: {warning}")
        self.t_begin = self.t_last = time.perf_counter()

    def observe(self, step: int, values: Tensor) -> None:
        """Step ``step``'s loss terms: into the non-finite guard and the window's sums. After
        the first step of this start, its time and the ETA at that pace (a run with a long
        ``log_every`` is not silent until its first metrics line)."""
        self.guard.observe(step, values)
        self.sums += values
        self.n_since += 1
        self.done = step + 1
        self.bar.update(1)
        if step == self.start and self.main and self.done < self.total:
            values.cpu()  # the step's work done, on a GPU too (one sync, once)
            took = time.perf_counter() - self.t_begin
            self.log(
                f"first step: {took:.1f} s (start-up included); at that pace the "
                f"{self.total - self.done} steps left take {_format_eta(took * (self.total - self.done))}"
            )

    def log_metrics(self, step: int) -> None:
        """The training line of the window ending with ``step``: terms averaged over its steps
        and all ranks, schedules, images/s; to the :class:`RunLog`, the bar or the log."""
        self.guard.check()
        cfg, sched, terms = self.cfg, self.parts.schedules, self.parts.terms
        done = step + 1
        means = all_reduce_mean(self.sums / self.n_since).tolist()  # over steps and ranks
        now = time.perf_counter()
        self.train_seconds += now - self.t_last
        rate = self.n_since * cfg.data.batch_size / max(now - self.t_last, 1e-9)  # window's
        record = {
            "step": done,
            "epoch": round(done / self.steps_per_epoch, 4),
            "lr": float(sched.lr[step]),
            "wd": float(sched.weight_decay[step]),
            "momentum": float(sched.momentum[step]),
            **{name: float(values[step]) for name, values in sched.method.items()},
            **dict(zip(terms, means, strict=True)),
            "images_per_s": round(rate, 2),
            "elapsed_s": round(now - self.t_begin, 3),
        }
        self.logged.append(record)
        if self.main:
            self.runlog.write(record)
            shown = {t: f"{v:.4f}" for t, v in zip(terms, means, strict=True)}
            self.bar.set_postfix(**shown, img_s=f"{rate:.1f}", refresh=False)
            if self.bar.disable:
                eta = eta_seconds(done, self.start, self.total, self.train_seconds)
                self.log(
                    f"step {done}/{self.total} ep {record['epoch']:.2f} "
                    + " ".join(f"{t} {v}" for t, v in shown.items())
                    + f" lr {record['lr']:.3g} {rate:.1f} img/s eta {_format_eta(eta)}"
                )
        self.sums.zero_()
        self.t_last, self.n_since = now, 0

    def evaluate(self, done: int) -> None:
        """The kNN line after ``done`` steps (:func:`knn_step`), to the :class:`RunLog` and the
        log; its time is not training time (images/s, ETA)."""

        t_eval = time.perf_counter()
        record = knn_step(self.parts, self.monitor, done)
        self.evals.append(record)
        seconds = time.perf_counter() - t_eval
        self.t_last += seconds
        if self.main:
            self.runlog.write(record)
            with tqdm.external_write_mode():
                first = "online" if self.cfg.eval.branch == "online" else "target"
                online = record.get("eval/knn_online_top1")
                self.log(
                    f"step {done}/{self.total} kNN top-1 {record['eval/knn_top1']:.2f}% "
                    f"top-5 {record['eval/knn_top5']:.2f}% ({first}"
                    + (f"; online top-1 {online:.2f}%" if online is not None else "")
                    + f", {seconds:.1f} s)"
                )

    def checkpoint(self, done: int) -> None:
        """The checkpoint after ``done`` steps (:func:`_save`), once every loss so far is
        finite; its time is not training time either."""
        self.guard.check()
        t_save = time.perf_counter()
        self.last_ckpt = _save(self.parts, self.run_dir, done, self.steps_per_epoch)
        self.t_last += time.perf_counter() - t_save

    def record_non_finite(self, e: NonFiniteLossError) -> None:
        """Rank 0 writes ``RUN/non-finite.json``: what lets the resume change the lr or the
        clipping (:func:`check_resume_config`)."""
        if self.main:
            atomic_write_json(
                self.run_dir / NON_FINITE_FILE,
                {
                    "step": e.step if e.step is not None else self.done,
                    "last_checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                    "message": str(e),
                    "optim.base_lr": self.cfg.optim.base_lr,
                    "optim.clip_grad": self.cfg.optim.clip_grad,
                },
            )

    def close(self, ok: bool) -> None:
        """Close what this start opened: the bar, its own loader, the kNN loaders, the
        :class:`RunLog` (``ok=False``: the W&B run is marked failed)."""
        self.bar.close()
        if self.own_loader:
            self.parts.loader.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.runlog is not None:
            self.runlog.close(ok=ok)


def _check_loggers(cfg: TrainConfig, info: DistInfo) -> None:
    """Rank 0 (the only one that logs) imports what ``run.wandb`` needs
    (:func:`train.runlog.require_wandb`); every rank raises the same error when it cannot."""
    problem = None
    if info.is_main:
        try:
            require_wandb(cfg)
        except RuntimeError as e:
            problem = str(e)
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise RuntimeError(problems[0])


def _open_runlog(
    cfg: TrainConfig, info: DistInfo, run_dir: Path, start: int, terms: tuple[str, ...]
) -> RunLog | None:
    """Rank 0's :class:`train.runlog.RunLog` at ``start`` (``None`` on the other ranks); when
    rank 0 cannot open it (W&B not logged in, ...), every rank raises."""
    runlog, problem = None, None
    if info.is_main:
        metrics = [f"train/{t}" for t in terms]
        if cfg.eval.every > 0:
            metrics += ["eval/knn_top1", "eval/knn_top5"]
        try:
            runlog = RunLog(run_dir, cfg, start, metrics=metrics)
        except Exception as e:
            problem = e
    problems = all_gather_objects(
        None if problem is None else f"{type(problem).__name__}: {problem}"
    )
    if problem is not None:
        raise problem
    failed = [p for p in problems if p]
    if failed:
        raise RuntimeError(f"rank 0 could not open the run's logs: {failed[0]}")
    return runlog


def _save(parts: Parts, run_dir: Path, step: int, steps_per_epoch: int) -> Path:
    """Gather every rank's RNG state; rank 0 writes the checkpoint; all ranks wait for it.

    Only a finite state is saved: the loss guard sees the loss of a step, computed before that
    step's update, so the weights after the update are checked here (every rank) and a NaN or
    an inf in any weight or optimizer state raises :class:`NonFiniteLossError` instead."""
    bad = _non_finite_state(parts)
    flag = torch.full((1,), float(len(bad)), device=parts.info.device)
    if float(all_reduce_max(flag)) > 0:
        total = len(parts.model.state_dict())
        named = f"{len(bad)} tensors, e.g. {', '.join(bad[:3])}" if bad else "on another rank"
        raise NonFiniteLossError(
            f"non-finite weights or optimizer state after step {step} ({named}; the model has "
            f"{total} tensors); stopping without writing that checkpoint: {_ADVICE}.",
            step=step,
        )
    rng = all_gather_objects(capture_rng(parts.info.device))
    path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    if parts.info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "method": parts.cfg.method,
            "step": step,
            "epoch": step / steps_per_epoch,
            "world_size": parts.info.world_size,
            "config": to_dict(parts.cfg),
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "loader": _loader_position(parts.loader, step, steps_per_epoch),
            "rng": rng,
        }
        keep = parts.cfg.run
        path = save_checkpoint(state, run_dir, step, keep.keep_last, keep.keep_every)
    barrier()
    return path


def _loader_position(loader: Any, step: int, steps_per_epoch: int) -> dict:
    """The loader's state after ``step`` steps, as ints (``{"epoch", "batch"}`` plus whatever
    else the loader reports, kept if it is made of primitives)."""
    state = dict(loader.state_dict())
    epoch, batch = divmod(step, steps_per_epoch)
    if state.get("batch") == steps_per_epoch and batch == 0:  # finished epoch, not started next
        epoch, batch = epoch - 1, steps_per_epoch
    state["epoch"], state["batch"] = int(epoch), int(batch)
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
