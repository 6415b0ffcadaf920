"""``ssl-cli demo``: the embedded default, end to end on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import library_errors

__all__ = ["demo"]


# ------------------------------------------------------------------------------------------ demo


@click.command()
@click.option(
    "--out", type=click.Path(file_okay=False), default="runs/demo", help="Where the demo writes."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Selective-search worker processes of the sample build [default: all cores].",
)
@library_errors
def demo(out, workers) -> None:
    """The embedded default: builds the embedded sample shards, verifies them, pretrains MOS
    and UniVIP for a few CPU steps, evaluates them with kNN on labelled sample shards, and
    prints next steps.

    \b
    Examples:
      ssl-cli demo
      ssl-cli demo --out runs/demo --workers 2
    """
    from shards.build import build_shards
    from shards.process import BuildParams
    from shards.verify import inspect_shards, verify_shards

    shards_dir = Path(out) / "shards"
    build_shards(
        "@sample",
        shards_dir,
        BuildParams(shard_size=8),
        workers=workers,
        log=click.echo,
        progress=sys.stderr.isatty(),
    )
    problems = verify_shards(shards_dir, decode=True)
    if problems:
        raise click.ClickException("verification failed:\n" + "\n".join(problems))
    click.echo(inspect_shards(shards_dir))
    click.echo(f"verified: {shards_dir} (ssl-cli shards verify {shards_dir})")
    from train.tools.demo import demo_evaluate, demo_pretrain, next_steps

    runs = demo_pretrain(shards_dir, Path(out), log=click.echo, progress=sys.stderr.isatty())
    demo_evaluate(
        out, {m: r["checkpoint"] for m, r in runs.items()}, log=click.echo, workers=workers
    )
    click.echo(next_steps(out))
