"""The training data of a run: the view set of its method, the shard loader (or the synthetic
one), and the check of the shards against their manifest before anything is built.

The shard loader (:mod:`pipeline.loader`, DALI) is imported inside :func:`build_loader` only:
a ``data.synthetic`` run, ``--print-config`` and ``bench train --synthetic-only`` never need
DALI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.source import ShardError, SmallDataError, check_shards
from pipeline.views import VIEW_SETS, view_set
from shards.location import ShardLocation, locate
from shards.remote import RemoteShardError
from train.config import ConfigError, TrainConfig
from train.distributed import DistInfo, all_gather_objects
from train.methods import Method, get_method
from train.synthetic import SyntheticLoader

if TYPE_CHECKING:
    from pipeline.views import ViewSet

__all__ = [
    "SHARD_CHECK_FILE",
    "build_loader",
    "check_data",
    "real_view_set",
    "shard_location",
    "synthetic_loader",
]

SHARD_CHECK_FILE = "shards-checked.json"  # RUN/shards-checked.json: digests already verified


def real_view_set(views: str, cfg: TrainConfig) -> ViewSet:
    """The loader's view set for ``views`` (a registered name, ``pipeline.views.view_set``)
    with our sizes; ``data.views`` is passed on verbatim (it wins, and the view set rejects
    keys it does not know).

    - mos: ``MOSViews(size=data.size)``;
    - univip: ``UniVIPViews(size=data.size, instance_size=data.instance_size,
      k=data.num_instances)``;
    - multicrop (BYOL, MoCo v3): two global crops of area 0.08..1 and no local crops
      (``MultiCropViews.byol``).
    """

    d = cfg.data
    kwargs: dict[str, Any] = {
        "mos": {"size": d.size},
        "univip": {"size": d.size, "instance_size": d.instance_size, "k": d.num_instances},
        "multicrop": {"global_size": d.size, "num_local": 0, "global_scale": (0.08, 1.0)},
    }[views]
    kwargs.update(d.views)
    try:
        return view_set(views, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.views: {VIEW_SETS[views].__name__}(**{kwargs}): {e}") from None


def synthetic_loader(cfg: TrainConfig, info: DistInfo, **overrides: Any) -> Any:
    """:class:`train.synthetic.SyntheticLoader` with the shapes of ``cfg``'s method and views,
    this rank's share of the global batch; ``overrides``: more of its keyword arguments."""

    kwargs = {
        "rank": info.rank,
        "world_size": info.world_size,
        "seed": cfg.run.seed,
        "device": info.device,
        "size": cfg.data.size,
        "instance_size": cfg.data.instance_size,
        "num_instances": cfg.data.num_instances,
        "num_samples": cfg.data.synthetic_samples,
    }
    views = get_method(cfg.method).views
    if views == "mos":  # the recipe's r and s sets, as MOSViews reads
        for key in ("grid_choices", "scale_choices"):
            if key in cfg.data.views:
                kwargs[key] = tuple(cfg.data.views[key])
    if views == "multicrop":  # global and local crops, as MultiCropViews reads
        v = cfg.data.views
        kwargs.update(
            num_crops=v.get("num_global", 2),
            num_local=v.get("num_local", 0),
            local_size=v.get("local_size", 96),
        )
    kwargs.update(overrides)
    return SyntheticLoader(views, cfg.data.batch_size // info.world_size, **kwargs)


def shard_location(value: str, key: str = "data.shards") -> ShardLocation:
    """The shard folder ``value`` of the config key ``key`` located once (a local folder or a
    URL read through the shard cache); no value, a refused URL or a missing local folder is a
    :class:`ConfigError` naming the key."""
    if not value:
        hint = " (--data SHARDS)" if key == "data.shards" else ""
        raise ConfigError(f"{key}: no shard directory given{hint}")
    try:
        location = locate(value)
    except RemoteShardError as e:
        raise ConfigError(f"{key}: {e}") from None
    if location.missing_folder():
        raise ConfigError(f"{key}: {value} is not a directory")
    return location


def build_loader(cfg: TrainConfig, info: DistInfo, method: Method | None = None) -> Any:
    """The real shard loader (``pipeline.loader.ViewLoader``, imported here, lazily) or, with
    ``data.synthetic``, :class:`train.synthetic.SyntheticLoader`. Batch size per rank is
    ``data.batch_size / world_size``. ``method``: the registry entry of ``cfg.method`` when
    the caller has it already."""
    method = method if method is not None else get_method(cfg.method)
    if cfg.data.batch_size % info.world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the world size "
            f"{info.world_size}"
        )
    local = cfg.data.batch_size // info.world_size
    if cfg.data.synthetic:
        return synthetic_loader(cfg, info)
    location = shard_location(cfg.data.shards)
    try:
        from pipeline import loader as shard_loader
    except ImportError as e:
        raise RuntimeError(
            f"the shard loader pipeline.loader cannot be imported ({e}); "
            "train on synthetic data with --synthetic, or install DALI"
        ) from None

    try:
        return shard_loader.ViewLoader(
            location,
            views=real_view_set(method.views, cfg),
            batch_size=local,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.run.seed,
            device=str(info.device),
            num_threads=cfg.data.num_threads,
            workers=cfg.data.workers,
        )
    except SmallDataError as e:
        # a power of two with at least two batches per epoch, a multiple of the processes
        fit = max(info.world_size, 2 ** max(0, (e.samples // 2).bit_length() - 1))
        fit -= fit % info.world_size
        demos = sorted(p.name for p in Path(__file__).parent.parent.glob("configs/demo_*_cpu.yaml"))
        raise ConfigError(
            f"data.batch_size: {cfg.data.shards} holds {e.samples} samples, which do not fill "
            f"one global batch of {e.global_batch}; lower the batch to fit the data, e.g. "
            f"--batch-size {fit} (at most {e.samples}, a multiple of the {info.world_size} "
            "process(es)), or start from a small-data config: --config configs/"
            + (demos[0] if demos else "demo_mos_cpu.yaml")
            + (f" (also {', '.join(demos[1:])})" if len(demos) > 1 else "")
        ) from None


def check_data(cfg: TrainConfig, info: DistInfo, run_dir: Path, sha256: bool, log: Callable):
    """Every shard of ``data.shards`` against its manifest (:func:`pipeline.source.check_shards`:
    size, and sha256 when ``sha256``), before anything is built. The first process of every
    node checks (nodes may hold their own copies); rank 0 keeps the digests it verified in
    ``RUN/shards-checked.json``, so a resume or a restart does not hash unchanged files again.
    Every rank raises the same :class:`~pipeline.source.ShardError` when one fails."""
    if cfg.data.synthetic:
        return
    try:
        location = shard_location(cfg.data.shards)
    except ConfigError:
        return  # build_loader names what is wrong

    problem, stats = None, None
    if info.local_rank == 0:
        t0 = time.perf_counter()
        try:
            stats = check_shards(
                location,
                sha256=sha256,
                cache=run_dir / SHARD_CHECK_FILE,
                write_cache=info.is_main,
            )
        except (ShardError, OSError) as e:
            problem = str(e)
        seconds = time.perf_counter() - t0
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise ShardError(problems[0])
    if info.is_main and stats is not None:
        how = (
            f"sizes and sha256: {stats['hashed']} hashed ({stats['bytes_hashed'] / 2**20:.1f} "
            f"MiB), {stats['cached']} unchanged since their last check"
            if sha256
            else "sizes only (--no-verify-shards)"
        )
        log(
            f"checked {stats['shards']} shard(s) of {cfg.data.shards} against manifest.json: "
            f"{how}, {seconds:.1f} s"
        )
        dropped = stats.get("dropped_cache_copies")
        if dropped:
            log(
                f"the shard cache's copies of {', '.join(dropped)} failed their check (the "
                "cache's fault, not the store's): they are downloaded again when needed"
            )
