"""``ssl-cli shards build|verify|split|inspect``: the offline stage."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import library_errors, storage_options
from shards.images import ImageParams
from shards.proposals import RANKS, SEARCH_MODES, FilterParams, SearchParams

__all__ = ["DEFAULT_FILTER", "DEFAULT_SEARCH", "shards_group"]

DEFAULT_SEARCH = SearchParams()
DEFAULT_FILTER = FilterParams()


# ---------------------------------------------------------------------------------------- shards


@click.group(name="shards")
def shards_group() -> None:
    """Build, inspect and verify proposal shards (selective search, run once).

    \b
    Examples:
      ssl-cli shards build @sample data/shards/sample
      ssl-cli shards verify data/shards/sample
      ssl-cli shards inspect data/shards/sample --examples 3
    """


@shards_group.command("build")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--layout",
    type=click.Choice(["auto", "folder", "coco", "imagenet", "wds", "cifar", "idx"]),
    default="auto",
    help="How SRC is organised. auto: .tar archives -> wds, the CIFAR python file set -> cifar, "
    "the IDX file set (MNIST family) -> idx, a train2017/ folder -> coco, otherwise a folder of "
    "images. imagenet (class folders -> labels) must be asked for.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="train",
    help="CIFAR and IDX: which split to read (build each split into its own OUT).",
)
@click.option(
    "--mode",
    type=click.Choice(SEARCH_MODES),
    default=DEFAULT_SEARCH.mode,
    help="Selective search strategy: OpenCV's fast or quality preset, or lean (fast's colour "
    "spaces, two k values, its colour-aware strategy only; see docs/benchmarks.md).",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=0),
    default=DEFAULT_SEARCH.max_side,
    help="Run the search on a copy whose longer side is at most this (0: full resolution). "
    "Boxes are mapped back to the pixels of the decoded image.",
)
@click.option(
    "--base-k",
    type=click.IntRange(min=1),
    default=DEFAULT_SEARCH.base_k,
    help="Graph-segmentation k of the search (OpenCV base_k = inc_k).",
)
@click.option(
    "--scale-k/--no-scale-k",
    default=DEFAULT_SEARCH.scale_k,
    help="Scale k with the downscale factor of --max-side.",
)
@click.option(
    "--min-segment",
    type=click.IntRange(min=1),
    default=DEFAULT_SEARCH.min_segment,
    help="Smallest graph segment, in pixels of a copy of --max-side.",
)
@click.option(
    "--scale-segment/--no-scale-segment",
    default=DEFAULT_SEARCH.scale_segment,
    help="Scale --min-segment down with the area of an image smaller than --max-side.",
)
@click.option(
    "--rank",
    type=click.Choice(RANKS),
    default=DEFAULT_FILTER.rank,
    help="Order of the greedy IoU filter: boxes the search agrees on first, or the search's "
    "own (the ORL recipe: --mode fast --max-side 0 --rank search).",
)
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=None,
    help=f"Sets both --min-image-side and --min-box-side [default: {DEFAULT_FILTER.min_side}].",
)
@click.option(
    "--min-image-side",
    type=click.IntRange(min=1),
    default=None,
    help="Reject images whose shorter side is below this (too_small) "
    f"[default: --min-side, else {ImageParams().min_side}; CIFAR and IDX: 1].",
)
@click.option(
    "--min-box-side",
    type=click.IntRange(min=1),
    default=None,
    help=f"Minimum box side in pixels [default: --min-side, else {DEFAULT_FILTER.min_side}].",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=ImageParams().max_pixels,
    help="Reject images of more pixels than this (too_large).",
)
@click.option(
    "--max-file-bytes",
    type=click.IntRange(min=1),
    default=ImageParams().max_file_bytes,
    help="Reject input files larger than this without reading them (too_large).",
)
@click.option(
    "--min-aspect",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_FILTER.min_aspect,
    help="Minimum box width/height.",
)
@click.option(
    "--max-aspect",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_FILTER.max_aspect,
    help="Maximum box width/height.",
)
@click.option(
    "--max-iou",
    type=click.FloatRange(0, 1),
    default=DEFAULT_FILTER.max_iou,
    help="Greedy filter: max IoU with an already kept box.",
)
@click.option(
    "--top-n",
    type=click.IntRange(min=0),
    default=DEFAULT_FILTER.top_n,
    help="Keep at most this many boxes per image, in rank order.",
)
@click.option(
    "--shard-size", type=click.IntRange(min=1), default=1000, help="Input images per shard."
)
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 100),
    default=ImageParams().transcode_quality,
    help="Quality when a non-JPEG input is re-encoded.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Selective-search worker processes [default: all cores].",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    help="local process pool, or Ray tasks.",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster address (with --engine ray); default: a local Ray instance.",
)
@click.option(
    "--retry-rejects",
    is_flag=True,
    default=False,
    help="Redo the shards holding transient rejects (worker_crashed, unreadable), also on a "
    "finished build.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    help="Progress on stderr: a bar on a terminal, otherwise a log line every 30 s or 10%.",
)
@click.option(
    "--annotations",
    type=click.Path(dir_okay=False),
    default=None,
    help="COCO detection JSON (instances_*.json) of SRC's images: their boxes, categories and "
    "crowd flags go into the shards (KEY.gt, gt_* columns of proposals.parquet) and the "
    "proposals' recall against them into manifest.json. Layouts folder, coco, imagenet.",
)
@click.option(
    "--strict",
    is_flag=True,
    default=False,
    help="With --annotations: an image of the annotation file that is not in SRC is an error "
    "(default: counted and reported).",
)
@storage_options
@click.option(
    "--staging",
    type=click.Path(file_okay=False),
    default=None,
    help="With an s3:// / gs:// OUT: the local folder the build writes before each file is "
    "uploaded (a killed build resumes from it) [default: under --cache-dir].",
)
@library_errors
def shards_build(
    src,
    out,
    staging,
    layout,
    split,
    mode,
    max_side,
    base_k,
    scale_k,
    min_segment,
    scale_segment,
    rank,
    min_side,
    min_image_side,
    min_box_side,
    max_pixels,
    max_file_bytes,
    min_aspect,
    max_aspect,
    max_iou,
    top_n,
    shard_size,
    jpeg_quality,
    workers,
    engine,
    ray_address,
    retry_rejects,
    progress,
    annotations,
    strict,
) -> None:
    """Run selective search over SRC and write WebDataset shards + proposals.parquet into OUT.

    SRC is a folder of images (recursive), a COCO root or train2017/, an ImageNet train/ folder
    (--layout imagenet), WebDataset .tar archives, CIFAR-10/100 python batches or IDX files of
    the MNIST family (--split train|test: build each split into its own OUT), or @sample
    (photographs shipped with scikit-image and scikit-learn). Re-running the same command
    resumes an interrupted build and does nothing on a finished one. Exits non-zero when every
    input, or most for one reason, was rejected, or transient rejects remain.

    \b
    Examples:
      ssl-cli shards build ~/coco/train2017 data/shards/coco --workers 8
      ssl-cli shards build @sample data/shards/sample
      ssl-cli shards build ~/imagenet/train data/shards/imagenet --layout imagenet --engine ray
      ssl-cli shards build ~/coco/train2017 data/shards/coco --annotations ~/coco/annotations/instances_train2017.json
    """
    from shards.build import build_shards
    from shards.process import BuildParams

    if strict and annotations is None:
        raise click.UsageError("--strict applies to --annotations; give the annotation file")

    image_side = min_image_side or min_side or ImageParams().min_side
    box_side = min_box_side or min_side or DEFAULT_FILTER.min_side
    params = BuildParams(
        search=SearchParams(
            mode=mode,
            max_side=max_side,
            base_k=base_k,
            scale_k=scale_k,
            min_segment=min_segment,
            scale_segment=scale_segment,
        ),
        filter=FilterParams(
            min_side=box_side,
            min_aspect=min_aspect,
            max_aspect=max_aspect,
            max_iou=max_iou,
            top_n=top_n,
            rank=rank,
        ),
        image=ImageParams(
            min_side=image_side,
            max_pixels=max_pixels,
            max_file_bytes=max_file_bytes,
            transcode_quality=jpeg_quality,
        ),
        shard_size=shard_size,
    )
    remote = _remote_out(out)
    target = out
    uploader = None
    if remote:
        from shards.remote import ShardUploader

        out = staging or _default_staging(remote)
        click.echo(f"building into {out}, uploading to {remote} each shard as it is done")

        def uploaded(name: str, sent: bool) -> None:
            click.echo(f"  {'uploaded' if sent else 'already there'}: {name}")

        uploader = ShardUploader(out, remote, on_file=uploaded)
        uploader.check_access()  # credentials and bucket, before any search
    try:
        result = build_shards(
            src,
            out,
            params,
            layout=layout,
            split=split,
            workers=workers,
            engine=engine,
            ray_address=ray_address,
            progress=progress,
            log=click.echo,
            retry_rejects=retry_rejects,
            annotations=annotations,
            strict_annotations=strict,
            on_shard=(lambda tar, entry: uploader.queue_shard(tar, entry["sha256"]))
            if uploader
            else None,
        )
    finally:
        if uploader is not None:
            uploader.close()  # the shards built so far go up, also when the build fails
    if uploader is not None and not result.problems:
        done = uploader.finish()
        removed = f", {len(done['removed'])} of an earlier build removed" if done["removed"] else ""
        click.echo(
            f"{target}: {len(done['uploaded'])} file(s) uploaded ({done['bytes']} bytes), "
            f"{len(done['skipped'])} already there{removed}, manifest.json last"
        )
        _drop_staging(Path(out), staging is None)
    if result.problems:
        raise click.ClickException(
            f"{result.out}: the build finished, but:\n  " + "\n  ".join(result.problems)
        )


def _drop_staging(folder: Path, default: bool) -> None:
    """After a complete upload the bucket holds the build: the default staging folder (under
    the cache) is removed rather than kept as a second full copy; one given with --staging is
    the user's, kept, and said."""
    import shutil

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if default:
        shutil.rmtree(folder, ignore_errors=True)
        click.echo(
            f"removed the staging copy {folder} ({size / 2**20:,.1f} MiB): the upload is whole"
        )
    else:
        click.echo(f"the staging copy {folder} ({size / 2**20:,.1f} MiB) is kept (--staging); "
                   "the upload is whole, so it may be deleted")  # fmt: skip


