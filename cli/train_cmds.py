"""Click commands of the trainer: ``ssl-cli pretrain`` and ``ssl-cli bench train``.

Plain :class:`click.Command` objects, registered in ``cli/main.py``::

    main.add_command(pretrain)
    bench.add_command(bench_train, name="train")

They parse options into config layers (file, then flags, then ``--set`` and bare
``KEY=VALUE`` arguments), and call ``train.loop.pretrain`` / ``train.tools.bench.bench_train``; no
logic of their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from cli.common import (
    ShardFolder,
    device_option,
    json_option,
    library_errors,
    overrides_argument,
    recipe,
    split_overrides,
    storage_options,
    world_size,
)

__all__ = ["bench_train", "pretrain"]


def _literal(value) -> str:
    """``value`` written so that the YAML of ``parse_assignment`` reads it back unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)  # JSON is YAML: strings stay strings ("1e-3", "yes", "on")


def _flag_layer(**flags) -> dict:
    """Nested config dict from ``{"data.batch_size": 256, ...}``, skipping unset (None) flags.

    Each flag goes through the parser of ``--set`` (``train.config.parse_assignment``)."""
    from train.config import deep_merge, parse_assignment

    out: dict = {}
    for key, value in flags.items():
        if value is not None:
            out = deep_merge(out, parse_assignment(f"{key}={_literal(value)}"))
    return out


def _layers(config_file, method, assignments, flags: dict) -> list[dict]:
    from train.config import load_yaml, parse_assignment

    # --config A --config B: B's keys win over A's, key by key (A's other keys are kept)
    layers = [load_yaml(path) for path in config_file or ()]
    if method is not None:
        layers.append({"method": method})
    layers.append(_flag_layer(**flags))
    layers += [parse_assignment(a) for a in assignments]
    return layers


def _check_device(device: str | None, precision: str | None = None) -> None:
    """GPU-only choices on a machine without CUDA are usage errors, before any work starts."""
    if device is None:
        return
    from train.distributed import resolve_device
    from train.loop import resolve_precision

    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if precision is not None:
        try:
            resolve_precision(precision, resolved)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--precision") from None


def _common(f):
    """Options shared by pretrain and bench train (config, model, data, device)."""
    options = [
        click.option(
            "--method",
            metavar="NAME",
            default=None,
            help="A method of the train.methods registry: mos, univip, byol, mocov3, dino "
            "[default: from --config, else mos].",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, exists=True),
            multiple=True,
            help="YAML/JSON config file; unknown keys are errors. Repeatable: later files "
            "override earlier ones key by key (a base recipe, then an ablation).",
        ),
        click.option(
            "--data",
            "shards",
            metavar="SHARDS",
            type=ShardFolder(exists=False),
            default=None,
            help="Shard directory (ssl-cli shards build), or its s3:// / gs:// / https:// URL "
            "[default: data.shards of --config].",
        ),
        click.option(
            "--synthetic",
            is_flag=True,
            default=None,
            help=recipe("Random tensors instead of shards (no DALI needed)."),
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            help=recipe(
                "GLOBAL batch: images per step, all GPUs (ranks) together; lr scales with it."
            ),
        ),
        click.option(
            "--batch-size-per-gpu",
            type=click.IntRange(min=1),
            default=None,
            help="Images per step on each GPU (rank): sets the global --batch-size to this "
            "times WORLD_SIZE (set by torchrun; 1 otherwise). Not with --batch-size.",
        ),
        click.option(
            "--base-lr",
            type=click.FloatRange(min=0),
            default=None,
            help=recipe("Learning rate per 256 images (lr = base_lr * global batch / 256)."),
        ),
        click.option(
            "--backbone",
            default=None,
            help=recipe("timm model name, e.g. vit_small_patch16_224, resnet50."),
        ),
        device_option(recipe("auto: CUDA when available."), default=None),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
            default=None,
            help=recipe("auto: bf16 autocast on CUDA, fp32 on CPU."),
        ),
        click.option(
            "--compile/--no-compile",
            "compile_",
            default=None,
            help=recipe("torch.compile the backbones and heads."),
        ),
        click.option(
            "--num-threads",
            type=click.IntRange(min=1),
            default=None,
            help=recipe("DALI threads per rank (unset: the loader's choice)."),
        ),
        click.option(
            "--loader-workers",
            "workers",
            type=click.IntRange(min=0),
            default=None,
            help=recipe(
                "Loader view-source processes per rank (0: inside the DALI thread; unset: the "
                "loader's choice)."
            ),
        ),
        click.option(
            "--seed",
            type=int,
            default=None,
            help=recipe("Random seed: initialisation, data order and augmentation."),
        ),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="KEY=VALUE",
            help="Any config key, e.g. --set optim.clip_grad=3.0 (repeatable); bare KEY=VALUE "
            "arguments after the options do the same.",
        ),
        click.option("--print-config", is_flag=True, help="Print the resolved config and exit."),
    ]
    for option in reversed(options):
        f = option(f)
    return storage_options(f)


