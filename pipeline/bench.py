"""``ssl-cli bench pipeline``: our DALI views against torchvision + PIL, in one run.

Three contestants read the same shards in the same epoch order and are timed in alternating
rounds (so that a change of machine load hits all of them alike; each is started, warmed up,
timed and shut down in turn; every other round runs them in reverse order, so that none always
goes first), and the median round counts:

- ``ours``: :class:`~pipeline.loader.ViewLoader` with the method's view set;
- ``torchvision``: :func:`~pipeline.torchvision_baseline.baseline_loader`, the same views with
  torchvision + PIL in a ``DataLoader`` with one worker per core;
- ``decode+crop``: our loader with :class:`~pipeline.views.DecodeCropViews` (decode, one
  random resized crop, normalize): the ceiling of the decoder on this machine.

Figures are *source images* per second (one sample with all its views counts once).

For shards at a URL (``s3://``, ``gs://``, ``https://``) the whole folder is first downloaded
into a scratch cache under the shard cache root, and ``ours`` reads the URL through that warm
cache while ``ours, local disk`` reads the very same files as a plain local folder (the other
contestants read it too): the difference is the cost of the cache layer in steady state. Then
``ours, cold cache`` is timed once per round from an empty cache, from the loader's start
(manifest read, DALI built) until ``seconds`` have passed or an epoch is done, whichever comes
first, so that every shard it reads comes over the network; the report gives it with the
server's bandwidth (one whole shard read, timed) and the images/s that bandwidth allows at the
shards' mean sample size.

While it runs, a progress line goes to stderr at most every few seconds (phase, round,
contestant, elapsed, ETA of the whole benchmark at its cumulative rate): the only cost in a
timed round is a comparison against a clock read the round makes anyway. :class:`Progress`,
:func:`eta_seconds` and :func:`format_duration` serve the other long loops of the product too
(``ssl-cli bench train``, the linear probe).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.torchvision_baseline import baseline_loader
from shards.location import locate
from shards.remote import ShardCache, cache_for, default_cache_root, filesystem, redact_url
from shards.sysinfo import cpu_model, library_versions
from shards.verify import load_manifest

from .loader import ViewLoader
from .source import ShardIndex
from .views import DecodeCropViews, view_set

__all__ = [
    "METHODS",
    "Progress",
    "bench_pipeline",
    "eta_seconds",
    "format_duration",
    "format_report",
    "hardware",
    "to_stderr",
]

METHODS = ("mos", "univip", "multicrop")


# ----------------------------------------------------------------------------------- progress


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left to reach ``total`` at the cumulative rate ``done / elapsed`` (all the work
    so far, not the last window: a slow start or a fast spell weighs by its share); ``None``
    before any work is done."""
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed * max(total - done, 0.0) / done


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss``; ``?`` for ``None`` (no estimate yet)."""
    if seconds is None:
        return "?"
    h, rem = divmod(int(max(seconds, 0.0)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def to_stderr(line: str) -> None:
    """Print ``line`` to stderr at once (the default sink of progress lines)."""
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Progress lines of a long loop, at most one every ``every`` seconds, to ``log`` (default:
    stderr; ``None``: silent). A loop calls :meth:`due` with a clock reading (it costs one
    comparison while no line is due) and, when it is true, :meth:`say`; ``start`` is the time
    the elapsed time and the ETA count from."""

    def __init__(
        self,
        log: Callable[[str], None] | None = to_stderr,
        every: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log, self.every, self.clock = log, every, clock
        self.start = clock()
        self.next_at = self.start + every if log is not None else float("inf")

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def say(self, what: str, done: float, total: float, now: float | None = None) -> str:
        """Log ``WHAT, E elapsed, ETA T`` (``done``/``total``: the work units the ETA counts,
        at the cumulative rate since ``start``); returns the line."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        eta = format_duration(eta_seconds(elapsed, done, total))
        line = f"{what}; {format_duration(elapsed)} elapsed, ETA {eta}"
        if self.log is not None:
            self.log(line)
            self.next_at = now + self.every
        return line


# ---------------------------------------------------------------------------------- pipeline


def hardware(device: torch.device) -> str:
    desc = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name(device)}; {desc}"
    return desc


def _versions() -> dict[str, str | None]:
    import PIL  # noqa: F401 - loaded, so its own __version__ is read
    import torchvision  # noqa: F401
    from nvidia import dali  # noqa: F401

    return library_versions("dali", "torch", "torchvision", "pillow")


def _dataset(shards_dir: Path) -> dict[str, Any]:
    index = ShardIndex(shards_dir)
    sizes = index.jpg[:, 1]
    return {
        "samples": len(index),
        "bytes": sum(s["bytes"] for s in load_manifest(shards_dir)["shards"]),
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
    batches: Iterator[Any],
    seconds: float,
    batch_size: int,
    sync: Callable[[], None],
    progress: Progress | None = None,
    what: str = "",
    done: int = 0,
    total: int = 1,
) -> float:
    """Images per second over whole batches taken for at least ``seconds``. ``progress``:
    a line now and then (``what``; this round is measurement ``done`` of ``total``), from the
    clock reading the loop takes anyway."""
    n = 0
    start = time.perf_counter()
    while True:
        next(batches)
        n += 1
        now = time.perf_counter()
        if now - start >= seconds:
            break
        if progress is not None and progress.due(now):
            part = (now - start) / seconds
            progress.say(
                f"{what}, measuring: {n} batches, {now - start:.0f}/{seconds:g} s",
                done + part,
                total,
                now,
            )
    sync()
    return n * batch_size / (time.perf_counter() - start)


def _bandwidth(cache: ShardCache) -> dict[str, Any]:
    """The server's read bandwidth: the largest shard of the opened ``cache``, read whole once
    and timed."""
    shard = max(cache.manifest["shards"], key=lambda s: s["bytes"])
    fs, base = filesystem(cache.url, cache.endpoint_url)
    start = time.perf_counter()
    data = fs.cat_file(f"{base}/{shard['name']}")
    seconds = time.perf_counter() - start
    return {"probe": shard["name"], "bytes": len(data), "mb_per_s": len(data) / seconds / 1e6}


def _fill(cache: ShardCache) -> Path:
    """Open the cache and download every file of its folder; returns its root (a local shard
    folder)."""
    manifest = cache.open()
    for s in manifest["shards"]:
        cache.fetch(cache.shard(s["name"]))
    return cache.root


def _cold_round(
    url: str,
    root: Path,
    views: Any,
    batch_size: int,
    seconds: float,
    sync: Callable[[], None],
    kwargs: dict[str, Any],
) -> dict[str, float]:
    """Images/s from an empty cache at ``root``, from the loader's start until ``seconds``
    have passed or an epoch is done; the cache is removed afterwards."""
    cache = cache_for(url, root=root)
    try:
        start = time.perf_counter()
        n = 0
        with ViewLoader(cache, views, batch_size, **kwargs) as loader:
            for _ in loader:
                n += 1
                if time.perf_counter() - start >= seconds:
                    break
            sync()
        elapsed = time.perf_counter() - start
        fetched = sum(d["bytes"] for d in cache.downloads())
        return {"images_per_s": n * batch_size / elapsed, "seconds": elapsed, "bytes": fetched}
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _scratch(url: str | None) -> Iterator[Path | None]:
    """A scratch folder under the shard cache root for a benchmark of ``url`` (its warm copy
    and the cold-cache rounds), removed afterwards; ``None`` for a local shard folder."""
    if url is None:
        yield None
        return
    default_cache_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=default_cache_root()))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    progress: Callable[[str], None] | None = to_stderr,
    progress_every: float = 5.0,
) -> dict[str, Any]:
    """Run the benchmark; returns the report (see :func:`format_report`). ``log``: the results
    of each round; ``progress``: a line at most every ``progress_every`` seconds while it runs
    (phase, round, contestant, elapsed, ETA), stderr by default, ``None`` for none.

    Phases: a URL's shards downloaded into a warm cache (:func:`_warm_copy`), the contestants
    made (:func:`_contestants`), the timed rounds (:func:`_rounds`), the report
    (:func:`_report`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    url = locate(shards_dir).url
    with _scratch(url) as scratch:
        warm, remote = None, None
        if url is not None:
            warm, remote = _warm_copy(url, scratch, log)
            shards_dir = warm.root
        shards_dir = Path(shards_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        baseline_workers = (os.cpu_count() or 1) if baseline_workers is None else baseline_workers
        views = view_set(method)
        loader_kw = {"seed": seed, "device": dev, "num_threads": num_threads, "workers": workers}
        contestants = _contestants(
            shards_dir, views, batch_size, loader_kw, warm, baseline, baseline_workers
        )
        cold_round = None
        if url is not None:

            def cold_round(r: int, sync: Callable[[], None]) -> dict[str, float]:
                where = scratch / f"cold-{r}"
                return _cold_round(url, where, views, batch_size, seconds, sync, loader_kw)

        ticker = Progress(progress, progress_every) if progress is not None else None
        load_before = os.getloadavg()[0]
        results, cold = _rounds(
            contestants, rounds, warmup, seconds, batch_size, dev, cold_round, ticker, log
        )
        load_after = os.getloadavg()[0]
        setup = {
            "method": method,
            "device": str(dev),
            "hardware": hardware(dev),
            "batch_size": batch_size,
            "num_threads": num_threads,
            "workers": workers,
            "baseline_workers": baseline_workers if baseline else None,
            "seconds_per_round": seconds,
            "rounds": rounds,
        }
        return _report(setup, results, cold, remote, (load_before, load_after), shards_dir)


def _warm_copy(url: str, scratch: Path, log: Callable[[str], None]) -> tuple[ShardCache, dict]:
    """A URL's shards downloaded whole into a cache under ``scratch`` (what "warm cache"
    reads), and the download's figures for the report's ``remote`` section."""
    warm = cache_for(url, root=scratch / "warm")
    log(f"{redact_url(url)}: downloading the shards into {warm.root}")
    t = time.perf_counter()
    _fill(warm)
    remote = {
        "url": redact_url(url),
        "download_s": round(time.perf_counter() - t, 2),
        "bandwidth": _bandwidth(warm),
    }
    return warm, remote


def _contestants(
    shards_dir: Path,
    views: Any,
    batch_size: int,
    loader_kw: dict,
    warm: ShardCache | None,
    baseline: bool,
    baseline_workers: int,
) -> dict[str, Callable[[], Any]]:
    """Name -> a function that starts that contestant's loader afresh: ours (from the warm
    cache and from local disk when the shards are at a URL), the torchvision + PIL baseline,
    and ours decoding and cropping only (the pipeline's own ceiling)."""

    def ours(v, source=None):
        return lambda: ViewLoader(
            shards_dir if source is None else source, v, batch_size, **loader_kw
        )

    def torchvision():
        seed = loader_kw["seed"]
        return baseline_loader(
            shards_dir, views, batch_size, baseline_workers, seed=seed, epochs=10**6
        )

    contestants: dict[str, Callable[[], Any]] = {}
    if warm is not None:
        contestants["ours"] = ours(views, source=warm)
        contestants["ours, local disk"] = ours(views)
    else:
        contestants["ours"] = ours(views)
    if baseline:
        contestants["torchvision"] = torchvision
    contestants["decode+crop"] = ours(DecodeCropViews())
    return contestants


def _rounds(
    contestants: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    seconds: float,
    batch_size: int,
    dev: torch.device,
    cold_round: Callable[[int, Callable[[], None]], dict[str, float]] | None,
    ticker: Progress | None,
    log: Callable[[str], None],
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """The timed rounds: images/s of every contestant per round, and of each round's cold-cache
    run (``cold_round``, at a URL only).

    Each round starts every contestant afresh, warms it up, times it and shuts it down before
    the next one starts: a DataLoader's workers keep prefetching after a round ends and would
    otherwise take cores from the next contestant. Every other round runs in reverse order, so
    that no contestant always runs first or last."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results: dict[str, list[float]] = {name: [] for name in contestants}
    per_round = len(contestants) + (cold_round is not None)
    measures = rounds * per_round  # the units of the ETA
    cold: list[dict[str, float]] = []
    for r in range(rounds):
        order = list(contestants.items())
        if r % 2:
            order.reverse()
        for c, (name, make) in enumerate(order):
            what = f"bench pipeline: round {r + 1}/{rounds}, {name}"
            done = r * per_round + c
            t = time.perf_counter()
            stream = _endless(make)
            try:
                for i in range(warmup):
                    next(stream)
                    if ticker is not None and ticker.due(now := time.perf_counter()):
                        ticker.say(
                            f"{what}, warm-up: {i + 1}/{warmup} batches", done, measures, now
                        )
                sync()
                started = time.perf_counter() - t
                results[name].append(
                    _round(stream, seconds, batch_size, sync, ticker, what, done, measures)
                )
            finally:
                stream.close()
            if r == 0:
                log(f"{name}: started and warmed up in {started:.1f} s")
        if cold_round is not None:
            if ticker is not None:
                what = f"bench pipeline: round {r + 1}/{rounds}, ours, cold cache"
                ticker.say(what, (r + 1) * per_round - 1, measures)
            cold.append(cold_round(r, sync))
        log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items())
            + (f", ours, cold cache {cold[-1]['images_per_s']:.1f}" if cold else "")
            + " images/s"
        )
    return results, cold


def _report(
    setup: dict,
    results: dict[str, list[float]],
    cold: list[dict[str, float]],
    remote: dict | None,
    load: tuple[float, float],
    shards_dir: Path,
) -> dict[str, Any]:
    """The report: ``setup``, medians and rounds per contestant, the ratios against the
    baseline and the decode+crop ceiling, and at a URL the ``remote`` section."""
    median = {name: statistics.median(v) for name, v in results.items()}
    report = {
        **setup,
        "images_per_s": {k: round(v, 1) for k, v in median.items()},
        "rounds_images_per_s": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "load_average": [round(load[0], 2), round(load[1], 2)],
        "dataset": _dataset(shards_dir),
        "versions": _versions(),
    }
    if "torchvision" in median:
        report["speedup_vs_torchvision"] = round(median["ours"] / median["torchvision"], 2)
    report["fraction_of_decode_crop"] = round(median["ours"] / median["decode+crop"], 3)
    if remote is not None:
        d = report["dataset"]
        sample_bytes = d["bytes"] / d["samples"]
        bw = remote["bandwidth"]["mb_per_s"]
        remote["bandwidth"]["mb_per_s"] = round(bw, 1)
        remote["warm_vs_local_disk"] = round(median["ours"] / median["ours, local disk"], 3)
        remote["cold_images_per_s"] = round(statistics.median(x["images_per_s"] for x in cold), 1)
        remote["cold_rounds"] = [
            {k: round(v, 2) if k != "bytes" else int(v) for k, v in x.items()} for x in cold
        ]
        remote["mean_sample_bytes"] = round(sample_bytes)
        remote["network_bound_images_per_s"] = round(bw * 1e6 / sample_bytes, 1)
        report["remote"] = remote
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
    remote = report.get("remote")
    if remote is not None:
        rounds = ", ".join(f"{x['images_per_s']:.1f}" for x in remote["cold_rounds"])
        lines.append(f"| ours, cold cache | {remote['cold_images_per_s']:.1f} | {rounds} |")
        bw = remote["bandwidth"]
        lines += [
            "",
            f"{remote['url']}: warm cache / local disk {remote['warm_vs_local_disk']:.3f}; "
            f"server bandwidth {bw['mb_per_s']:.1f} MB/s ({bw['probe']}, {bw['bytes']} bytes "
            f"read whole), {remote['mean_sample_bytes']} bytes per sample: the network "
            f"allows {remote['network_bound_images_per_s']:.1f} images/s",
        ]
    if "speedup_vs_torchvision" in report:
        lines.append(f"\nours / torchvision: {report['speedup_vs_torchvision']:.2f}x")
    lines.append(f"ours / decode+crop: {report['fraction_of_decode_crop']:.3f}")
    return "\n".join(lines)
