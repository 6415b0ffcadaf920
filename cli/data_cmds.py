"""Click commands that make data sets: ``ssl-cli data scenes``.

A :class:`click.Group`, registered in ``cli/main.py``::

    main.add_command(data_group, name="data")

The commands parse options and call :func:`shards.scenes.make_scenes`; nothing else here.
"""

from __future__ import annotations

import click

from cli.common import library_errors

__all__ = ["data_group"]


class Span(click.ParamType):
    """``MIN:MAX`` (or one number for both) of ints or floats -> ``(MIN, MAX)``."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.name = "int:int" if kind is int else "float:float"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(":")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            lo, hi = (self.kind(p.strip()) for p in (parts * 2)[:2])
        except ValueError:
            word = "integers" if self.kind is int else "numbers"
            self.fail(f"{value!r} is not MIN:MAX (two {word}) or one {word[:-1]}", param, ctx)
        if lo > hi:
            self.fail(f"{value!r}: MIN is above MAX", param, ctx)
        return lo, hi


class _Colour(click.ParamType):
    """``R,G,B`` of 0..255 -> ``(R, G, B)``."""

    name = "R,G,B"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            rgb = tuple(int(p) for p in str(value).split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            self.fail(f"{value!r} is not R,G,B (three integers 0..255)", param, ctx)
        return rgb


def _defaults():
    from shards.scenes import SceneParams

    return SceneParams()


def _span(pair) -> str:
    lo, hi = pair
    return f"{lo}:{hi}"


@click.group("data", context_settings={"show_default": True})
def data_group() -> None:
    """Make data sets with ground truth for the object-level benchmarks.

    \b
    Examples:
      ssl-cli data scenes /usr/share/datasets/fashion-mnist data/scenes/train --layout idx --split train --count 1500 --seed 0
      ssl-cli data scenes /usr/share/datasets/fashion-mnist data/scenes/test --layout idx --split test --count 300 --seed 1
    """


_D = _defaults()


@data_group.command("scenes")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--layout",
    type=click.Choice(["idx", "cifar", "folder"]),
    required=True,
    help="How SRC holds labelled objects. idx: the MNIST family's IDX files (grey items on "
    "black); cifar: CIFAR-10/100 python batches; folder: one sub-folder per class (labels = "
    "sorted folder names), split by SRC/train and SRC/test (or val) when present.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="train",
    help="Which items the objects come from: train scenes use train items only, test scenes "
    "test items only.",
)
@click.option("--count", type=click.IntRange(1, 1_000_000), required=True, help="Scenes to make.")
@click.option(
    "--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="The same seed, the same bytes."
)
@click.option(
    "--size",
    type=Span(int),
    default=_span(_D.size),
    help="Side of the square scenes in px; MIN:MAX draws one per scene.",
)
@click.option("--objects", type=Span(int), default=_span(_D.objects), help="Objects per scene.")
@click.option(
    "--object-size",
    type=Span(float),
    default=_span(_D.object_size),
    help="Each object's longer side as a share of the scene side (drawn uniformly).",
)
@click.option(
    "--min-visible",
    type=float,
    default=_D.min_visible,
    help="Share of each object's pixels that must stay visible after later objects are "
    "pasted over it.",
)
@click.option(
    "--max-iou",
    type=float,
    default=_D.max_iou,
    help="Largest IoU allowed between the visible boxes of two objects (1: no limit).",
)
@click.option(
    "--tint",
    type=click.Choice(["random", "class", "none"]),
    default=_D.tint,
    help="Colour of grey items (IDX, grey images): random per object (colour tells nothing "
    "of the class), a fixed colour per class (colour gives the class away), or none.",
)
@click.option(
    "--threshold",
    type=click.IntRange(0, 254),
    default=_D.threshold,
    help="IDX items: mask = pixels above this (0..255), lone pixels dropped.",
)
@click.option(
    "--backgrounds",
    default="@sample",
    help="Photographs the backgrounds are cut from: @sample (those shipped with scikit-image "
    "and scikit-learn) or a folder of images.",
)
@click.option(
    "--bg-scale",
    type=Span(float),
    default=_span(_D.bg_scale),
    help="Side of each background crop as a share of the photograph's shorter side (log-uniform).",
)
@click.option(
    "--bg-flip/--no-bg-flip",
    default=_D.bg_flip,
    help="Turn each crop by a random quarter turn and flip.",
)
@click.option(
    "--bg-jitter",
    type=float,
    default=_D.bg_jitter,
    help="Colour jitter of photograph crops: 1 = brightness/contrast 0.4, saturation 0.2, "
    "hue 0.1 (BYOL's magnitudes); 0: none.",
)
@click.option(
    "--plain-share",
    type=float,
    default=_D.plain_share,
    help="Share of scenes on one plain colour (random per scene, or --plain-colour).",
)
@click.option(
    "--plain-colour",
    type=_Colour(),
    default=None,
    help="The plain backgrounds' colour as R,G,B (0..255), e.g. 0,0,0 for black; default: "
    "a random colour per scene.",
)
@click.option(
    "--gradient-share",
    type=float,
    default=_D.gradient_share,
    help="Share of scenes on a linear gradient between two random colours.",
)
@click.option(
    "--quality", type=click.IntRange(1, 100), default=_D.quality, help="JPEG quality (4:4:4)."
)
@click.option(
    "--segmentation/--no-segmentation",
    default=_D.segmentation,
    help="Write each object's visible mask as COCO uncompressed RLE.",
)
@library_errors
def scenes_cmd(src, out, layout, split, count, seed, backgrounds, **options) -> None:
    """Compose multi-object scenes from the labelled objects of SRC, with COCO ground truth.

    Each scene is a background (a random crop of a photograph, flipped and colour-jittered, or a
    plain or gradient colour) with --objects objects of SRC's --split pasted through their own
    masks (IDX: the pixels above --threshold; images with alpha: the alpha; otherwise the whole
    rectangle), placed at random so that each keeps --min-visible of its pixels and no two
    visible boxes overlap beyond --max-iou. OUT gets images/{split}_NNNNNN.jpg and
    instances.json (COCO detection format: tight boxes of the visible pixels, areas, RLE
    masks, category ids from 1, and an info block with every parameter). OUT must be new,
    empty, or made by the same command, which then finishes what is missing. Shards with the
    ground truth: ssl-cli shards build OUT/images SHARDS --annotations OUT/instances.json. See
    docs/scenes.md.

    \b
    Examples:
      ssl-cli data scenes /usr/share/datasets/fashion-mnist data/scenes/train --layout idx --split train --count 1500 --seed 0
      ssl-cli data scenes /usr/share/datasets/fashion-mnist data/scenes/test --layout idx --split test --count 300 --seed 1
      ssl-cli data scenes data/cifar-10-batches-py data/scenes_cifar --layout cifar --count 500 --size 64:128 --objects 3:6
      ssl-cli data scenes data/cutouts data/scenes_cut --layout folder --count 500 --backgrounds data/photos
    """
    from shards.scenes import SceneParams, make_scenes

    try:
        params = SceneParams(**options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    result = make_scenes(
        src,
        out,
        layout=layout,
        split=split,
        count=count,
        seed=seed,
        params=params,
        backgrounds=backgrounds,
        log=lambda s: click.echo(s, err=True),
    )
    if result["up_to_date"]:
        click.echo(f"{out}: {count} scenes already made by this command; nothing to do")
        return
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result["backgrounds"].items()))
    click.echo(
        f"{out}: {result['scenes']} scenes ({result['written']} written now), "
        f"{result['objects']} objects of {result['classes']} classes; backgrounds {kinds}; "
        f"{result['seconds']:.1f} s"
    )
    click.echo(f"ground truth: {out}/instances.json (COCO); images: {out}/images")
