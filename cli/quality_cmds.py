"""``ssl-cli bench quality``: representation quality per method at an equal compute budget."""

from __future__ import annotations

import click

from cli.common import device_option, library_errors, overrides_argument, split_overrides

RECIPES = ("cpu", "gpu")
RECIPE_DEFAULT = "[default: from --recipe; see --dry-run]"


def _csv(kind: type):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
        if not items:
            raise click.BadParameter("the list is empty")
        return items

    return convert


@click.command("quality", context_settings={"show_default": True})
@overrides_argument
@click.option(
    "--train",
    "train_shards",
    type=click.Path(file_okay=False),
    required=True,
    help="Pretraining shards; also the kNN memory bank / probe training set unless --bank is "
    "given (then they may be unlabelled, e.g. scenes).",
)
@click.option(
    "--val",
    "val_shards",
    type=click.Path(file_okay=False),
    required=True,
    help="Labelled held-out shards: kNN queries and probe test set.",
)
@click.option(
    "--bank",
    "bank_shards",
    type=click.Path(file_okay=False),
    default=None,
    help="Labelled shards for the kNN memory bank and the probe's training set [default: "
    "--train]; a subset of the training split makes the evaluations of a CPU table cheap.",
)
@click.option(
    "--objects-train",
    type=click.Path(file_okay=False),
    default=None,
    help="Shards with ground truth (built with --annotations, e.g. of `ssl-cli data scenes`): "
    "the object probes' training set. Adds the object kNN / linear probe and the multi-label "
    "image mAP to every run and reference.",
)
@click.option(
    "--objects-val",
    type=click.Path(file_okay=False),
    default=None,
    help="Shards with ground truth: the object probes' scored set (with --objects-train).",
)
@click.option(
    "--objects-size",
    type=click.IntRange(min=1),
    default=None,
    help="Input side of the object probes (whole image resized) [default: data.size].",
)
@click.option(
    "--objects-features",
    type=click.Choice(["roi", "crop"]),
    default="roi",
    help="How a box gets its feature: roi (RoIAlign on the whole image's last feature map) or "
    "crop (the box cut out, resized to data.size, embedded alone).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Report folder: one run per method and seed (resumable), report.json, table.md, "
    "curves.png.",
)
@click.option(
    "--methods",
    default="mos,mocov3,byol,univip",
    callback=_csv(str),
    help="Comma-separated methods to compare.",
)
@click.option(
    "--seeds", default="0,1,2", callback=_csv(int), help="Comma-separated seeds per method."
)
@click.option(
    "--recipe",
    type=click.Choice(RECIPES),
    default="cpu",
    help="cpu: small ViT / ResNet on 32-px inputs, ~10 min per run on 2 cores; gpu: the full "
    "train split for a few hundred epochs' worth.",
)
@click.option(
    "--budget-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Equal wall-clock training time per run, in seconds {RECIPE_DEFAULT}",
)
@click.option(
    "--budget-fe",
    type=click.IntRange(min=1),
    default=None,
    help="Equal compute per run in forward-equivalents (backbone passes: one with gradient "
    "counts 3); replaces --budget-seconds.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=None,
    help=f"Steps between kNN evaluations during each run {RECIPE_DEFAULT}",
)
@device_option("Where every run trains and evaluates (auto: CUDA when available).")
@click.option(
    "--set",
    "assignments",
    metavar="KEY=VALUE",
    multiple=True,
    help="Config override for every run, e.g. --set optim.base_lr=1e-3 (repeatable); bare "
    "KEY=VALUE arguments after the options do the same.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (runs, budgets, each method's resolved schedule, what every override "
    "resolves to) and exit; a bad option or override fails here, before any run.",
)
@library_errors(usage=("ConfigError",))
def bench_quality(
    overrides,
    train_shards,
    val_shards,
    bank_shards,
    objects_train,
    objects_val,
    objects_size,
    objects_features,
    out,
    methods,
    seeds,
    recipe,
    budget_seconds,
    budget_fe,
    eval_every,
    device,
    assignments,
    dry_run,
) -> None:
    """Pretrain each method on the same shards at an equal compute budget, then evaluate
    frozen features: weighted kNN (k = 20, T = 0.07) on both branches, a linear probe, and two
    references (the same backbone at random init, kNN on raw pixels); with --objects-train /
    --objects-val also object-level probes on shards with ground truth.

    Every run's config starts from --recipe, then --set and the bare KEY=VALUE arguments.

    \b
    Examples:
      ssl-cli bench quality --train data/shards/fmnist_train --val data/shards/fmnist_test --out runs/quality
      ssl-cli bench quality --train data/shards/fmnist_train --val data/shards/fmnist_test --out runs/quality-gpu --recipe gpu --device cuda
      ssl-cli bench quality --train data/shards/fmnist_train --val data/shards/fmnist_test --out runs/quality --dry-run optim.base_lr=1e-3
      ssl-cli bench quality --train data/shards/scenes_train --bank data/shards/fmnist_train --val data/shards/fmnist_test --objects-train data/shards/scenes_train --objects-val data/shards/scenes_test --out runs/quality-scenes --methods univip,byol --budget-fe 2000000
    """
    from train.tools.quality import QualityPlan, run_quality

    plan = QualityPlan.build(
        train=train_shards,
        val=val_shards,
        bank=bank_shards,
        objects_train=objects_train,
        objects_val=objects_val,
        objects_size=objects_size,
        objects_features=objects_features,
        out=out,
        methods=methods,
        seeds=seeds,
        recipe=recipe,
        budget_seconds=budget_seconds,
        budget_fe=budget_fe,
        eval_every=eval_every,
        device=device,
        assignments=tuple(assignments) + split_overrides(overrides, shards_option=None),
    )
    if dry_run:
        click.echo(plan.describe())
        return
    report = run_quality(plan, log=click.echo)
    click.echo(
        f"wrote {report['files']['json']}, {report['files']['table']}, {report['files']['png']}"
    )
