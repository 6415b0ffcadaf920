"""Click commands of frozen-feature evaluation: ``ssl-cli eval knn``, ``ssl-cli eval linear`` and
``ssl-cli eval objects``.

A :class:`click.Group`, registered in ``cli/main.py``::

    main.add_command(eval_group, name="eval")

The commands parse options and call :func:`train.eval.classify.knn_eval` /
:func:`train.eval.classify.linear_eval` / :func:`train.eval.objects.objects_eval`, which extract the
features, score them and write the JSON report into the run; nothing else here. Under
``torchrun`` every rank of knn and linear extracts its part; objects runs in one process.

``--branch auto`` (the default) evaluates the momentum (target) encoder when the checkpoint has
one, as DINO and the MOS evaluation do; ``--branch both`` evaluates the online and the target
backbone and prints one row per branch.
"""

from __future__ import annotations

import click

from cli.common import (
    ShardFolder,
    device_option,
    json_option,
    library_errors,
    require,
    storage_options,
    world_size,
)

__all__ = ["eval_group"]


@click.group("eval", context_settings={"show_default": True})
def eval_group() -> None:
    """Frozen-feature evaluation of a pretrained backbone on labelled shards.

    RUN is a run directory (its newest checkpoint) or a checkpoint file; --train and --val are
    labelled shard folders (shards build of a labelled layout: imagenet, cifar, idx), or for
    objects shard folders with ground-truth boxes (shards build --annotations).

    \b
    Examples:
      ssl-cli eval knn runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test
      ssl-cli eval linear runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test
      ssl-cli eval objects runs/univip_scenes --train data/shards/scenes_train --val data/shards/scenes_test
    """


_TRAIN_HELP = "Labelled shards (KEY.cls): the kNN memory bank / the probe's training set."
_VAL_HELP = "Labelled shards scored for top-1 / top-5."
_SIZE_HELP = (
    "Input side: centre crops (and the paper probe's random resized crops) "
    "[default: the checkpoint's data.size]."
)