def _remote_out(out: str) -> str | None:
    """``out`` checked as an upload target when it is a URL, else ``None``."""
    from shards.location import locate
    from shards.remote import READ_ONLY

    url = locate(out).url
    if url is None:
        return None
    if url.split("://", 1)[0] in READ_ONLY:
        raise click.BadParameter(f"{url}: http(s) shard folders are read-only", param_hint="OUT")
    return url


def _default_staging(url: str) -> Path:
    import hashlib

    from shards.remote import default_cache_root

    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return default_cache_root() / "staging" / digest


@shards_group.command("verify")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--decode/--no-decode", default=False, help="Also decode every image and check its size."
)
@click.option(
    "--annotations",
    type=click.Path(dir_okay=False),
    default=None,
    help="A build with annotations: the annotation file to check against, when it is no longer "
    "at the path the manifest records.",
)
@storage_options
@library_errors
def shards_verify(out, decode, annotations) -> None:
    """Recompute checksums and counts; check that tar samples and Parquet rows match one to one.

    \b
    Examples:
      ssl-cli shards verify data/shards/coco
      ssl-cli shards verify data/shards/coco --decode
    """
    from shards.verify import verify_shards

    problems = verify_shards(out, decode=decode, annotations=annotations)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        raise click.ClickException(f"{out}: {len(problems)} problem(s) found")
    click.echo(f"{out}: OK")


