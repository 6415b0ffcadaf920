"""``ssl-cli bench train``: the full trainer's images/s against its own compute ceiling.

Two measurements in one process, with the same model, optimizer and :func:`train.loop.train_step`:

- **end to end**: batches from the real shard loader (decode + views on the fly);
- **synthetic**: batches of the same shapes made once and already on the device
  (:class:`train.synthetic.SyntheticLoader` with a pool): no data cost at all, the ceiling.

``ratio = end_to_end / synthetic`` is the figure to watch (target >= 0.95). Each phase first runs
``warmup`` untimed steps (cuDNN autotuning, ``torch.compile``), then ``steps`` timed ones; the
clock stops only after the device has finished (``torch.cuda.synchronize``). images/s counts
samples of the global batch (a MOS sample is 4 views, a UniVIP sample 2 scenes + K instances).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from train.config import TrainConfig, to_dict
from train.distributed import cleanup_distributed, init_distributed
from train.loop import build_loader, build_parts, synthetic_loader, train_step
from train.runinfo import describe_device, library_versions

__all__ = ["bench_train"]


def _endless(loader: Any) -> Iterator[dict]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(parts, loader: Any, warmup: int, steps: int) -> dict:
    """Images/s of ``steps`` training steps after ``warmup`` untimed ones."""
    batches = _endless(loader)
    total = parts.schedules.total_steps
    values = None
    for i in range(warmup):
        values = train_step(parts, next(batches), i % total)
    if values is not None:
        values.tolist()
    _sync(parts.info.device)
    t0 = time.perf_counter()
    for i in range(steps):
        values = train_step(parts, next(batches), (warmup + i) % total)
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


def bench_train(
    cfg: TrainConfig,
    steps: int = 50,
    warmup: int = 10,
    synthetic_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Time the trainer on real shards and on on-device synthetic tensors; returns a report."""
    info = init_distributed(cfg.run.device)
    try:
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
        report["synthetic"] = _measure(parts, ceiling_loader, warmup, steps)
        log(f"  {report['synthetic']['images_per_s']:.1f} images/s")
        if real_loader is not None:
            source = "synthetic batches made per step" if cfg.data.synthetic else cfg.data.shards
            log(f"end to end ({source}): {warmup} warm-up + {steps} steps ...")
            report["end_to_end"] = _measure(parts, real_loader, warmup, steps)
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