def _options(f=None, *, train_help=_TRAIN_HELP, val_help=_VAL_HELP, size_help=_SIZE_HELP):
    """Options shared by every eval command: checkpoint, shards, extraction (``@_options``, or
    ``@_options(train_help=...)`` with the shard and size options described otherwise)."""
    if f is None:
        return lambda g: _options(g, train_help=train_help, val_help=val_help, size_help=size_help)
    options = [
        click.argument("ckpt", metavar="RUN", required=False, type=click.Path(exists=True)),
        click.option("--train", "train_shards", required=True, type=ShardFolder(), help=train_help),
        click.option("--val", "val_shards", default=None, type=ShardFolder(), help=val_help),
        click.option(
            "--branch",
            type=click.Choice(["auto", "online", "target", "both"]),
            default="auto",
            help="auto: the momentum (EMA target) encoder when the checkpoint has one (every "
            "ssl-cli method), else the online one; both: each, reported side by side.",
        ),
        click.option(
            "--size",
            type=click.IntRange(min=1),
            default=None,
            help=size_help,
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=256,
            help="Images per forward pass during feature extraction, per process (not the "
            "probe's SGD batch).",
        ),
        device_option("auto: CUDA when available (GPU decoding too)."),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            help="Backbone precision during extraction; bf16 autocast needs CUDA.",
        ),
        click.option(
            "--num-threads",
            type=click.IntRange(min=1),
            default=None,
            help="DALI threads [default: the loader's].",
        ),
        json_option("Report path [default: RUN/eval/<kind>[-target|-both]-step-N.json]."),
        click.option(
            "--progress/--no-progress", default=True, help="Progress bars (terminals only)."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return storage_options(f)


def _check(device: str, precision: str) -> None:
    """GPU-only choices on a machine without CUDA are usage errors, before any work."""
    import torch

    from train.distributed import resolve_device

    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if precision == "bf16" and resolved.type != "cuda":
        raise click.BadParameter(
            f"bf16 autocast needs a CUDA GPU; this run is on {resolved.type} "
            f"(CUDA available: {torch.cuda.is_available()}): use --precision fp32",
            param_hint="--precision",
        )


def _show(report: dict, what: str) -> None:
    """One line for one branch; a table with a row per branch for ``--branch both``."""
    counts = f"{report['n_val']} val, {report['n_train']} train, {report['num_classes']} classes"
    if "branches" not in report:
        click.echo(
            f"{what}: top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  ({counts}; "
            f"{report['backbone']} {report['branch']} step {report['step']}, "
            f"{report['size']} px, {report['elapsed_s']:.1f} s)"
        )
    else:
        click.echo(
            f"{what}: {report['backbone']} step {report['step']}, {report['size']} px ({counts}; "
            f"{report['elapsed_s']:.1f} s)"
        )
        click.echo(f"  {'branch':<8} {'top-1':>8} {'top-5':>8}")
        for name, r in report["branches"].items():
            click.echo(f"  {name:<8} {r['top1']:>7.2f}% {r['top5']:>7.2f}%")
    if report.get("input_size_change"):
        click.echo(f"note: {report['input_size_change']}")
    if report.get("warning"):
        click.echo(f"warning: {report['warning']}", err=True)
    click.echo(f"wrote {report['path']}")


def _run(fn, **kwargs) -> dict:
    import sys

    kwargs["progress"] = kwargs["progress"] and sys.stderr.isatty()
    train, val = kwargs.get("train"), kwargs.get("val")
    if val is None and kwargs.get("val_fraction") is None:
        what = "--val SHARDS" + (
            ", or --val-fraction F to split --train" if "val_fraction" in kwargs else ""
        )
        raise click.UsageError(f"no shards to score: give {what}")
    if kwargs.get("val_fraction") is None and _same_folder(train, val):
        click.echo(
            f"warning: --train and --val are the same shards ({train}): every query is in the "
            "bank or the probe's training set, so the score measures memory, not features; "
            "--val-fraction 0.1 (instead of --val) cuts them into two parts that share nothing, "
            "and `ssl-cli shards split` writes such parts as two shard folders",
            err=True,
        )
    return library_errors(fn, usage=("ConfigError", "FileNotFoundError"))(**kwargs)


def _same_folder(a, b) -> bool:
    from shards.location import locate

    if a is None or b is None:
        return False
    return locate(str(a)).same_folder(locate(str(b)))


_VAL_FRACTION = click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Score a share of --train instead of --val: that many of its samples (a fixed "
    "permutation, the same every time) are the queries, the rest the bank / training set.",
)


@eval_group.command("knn")
@_options
@_VAL_FRACTION
@click.option("--k", type=click.IntRange(min=1), default=20, help="Neighbours (DINO: 20).")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=0.07,
    help="Vote weight exp(cos / T) (DINO: 0.07).",
)
def knn(
    ckpt,
    train_shards,
    val_shards,
    branch,
    size,
    batch_size,
    device,
    precision,
    num_threads,
    json_out,
    progress,
    val_fraction,
    k,
    temperature,
) -> None:
    """Weighted kNN (DINO) on L2-normalised backbone features of centre crops of RUN's
    backbone: TRAIN is the memory bank, VAL is scored. Prints top-1 / top-5 and writes
    RUN/eval/knn-target-step-N.json (knn-step-N.json for --branch online, knn-both-step-N.json
    for both).

    \b
    Examples:
      ssl-cli eval knn runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test
      ssl-cli eval knn runs/mos_fmnist/checkpoints/step-00001000.pt --train data/shards/fmnist_train --val data/shards/fmnist_test --branch both
      ssl-cli eval knn runs/mos_coco --train data/shards/imagenet_train --val data/shards/imagenet_val --device cuda --precision bf16
      ssl-cli eval knn runs/mine --train data/shards/mine_labelled --val-fraction 0.1
    """
    from train.eval.classify import knn_eval

    require(ckpt, "ckpt")
    _check(device, precision)
    report = _run(
        knn_eval,
        checkpoint=ckpt,
        train=train_shards,
        val=val_shards,
        val_fraction=val_fraction,
        k=k,
        temperature=temperature,
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        out=json_out,
        progress=progress,
    )
    _show(report, f"kNN (k={k}, T={temperature:g})")


