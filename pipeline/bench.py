"""``ssl-cli bench pipeline``: our DALI views against torchvision + PIL, in one run.

Three contestants read the same shards in the same epoch order and are timed in alternating
rounds (so that a change of machine load hits all of them alike; each is started, warmed up,
timed and shut down in turn), and the median round counts:

- ``ours``: :class:`~pipeline.loader.ViewLoader` with the method's view set;
- ``torchvision``: :func:`~pipeline.torchvision_baseline.baseline_loader`, the same views with
  torchvision + PIL in a ``DataLoader`` with one worker per core;
- ``decode+crop``: our loader with :class:`~pipeline.views.DecodeCropViews` (decode, one
  random resized crop, normalize): the ceiling of the decoder on this machine.

Figures are *source images* per second (one sample with all its views counts once).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from shards.sysinfo import cpu_model

from .loader import ViewLoader
from .source import ShardIndex
from .views import DecodeCropViews, view_set

__all__ = ["METHODS", "bench_pipeline", "format_report", "hardware"]

METHODS = ("mos", "univip", "multicrop")


def hardware(device: torch.device) -> str:
    desc = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)}; {desc}"
    return desc


def _versions() -> dict[str, str]:
    import PIL
    import torchvision
    from nvidia import dali

    return {
        "dali": dali.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }


def _dataset(shards_dir: Path) -> dict[str, Any]:
    index = ShardIndex(shards_dir)
    sizes = index.jpg[:, 1]
    return {
        "samples": len(index),
        "mean_jpeg_kb": round(float(sizes.mean()) / 1024, 1),
        "mean_width": round(float(index.width.mean())),
        "mean_height": round(float(index.height.mean())),
    }


def _endless(make: Callable[[], Any]) -> Iterator[Any]:
    """Batches forever: our loaders run epoch after epoch, a DataLoader is re-iterated."""
    loader = make()
    try:
        while True:
            yield from loader
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()


def _round(
    batches: Iterator[Any], seconds: float, batch_size: int, sync: Callable[[], None]
) -> float:
    """Images per second over whole batches taken for at least ``seconds``."""
    n = 0
    start = time.perf_counter()
    while True:
        next(batches)
        n += 1
        if time.perf_counter() - start >= seconds:
            break
    sync()
    return n * batch_size / (time.perf_counter() - start)


def bench_pipeline(
    shards_dir: str | Path,
    method: str,
    batch_size: int = 64,
    device: str = "auto",
    seconds: float = 10.0,
    rounds: int = 3,
    warmup: int = 2,
    num_threads: int | None = None,
    workers: int | None = None,
    baseline_workers: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark; returns the report (see :func:`format_report`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    shards_dir = Path(shards_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cores = os.cpu_count() or 1
    baseline_workers = cores if baseline_workers is None else baseline_workers
    views = view_set(method)

    def ours(v):
        return lambda: ViewLoader(
            shards_dir,
            v,
            batch_size,
            seed=seed,
            device=dev,
            num_threads=num_threads,
            workers=workers,
        )

    def tv():
        from .torchvision_baseline import baseline_loader

        return baseline_loader(
            shards_dir, views, batch_size, baseline_workers, seed=seed, epochs=10**6
        )

    contestants: dict[str, Callable[[], Any]] = {"ours": ours(views)}
    if baseline:
        contestants["torchvision"] = tv
    contestants["decode+crop"] = ours(DecodeCropViews())

    # Each round starts every contestant afresh, warms it up, times it and shuts it down before
    # the next one starts: a DataLoader's workers keep prefetching after a round ends and would
    # otherwise take cores from the next contestant.
    results: dict[str, list[float]] = {name: [] for name in contestants}
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        for name, make in contestants.items():
            t = time.perf_counter()
            stream = _endless(make)
            try:
                for _ in range(warmup):
                    next(stream)
                sync()
                started = time.perf_counter() - t
                results[name].append(_round(stream, seconds, batch_size, sync))
            finally:
                stream.close()
            if r == 0:
                log(f"{name}: started and warmed up in {started:.1f} s")
        log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items())
            + " images/s"
        )
    load_after = os.getloadavg()[0]

    median = {name: statistics.median(v) for name, v in results.items()}
    report = {
        "method": method,
        "device": str(dev),
        "hardware": hardware(dev),
        "batch_size": batch_size,
        "num_threads": num_threads,
        "workers": workers,
        "baseline_workers": baseline_workers if baseline else None,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "images_per_s": {k: round(v, 1) for k, v in median.items()},
        "rounds_images_per_s": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "dataset": _dataset(shards_dir),
        "versions": _versions(),
    }
    if baseline:
        report["speedup_vs_torchvision"] = round(median["ours"] / median["torchvision"], 2)
    report["fraction_of_decode_crop"] = round(median["ours"] / median["decode+crop"], 3)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A markdown table row per contestant, with the context of the run."""
    d = report["dataset"]
    lines = [
        f"method {report['method']}, device {report['device']} ({report['hardware']}), "
        f"batch {report['batch_size']}",
        f"shards: {d['samples']} samples, {d['mean_width']}x{d['mean_height']} px mean, "
        f"{d['mean_jpeg_kb']} KB mean JPEG; load average {report['load_average']}",
        "",
        "| pipeline | images/s (median) | rounds |",
        "| --- | --- | --- |",
    ]
    for name, v in report["images_per_s"].items():
        rounds = ", ".join(f"{x:.1f}" for x in report["rounds_images_per_s"][name])
        lines.append(f"| {name} | {v:.1f} | {rounds} |")
    if "speedup_vs_torchvision" in report:
        lines.append(f"\nours / torchvision: {report['speedup_vs_torchvision']:.2f}x")
    lines.append(f"ours / decode+crop: {report['fraction_of_decode_crop']:.3f}")
    return "\n".join(lines)
