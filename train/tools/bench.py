"""``ssl-cli bench train``: the full trainer's images/s against its own compute ceiling.

Two measurements in one process, with the same model, optimizer and :func:`train.loop.train_step`:

- **end to end**: batches from the real shard loader (decode + views on the fly);
- **synthetic**: batches of the same shapes made once and already on the device
  (:class:`train.synthetic.SyntheticLoader` with a pool): no data cost at all, the ceiling.

``ratio = end_to_end / synthetic`` is the figure to watch (target >= 0.95). With ``baseline``
(``--baseline mocov3``), the synthetic step of another method on the same model, batch and
device is measured in the same process, interleaved with this one's (A B A B: drifts of a shared
machine hit both), and ``ratio_to_baseline = synthetic / baseline synthetic`` is the cost of
one method's step against the other's. Each phase first runs
``warmup`` untimed steps (cuDNN autotuning, ``torch.compile``), then ``steps`` timed ones; the
clock stops only after the device has finished (``torch.cuda.synchronize``). images/s counts
samples of the global batch (a MOS sample is 4 views, a UniVIP sample 2 scenes + K instances).
While a phase runs, a progress line goes to stderr at most every few seconds (phase, warm-up or
timed, steps done/total, elapsed, ETA of that part at its cumulative rate); the timed loop pays
one clock read and a comparison per step for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.bench import Progress, to_stderr
from train.config import TrainConfig, to_dict
from train.data import build_loader, synthetic_loader
from train.distributed import cleanup_distributed, init_distributed
from train.loop import build_parts, train_step
from train.resolve import resolve_config
from train.runinfo import describe_device, library_versions

__all__ = ["baseline_config", "bench_train", "measure_steps"]


def _endless(loader: Any) -> Iterator[dict]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(
    parts,
    loader: Any,
    warmup: int,
    steps: int,
    progress: Callable[[str], None] | None = None,
    phase: str = "bench train",
    progress_every: float = 5.0,
) -> dict:
    """Images/s of ``steps`` training steps after ``warmup`` untimed ones. ``progress``: a line
    at most every ``progress_every`` seconds (``phase``, warm-up or timed, steps done/total,
    elapsed and ETA of that part); ``None``: silent."""
    batches = _endless(loader)
    total = parts.schedules.total_steps
    values = None
    ticker = Progress(progress, progress_every) if progress is not None else None
    for i in range(warmup):
        values = train_step(parts, next(batches), i % total)
        if ticker is not None and ticker.due(now := time.perf_counter()):
            ticker.say(f"{phase}, warm-up: {i + 1}/{warmup} steps", i + 1, warmup, now)
    if values is not None:
        values.tolist()
    _sync(parts.info.device)
    t0 = time.perf_counter()
    if ticker is not None:  # the ETA of the timed steps counts from their start
        ticker.start, ticker.next_at = t0, min(ticker.next_at, t0 + ticker.every)
    for i in range(steps):
        values = train_step(parts, next(batches), (warmup + i) % total)
        if ticker is not None and ticker.due(now := time.perf_counter()):
            ticker.say(f"{phase}, timed: {i + 1}/{steps} steps", i + 1, steps, now)
    last = values.tolist() if values is not None else []
    _sync(parts.info.device)
    seconds = time.perf_counter() - t0
    images = steps * parts.cfg.data.batch_size
    return {
        "steps": steps,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "last_loss": dict(zip(parts.terms, last, strict=True)),
    }


def baseline_config(cfg: TrainConfig, method: str) -> TrainConfig:
    """``cfg`` with another method: the same model, data sizes, batch, optimizer and run
    settings (so a step of each costs what its method adds), the baseline's own loss defaults
    and view set (``data.views`` cleared: view-set options are per method)."""
    d = to_dict(cfg)
    layer = {k: d[k] for k in ("data", "model", "optim", "schedule", "ema", "run")}
    layer["data"] = {**layer["data"], "views": {}}
    layer["method"] = method
    return resolve_config(layer)


def _synthetic_parts(cfg: TrainConfig, info) -> tuple[Any, Any]:
    loader = synthetic_loader(
        cfg, info, num_samples=max(cfg.data.synthetic_samples, 4 * cfg.data.batch_size), pool=4
    )
    parts = build_parts(cfg, info, loader=loader)
    parts.model.train()
    return parts, loader


def _merge(a: dict, b: dict) -> dict:
    """Two measurements of one phase as one: total steps over total seconds."""
    steps, seconds = a["steps"] + b["steps"], a["seconds"] + b["seconds"]
    images = a["images_per_s"] * a["seconds"] + b["images_per_s"] * b["seconds"]
    return {
        "steps": steps,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "rounds": [a["images_per_s"], b["images_per_s"]],
        "last_loss": b["last_loss"],
    }


def bench_train(
    cfg: TrainConfig,
    steps: int = 50,
    warmup: int = 10,
    synthetic_only: bool = False,
    baseline: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = to_stderr,
    progress_every: float = 5.0,
) -> dict:
    """Time the trainer on real shards and on on-device synthetic tensors; returns a report.
    ``baseline``: also time that method's synthetic step (see the module docstring). ``log``:
    the phases and results; ``progress``: a line at most every ``progress_every`` seconds
    while a phase runs (:func:`measure_steps`), stderr by default (rank 0 only), ``None``:
    none."""
    info = init_distributed(cfg.run.device)
    try:
        if not info.is_main:
            progress = None
        tick = dict(progress=progress, progress_every=progress_every)
        if baseline is not None:
            return _bench_against(
                cfg, baseline_config(cfg, baseline), info, steps, warmup, log, tick
            )
        ceiling_loader = synthetic_loader(
            cfg, info, num_samples=max(cfg.data.synthetic_samples, 4 * cfg.data.batch_size), pool=4
        )
        real_loader = None if synthetic_only else build_loader(cfg, info)
        parts = build_parts(cfg, info, loader=real_loader or ceiling_loader)
        parts.model.train()
        report: dict[str, Any] = {
            "method": cfg.method,
            "backbone": cfg.model.backbone,
            "global_batch": cfg.data.batch_size,
            "world_size": info.world_size,
            "precision": parts.precision,
            "compile": cfg.run.compile,
            "device": describe_device(info.device),
            "versions": library_versions(),
            "config": to_dict(cfg),
        }
        log(
            f"bench train: {cfg.method} {cfg.model.backbone}, global batch {cfg.data.batch_size}, "
            f"{parts.precision}{', compiled' if cfg.run.compile else ''}, {report['device']}"
        )
        log(f"synthetic (on-device tensors, the ceiling): {warmup} warm-up + {steps} steps ...")
        report["synthetic"] = measure_steps(
            parts, ceiling_loader, warmup, steps, phase="bench train: synthetic", **tick
        )
        log(f"  {report['synthetic']['images_per_s']:.1f} images/s")
        if real_loader is not None:
            source = "synthetic batches made per step" if cfg.data.synthetic else cfg.data.shards
            log(f"end to end ({source}): {warmup} warm-up + {steps} steps ...")
            report["end_to_end"] = measure_steps(
                parts, real_loader, warmup, steps, phase="bench train: end to end", **tick
            )
            report["ratio"] = round(
                report["end_to_end"]["images_per_s"] / report["synthetic"]["images_per_s"], 4
            )
            log(
                f"  {report['end_to_end']['images_per_s']:.1f} images/s = "
                f"{100 * report['ratio']:.1f}% of the synthetic ceiling (target >= 95%)"
            )
            real_loader.close()
        ceiling_loader.close()
        return report
    finally:
        cleanup_distributed(info)


def _bench_against(
    cfg: TrainConfig,
    base_cfg: TrainConfig,
    info,
    steps: int,
    warmup: int,
    log: Callable,
    tick: dict,
) -> dict:
    """Synthetic steps of ``cfg`` and ``base_cfg`` interleaved: A B A B, ``steps`` each time."""
    runs = {"method": _synthetic_parts(cfg, info), "baseline": _synthetic_parts(base_cfg, info)}
    names = {"method": cfg.method, "baseline": base_cfg.method}
    log(
        f"bench train: {cfg.method} against {base_cfg.method}, {cfg.model.backbone}, global "
        f"batch {cfg.data.batch_size}, synthetic on-device batches, {describe_device(info.device)}"
    )
    rounds: dict[str, list[dict]] = {"method": [], "baseline": []}
    for r in range(2):
        for key, (parts, loader) in runs.items():
            phase = f"bench train: round {r + 1}/2, {names[key]}"
            rounds[key].append(
                measure_steps(parts, loader, warmup if r == 0 else 0, steps, phase=phase, **tick)
            )
            log(f"  round {r + 1} {names[key]}: {rounds[key][-1]['images_per_s']:.1f} images/s")
    for _, loader in runs.values():
        loader.close()
    method, base = (_merge(*rounds[k]) for k in ("method", "baseline"))
    ratio = round(method["images_per_s"] / base["images_per_s"], 4)
    log(f"{cfg.method} / {base_cfg.method} = {ratio:.2f} (images/s per step, same model)")
    return {
        "method": cfg.method,
        "baseline": base_cfg.method,
        "backbone": cfg.model.backbone,
        "global_batch": cfg.data.batch_size,
        "world_size": info.world_size,
        "precision": runs["method"][0].precision,
        "compile": cfg.run.compile,
        "device": describe_device(info.device),
        "versions": library_versions(),
        "config": to_dict(cfg),
        "baseline_config": to_dict(base_cfg),
        "synthetic": method,
        "baseline_synthetic": base,
        "ratio_to_baseline": ratio,
    }