@shards_group.command("split")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("train_out", type=click.Path(file_okay=False))
@click.argument("val_out", type=click.Path(file_okay=False))
@click.option(
    "--val-fraction",
    type=float,
    required=True,
    help="Share of the samples on the val side, in (0, 1); rounded to whole samples.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the permutation that draws it."
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per output shard (default: the source build's).",
)
@library_errors(usage=("ConfigError", "SplitOptionError"))
def shards_split(src, train_out, val_out, val_fraction, seed, shard_size) -> None:
    """Cut one shard folder into a train and a val folder that share no sample.

    The val side holds round(val_fraction x N) samples drawn by a fixed permutation (--seed),
    the same samples `eval knn --val-fraction` uses as queries. Both outputs are complete shard
    folders: every sample byte for byte (image, boxes, label, ground truth), proposals.parquet,
    and a manifest that records the source, fraction, seed and side. A killed split leaves no
    half-written folder; rerunning it finishes the side that is missing.

    \b
    Examples:
      ssl-cli shards split data/shards/mine data/mine-train data/mine-val --val-fraction 0.1
      ssl-cli eval knn runs/mine --train data/mine-train --val data/mine-val
    """
    from shards.split import split_shards

    split_shards(
        src, train_out, val_out, val_fraction, seed=seed, shard_size=shard_size, log=click.echo
    )


@shards_group.command("inspect")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--examples", type=click.IntRange(min=0), default=5, help="Samples to print.")
@storage_options
@library_errors
def shards_inspect(out, examples) -> None:
    """Print samples, shards, labels and boxes-per-image statistics.

    \b
    Examples:
      ssl-cli shards inspect data/shards/coco
      ssl-cli shards inspect data/shards/coco --examples 0
    """
    from shards.verify import inspect_shards

    click.echo(inspect_shards(out, examples=examples))
