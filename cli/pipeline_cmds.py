"""``ssl-cli preview`` and ``ssl-cli bench pipeline``: parse options, call :mod:`pipeline`.

Registered in :mod:`cli.main` as ``main.add_command(preview)`` and
``bench.add_command(bench_pipeline, name="pipeline")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import (
    ShardFolder,
    device_option,
    json_option,
    library_errors,
    require,
    rounds_option,
    storage_options,
)

METHODS = ["mos", "univip", "multicrop"]


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _data(f):
    """``--data SHARDS`` and the storage options."""
    f = storage_options(f)
    return click.option(
        "--data",
        "shards",
        metavar="SHARDS",
        type=ShardFolder(),
        default=None,
        help="Shard directory (ssl-cli shards build), or its s3:// / gs:// / https:// URL.  "
        "[required]",
    )(f)


@click.command("preview")
@_data
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="mos",
    show_default=True,
    help="View set to show.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="preview.png",
    show_default=True,
    help="PNG to write.",
)
@click.option(
    "--samples",
    type=click.IntRange(1, 16),
    default=4,
    show_default=True,
    help="Samples (rows) to show: the first batch of this size.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Order and augmentation seed.")
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Photometric augmentation on, or crops only.",
)
@device_option("Where DALI builds the views (auto: CUDA when available).")
@library_errors
def preview(shards, method, out, samples, seed, augment, device) -> None:
    """Write a PNG of the views a method trains on, for a few samples of --data SHARDS.

    mos: the source image with its proposal boxes, the two single-object views and the two
    stitched views with the batch position of the sample in every cell. univip: the source with
    its proposals, the two scene boxes, their overlap and the instance boxes; the two scenes and
    the instance crops. multicrop: the source with every crop box, then the crops.

    \b
    Examples:
      ssl-cli preview --data data/shards/sample
      ssl-cli preview --data data/shards/coco --method univip --out univip.png --samples 8
      ssl-cli preview --data data/shards/coco --method multicrop --no-augment --seed 3
    """
    from pipeline.preview import render_preview

    require(shards, "shards")
    path = render_preview(
        shards, method, out, samples=samples, seed=seed, device=_device(device), augment=augment
    )
    click.echo(f"wrote {path}")


@click.command("pipeline")
@_data
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="mos",
    show_default=True,
    help="View set to time.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Source images per batch, for every pipeline [default: 256 on a GPU, 32 on CPU].",
)
@device_option("Where DALI builds our views (auto: CUDA when available).")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Duration of one timed round per pipeline.",
)
@rounds_option(3, "Alternating rounds; the median counts.")
@click.option(
    "--num-threads",
    "threads",
    type=click.IntRange(min=1),
    default=None,
    help="DALI threads [default: the cores this process may use on CPU, min(8, cores/2) with a "
    "GPU].",
)
@click.option(
    "--loader-workers",
    "workers",
    type=click.IntRange(min=0),
    default=None,
    help="Our loader's view-source processes [default: 0 on CPU, min(8, cores/2) with a GPU].",
)
@click.option(
    "--baseline-workers",
    type=click.IntRange(min=0),
    default=None,
    help="torchvision DataLoader workers [default: all cores].",
)
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Also run the torchvision + PIL baseline.",
)
@json_option()
@library_errors
def bench_pipeline(
    shards,
    method,
    batch_size,
    device,
    seconds,
    rounds,
    threads,
    workers,
    baseline_workers,
    baseline,
    json_out,
) -> None:
    """Source images/s of our DALI views vs a torchvision + PIL DataLoader (all cores) and
    vs plain decode + random-resized-crop, on the same --data SHARDS, in one run.

    \b
    Examples:
      ssl-cli bench pipeline --data data/shards/sample
      ssl-cli bench pipeline --data data/shards/coco --method univip --device cuda --json runs/bench-pipeline.json
      ssl-cli bench pipeline --data data/shards/coco --num-threads 8 --loader-workers 4 --no-baseline
    """
    from pipeline.bench import bench_pipeline as run
    from pipeline.bench import format_report

    require(shards, "shards")
    device = _device(device)
    batch_size = batch_size or (256 if device == "cuda" else 32)
    report = run(
        shards,
        method,
        batch_size=batch_size,
        device=device,
        seconds=seconds,
        rounds=rounds,
        num_threads=threads,
        workers=workers,
        baseline_workers=baseline_workers,
        baseline=baseline,
        log=click.echo,
    )
    click.echo(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")