@eval_group.command("linear")
@_options
@click.option(
    "--protocol",
    type=click.Choice(["fast", "paper"]),
    default="fast",
    help="fast: probe on centre-crop features extracted once (seconds to minutes). paper: "
    "the MoCo v3 / DINO protocol, random resized crops + flips decoded and run through the "
    "frozen backbone every epoch (an epoch costs about a feature extraction of TRAIN).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="Probe epochs.")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    help="Probe learning rate per 256 (scaled by the probe batch / 256), cosine to 0 "
    "(MoCo v3 main_lincls.py; our choice for both protocols).",
)
@click.option(
    "--probe-batch-size",
    type=click.IntRange(min=2),
    default=256,
    help="Probe SGD batch (per process); with --protocol paper also the training forward batch.",
)
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, help="SGD momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, help="Probe wd.")
@click.option("--seed", type=int, default=0, help="Probe initialisation and batch order.")
@_VAL_FRACTION
def linear(
    ckpt,
    train_shards,
    val_shards,
    branch,
    size,
    batch_size,
    device,
    precision,
    num_threads,
    json_out,
    progress,
    epochs,
    lr,
    probe_batch_size,
    protocol,
    momentum,
    weight_decay,
    seed,
    val_fraction,
) -> None:
    """Linear probe on the frozen backbone (BatchNorm without affine + Linear, SGD, cosine
    lr): fit on TRAIN, score VAL's centre crops. Prints top-1 / top-5 and writes
    RUN/eval/linear-target-step-N.json (named like knn's). Progress goes to stderr: a line
    per epoch with --protocol paper; with fast, after the first and the last epoch and every
    10 s (epoch i/N, loss, elapsed, ETA).

    \b
    Examples:
      ssl-cli eval linear runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test
      ssl-cli eval linear runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test --epochs 20 --lr 0.3
      ssl-cli eval linear runs/mos_coco --train data/shards/imagenet_train --val data/shards/imagenet_val --protocol paper --device cuda
    """
    from train.eval.classify import linear_eval
    from train.eval.probes import LinearProbeConfig, PaperProbeConfig

    require(ckpt, "ckpt")
    _check(device, precision)
    config = LinearProbeConfig if protocol == "fast" else PaperProbeConfig
    probe = config(
        epochs=epochs,
        batch_size=probe_batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
    )
    report = _run(
        linear_eval,
        checkpoint=ckpt,
        train=train_shards,
        val=val_shards,
        val_fraction=val_fraction,
        probe=probe,
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        out=json_out,
        progress=progress,
        protocol=protocol,
        log=lambda line: click.echo(line, err=True),
    )
    _show(report, f"linear probe ({protocol}, {epochs} epochs)")