def _global_batch(batch_size: int | None, batch_size_per_gpu: int | None) -> int | None:
    if batch_size_per_gpu is None:
        return batch_size
    if batch_size is not None:
        raise click.UsageError(
            "--batch-size (global) and --batch-size-per-gpu: give one of them, not both"
        )
    return batch_size_per_gpu * world_size()


def _common_flags(
    shards,
    synthetic,
    batch_size,
    batch_size_per_gpu,
    base_lr,
    backbone,
    device,
    precision,
    compile_,
    num_threads,
    workers,
    seed,
) -> dict:
    return {
        "data.shards": shards,
        "data.synthetic": synthetic,
        "data.batch_size": _global_batch(batch_size, batch_size_per_gpu),
        "optim.base_lr": base_lr,
        "model.backbone": backbone,
        "run.device": device,
        "run.precision": precision,
        "run.compile": compile_,
        "data.num_threads": num_threads,
        "data.workers": workers,
        "run.seed": seed,
    }


@click.command("pretrain", context_settings={"show_default": True})
@_common
@overrides_argument
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (checkpoints, metrics, TensorBoard, config) [default: run.out of "
    "--config].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help=recipe("Passes over the shards; the lr, weight-decay and EMA schedules span them."),
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help=recipe("Train exactly this many steps instead of --epochs (schedules span them)."),
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=None,
    help=recipe("Steps between metrics lines."),
)
@click.option(
    "--ckpt-every",
    type=click.IntRange(min=1),
    default=None,
    help=recipe("Steps between checkpoints (and one at the end)."),
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=None,
    help=recipe("Newest checkpoints kept in RUN/checkpoints."),
)
@click.option(
    "--resume",
    type=click.Path(exists=True),
    default=None,
    help="Checkpoint file or run directory to resume from [default: the newest checkpoint in --out, if any].",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help=recipe("Progress bar (rank 0, terminals only)."),
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=None,
    help=recipe(
        "Steps between kNN evaluations on --eval-train/--eval-val (and one at the end); "
        "0: off. Lines eval/knn_top1, eval/knn_top5 go to metrics.jsonl."
    ),
)
@click.option(
    "--eval-train",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Labelled shards: the kNN memory bank [default: eval.train of --config].",
)
@click.option(
    "--eval-val",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Labelled shards: the kNN queries [default: eval.val of --config].",
)
@click.option(
    "--verify-shards/--no-verify-shards",
    default=True,
    help="Before training, check every shard's sha256 against manifest.json (digests of "
    "unchanged files are cached in RUN/shards-checked.json); sizes are checked either way.",
)
@library_errors(usage=("ConfigError", "FileNotFoundError"))
def pretrain(
    method,
    config_file,
    assignments,
    print_config,
    overrides,
    out,
    epochs,
    steps,
    log_every,
    ckpt_every,
    keep_last,
    resume,
    progress,
    eval_every,
    eval_train,
    eval_val,
    verify_shards,
    **common,
) -> None:
    """Self-supervised pretraining of MOS, UniVIP, BYOL or MoCo v3 on shards.

    Values come from the method's recipe, then --config, then the flags, then --set and the
    bare KEY=VALUE arguments (in that order); --print-config shows the result. A run
    directory that holds checkpoints is resumed from the newest one (same config required,
    apart from run/logging keys). Multi-GPU: torchrun --nproc-per-node N $(which ssl-cli)
    pretrain ... With --eval-every N --eval-train SHARDS --eval-val SHARDS, a weighted kNN on
    labelled shards runs every N steps and is logged to metrics.jsonl.

    \b
    Examples:
      ssl-cli pretrain --method mos --data data/shards/coco --out runs/mos_coco
      ssl-cli pretrain --config configs/mos_vits16_coco.yaml --data data/shards/coco --out runs/mos_coco optim.base_lr=1e-3 schedule.epochs=100
      ssl-cli pretrain --method univip --data data/shards/coco --batch-size-per-gpu 64 --print-config
      torchrun --nproc-per-node 8 $(which ssl-cli) pretrain --config configs/mos_vits16_coco.yaml --data data/shards/coco --out runs/mos_coco
    """
    from train.config import dump_yaml, to_dict
    from train.loop import pretrain as run_pretrain
    from train.resolve import resolve_config
    from train.resume import resolve_resume

    _check_device(common["device"])
    flags = _common_flags(**common)
    flags.update(
        {
            "run.out": out,
            "schedule.epochs": epochs,
            "schedule.steps": steps,
            "run.log_every": log_every,
            "run.ckpt_every": ckpt_every,
            "run.keep_last": keep_last,
            "run.progress": progress,
            "eval.every": eval_every,
            "eval.train": eval_train,
            "eval.val": eval_val,
        }
    )
    layers = _layers(config_file, method, assignments + split_overrides(overrides), flags)
    cfg = resolve_config(*layers)
    if print_config:
        from train.loop import check_config

        check_config(cfg)  # what pretrain would refuse, --print-config refuses too
        click.echo(dump_yaml(to_dict(cfg)), nl=False)
        return
    if not cfg.run.out:
        raise click.UsageError("no run directory: pass --out RUN (or run.out in --config)")
    cfg, ckpt = resolve_resume(cfg, layers, resume)  # the checkpoint's config is the base
    _check_device(cfg.run.device, cfg.run.precision)
    run_pretrain(cfg, resume=ckpt, log=click.echo, verify_shards=verify_shards)


