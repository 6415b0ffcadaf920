"""``ssl-cli bench ...``: the benchmark group, and ``bench shards`` (selective search)."""

from __future__ import annotations

import json

import click

from cli.common import json_option, library_errors, rounds_option
from cli.pipeline_cmds import bench_pipeline
from cli.quality_cmds import bench_quality
from cli.shards_cmds import DEFAULT_FILTER, DEFAULT_SEARCH
from cli.train_cmds import bench_train
from shards.proposals import RANKS, SEARCH_MODES, SearchParams

__all__ = ["bench_group"]


# ----------------------------------------------------------------------------------------- bench


@click.group(name="bench")
def bench_group() -> None:
    """Benchmarks: our implementation against a baseline measured in the same run.

    \b
    Examples:
      ssl-cli bench shards @sample
      ssl-cli bench pipeline --data data/shards/sample
      ssl-cli bench train --method mos --synthetic-only
    """


@bench_group.command("shards")
@click.argument("src", default="@sample")
@click.option(
    "--annotations",
    type=click.Path(dir_okay=False),
    default=None,
    help="COCO detection JSON of SRC's images: report recall against its boxes (recall at IoU "
    "0.5 and 0.7, AR@10, AR@100, AR by object size) for every configuration; only the images "
    "it has an entry for are used.",
)
@click.option(
    "--mode",
    "modes",
    type=click.Choice(SEARCH_MODES),
    multiple=True,
    help="Selective search strategy of our configurations (as in shards build) "
    f"[default: {DEFAULT_SEARCH.mode}].",
)
@click.option(
    "--max-side",
    "max_sides",
    type=click.IntRange(min=0),
    multiple=True,
    help=f"Longer side of the copy our search runs on (0: full resolution) "
    f"[default: {DEFAULT_SEARCH.max_side}].",
)
@click.option(
    "--base-k",
    "base_ks",
    type=click.IntRange(min=1),
    multiple=True,
    help=f"Graph-segmentation k of our search [default: {DEFAULT_SEARCH.base_k}].",
)
@click.option(
    "--scale-k/--no-scale-k",
    default=DEFAULT_SEARCH.scale_k,
    help="Scale k with the downscale factor.",
)
@click.option(
    "--min-box-side",
    "min_box_sides",
    type=click.IntRange(min=1),
    multiple=True,
    help=f"Filter: minimum box side in pixels [default: {DEFAULT_FILTER.min_side}]; scenes of "
    "96 px need a small one, e.g. 8.",
)
@click.option(
    "--max-iou",
    "max_ious",
    type=click.FloatRange(0, 1),
    multiple=True,
    help=f"Filter: max IoU with an already kept box [default: {DEFAULT_FILTER.max_iou}].",
)
@click.option(
    "--top-n",
    "top_ns",
    type=click.IntRange(min=0),
    multiple=True,
    help=f"Filter: keep at most this many boxes per image [default: {DEFAULT_FILTER.top_n}].",
)
@click.option(
    "--rank",
    "ranks",
    type=click.Choice(RANKS),
    multiple=True,
    help="Filter: the order the greedy suppression visits boxes in: the search's own "
    "(OpenCV's), or boxes that many others agree with first "
    f"[default: {DEFAULT_FILTER.rank}].",
)
@click.option(
    "--min-segment",
    "min_segments",
    type=click.IntRange(min=1),
    multiple=True,
    help="Smallest graph segment of our search, in pixels of a copy of --max-side (scaled "
    f"down for smaller images) [default: {DEFAULT_SEARCH.min_segment}].",
)
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="NAME=V1[,V2...]",
    help="Sweep any other search or filter parameter, e.g. upsample=false,true, "
    "scale_segment=true,false, agreement_iou=0.6,0.7 (names as in manifest.json).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use at most this many images."
)
@rounds_option(
    1, "Time every search this many times, in alternating order; the fastest round counts."
)
@json_option()
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --annotations: also draw AR@100 against images/s per core as a PNG.",
)
@library_errors
def bench_shards(
    src,
    annotations,
    modes,
    max_sides,
    base_ks,
    scale_k,
    min_box_sides,
    max_ious,
    top_ns,
    ranks,
    min_segments,
    sweeps,
    limit,
    rounds,
    json_out,
    plot,
) -> None:
    """Selective search: our configurations vs the ORL recipe (fast mode, full resolution).

    SRC is read like the SRC of shards build (a folder of images, or @sample). Every option
    given more than once is swept: each combination is one configuration, timed on one core
    on the same decoded images as the ORL recipe, whose filter takes the same thresholds. With
    --annotations each gets its recall against the ground truth.

    \b
    Examples:
      ssl-cli bench shards ~/coco/val2017 --annotations ~/coco/annotations/instances_val2017.json --mode fast --mode lean
      ssl-cli bench shards data/scenes/test/images --annotations data/scenes/test/instances.json --min-box-side 8 --rank search --rank agreement --plot runs/ar.png
      ssl-cli bench shards @sample --max-side 224 --max-side 320 --rounds 3 --json runs/bench-shards.json
    """
    from shards.atomic import atomic_write_bytes
    from shards.bench import bench_search, parse_sweep, plot_bench, sweep

    if plot and annotations is None:
        raise click.UsageError("--plot draws recall against ground truth; give --annotations")
    values = {
        "mode": modes,
        "max_side": max_sides,
        "base_k": base_ks,
        "min_segment": min_segments,
        "min_side": min_box_sides,
        "max_iou": max_ious,
        "top_n": top_ns,
        "rank": ranks,
    }
    try:
        extra = parse_sweep(sweeps)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for name in extra:
        if values.get(name):
            raise click.UsageError(f"--sweep {name}=...: {name} has its own option; use one")
    configs = sweep(SearchParams(scale_k=scale_k), DEFAULT_FILTER, **{**values, **extra})
    report = bench_search(
        src, configs, limit=limit, annotations=annotations, rounds=rounds, log=click.echo
    )
    click.echo(f"hardware: {report['hardware']}, OpenCV {report['opencv']}")
    if json_out:
        atomic_write_bytes(json_out, (json.dumps(report, indent=1) + "\n").encode())
    if plot:
        plot_bench(report, plot)


bench_group.add_command(bench_pipeline, name="pipeline")
bench_group.add_command(bench_train, name="train")
bench_group.add_command(bench_quality, name="quality")