@eval_group.command("objects")
@_options(
    train_help="Shards with ground truth (shards build --annotations): the objects of the kNN "
    "memory bank and the probes' training set.",
    val_help="Shards with ground truth and the same categories, scored.",
    size_help="Input side: the whole image is resized to SIZE x SIZE (aspect not kept) "
    "[default: the checkpoint's data.size].",
)
@click.option("--k", type=click.IntRange(min=1), default=20, help="Neighbours (DINO: 20).")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=0.07,
    help="Vote weight exp(cos / T) (DINO: 0.07).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="Epochs of both probes.")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    help="Probes' learning rate per 256 (scaled by the probe batch / 256), cosine to 0.",
)
@click.option(
    "--probe-batch-size", type=click.IntRange(min=2), default=256, help="Probes' SGD batch."
)
@click.option("--seed", type=int, default=0, help="Probes' initialisation and batch order.")
@click.option(
    "--box-features",
    type=click.Choice(["roi", "crop"]),
    default="roi",
    help="roi: RoIAlign of the box on the whole image's last feature map (detection practice); "
    "crop: the box cut out of the SIZE image, resized to --crop-size, and embedded alone.",
)
@click.option(
    "--crop-size",
    type=click.IntRange(min=1),
    default=None,
    help="With --box-features crop: the side crops are resized to [default: the checkpoint's "
    "data.size, the size of its training views].",
)
def objects(
    ckpt,
    train_shards,
    val_shards,
    branch,
    size,
    batch_size,
    device,
    precision,
    num_threads,
    json_out,
    progress,
    k,
    temperature,
    epochs,
    lr,
    probe_batch_size,
    seed,
    box_features,
    crop_size,
) -> None:
    """Object-level evaluation on shards with ground-truth boxes (COCO annotations): each
    object's feature is RoIAlign of its box on the last feature map (ViT patch grid, ResNet
    C5), scored by weighted kNN and a linear probe over object classes (top-1); each image's
    pooled feature by one-vs-rest logistic classifiers (macro mAP over the classes in VAL).
    The same run scores the architecture at random init (seed 0) and raw pixels of the boxes
    as references. Prints a row per branch and reference and writes
    RUN/eval/objects-target-step-N.json (named like knn's). One process (not under torchrun).

    \b
    Examples:
      ssl-cli shards build data/scenes/train/images data/shards/scenes_train --annotations data/scenes/train/instances.json
      ssl-cli eval objects runs/univip_scenes --train data/shards/scenes_train --val data/shards/scenes_test
      ssl-cli eval objects runs/univip_scenes --train data/shards/scenes_train --val data/shards/scenes_test --branch both --size 64
      ssl-cli eval objects runs/mos_coco --train data/shards/coco_train --val data/shards/coco_val --device cuda --precision bf16
    """
    from train.eval.objects import objects_eval
    from train.eval.probes import LinearProbeConfig

    require(ckpt, "ckpt")
    if world_size() > 1:
        raise click.UsageError("eval objects runs in one process; start it without torchrun")
    if crop_size is not None and box_features != "crop":
        raise click.UsageError("--crop-size applies to --box-features crop")
    _check(device, precision)
    probe = LinearProbeConfig(epochs=epochs, batch_size=probe_batch_size, lr=lr, seed=seed)
    report = _run(
        objects_eval,
        checkpoint=ckpt,
        train=train_shards,
        val=val_shards,
        k=k,
        temperature=temperature,
        probe=probe,
        size=size,
        box_features=box_features,
        crop_size=crop_size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        out=json_out,
        progress=progress,
        log=lambda line: click.echo(line, err=True),
    )
    _show_objects(report)


def _show_objects(report: dict) -> None:
    """The rows side by side: object kNN, object linear probe, image mAP."""
    click.echo(
        f"objects: {report['backbone']} {report['branch']} step {report['step']}, "
        f"{report['size']} px; val {report['n_val_objects']} objects in "
        f"{report['n_val_images']} images, train {report['n_train_objects']} in "
        f"{report['n_train_images']}, {report['num_classes']} classes "
        f"({report['classes_in_val']} in val); {report['elapsed_s']:.1f} s"
    )
    click.echo(f"  {'features':<12} {'object kNN':>11} {'object linear':>14} {'image mAP':>10}")
    for name, r in report["rows"].items():
        click.echo(
            f"  {name.replace('_', ' '):<12} {r['object_knn_top1']:>10.2f}% "
            f"{r['object_linear_top1']:>13.2f}% {r['image_map']:>9.2f}%"
        )
    if report.get("input_size_change"):
        click.echo(f"note: {report['input_size_change']}")
    if report.get("warning"):
        click.echo(f"warning: {report['warning']}", err=True)
    click.echo(f"wrote {report['path']}")