@click.command("train", context_settings={"show_default": True})
@_common
@overrides_argument
@click.option(
    "--steps", type=click.IntRange(min=1), default=50, help="Timed steps per measurement."
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=10,
    help="Untimed steps before each measurement.",
)
@click.option(
    "--synthetic-only", is_flag=True, help="Measure only the on-device synthetic ceiling."
)
@click.option(
    "--baseline",
    metavar="METHOD",
    default=None,
    help="Also time this method's step (synthetic, same model and batch) interleaved with "
    "ours, and report the ratio: e.g. --method mos --baseline mocov3.",
)
@json_option()
@library_errors(usage=("ConfigError",))
def bench_train(
    method,
    config_file,
    assignments,
    print_config,
    overrides,
    steps,
    warmup,
    synthetic_only,
    baseline,
    json_out,
    **common,
) -> None:
    """Trainer images/s on real shards next to the same step fed with on-device synthetic
    tensors (the compute ceiling), measured in one run.

    The config resolves as for pretrain (recipe, --config, flags, --set, bare KEY=VALUE).

    \b
    Examples:
      ssl-cli bench train --method mos --synthetic-only
      ssl-cli bench train --method mos --data data/shards/coco --device cuda --batch-size-per-gpu 64
      ssl-cli bench train --method mos --baseline mocov3 --data data/shards/coco --json runs/bench-train.json
    """
    from train.config import dump_yaml, to_dict
    from train.resolve import resolve_config
    from train.tools.bench import bench_train as run_bench

    _check_device(common["device"])
    flags = _common_flags(**common)
    layers = _layers(config_file, method, assignments + split_overrides(overrides), flags)
    cfg = resolve_config(*layers)
    if print_config:
        click.echo(dump_yaml(to_dict(cfg)), nl=False)
        return
    _check_device(cfg.run.device, cfg.run.precision)
    if baseline is not None:
        from train.methods import get_method

        try:
            get_method(baseline)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--baseline") from None
    elif not synthetic_only and not cfg.data.synthetic and not cfg.data.shards:
        raise click.UsageError("pass --data SHARDS (or --synthetic-only)")
    report = run_bench(
        cfg,
        steps=steps,
        warmup=warmup,
        synthetic_only=synthetic_only,
        baseline=baseline,
        log=click.echo,
    )
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")
