"""``ssl-cli plot``: curves of one or more runs.

Registered in :mod:`cli.main`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import library_errors


@click.command("plot")
@click.argument(
    "runs", metavar="RUN...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG to write [default with one RUN: RUN/curves.png; required with several].",
)
@library_errors
def plot_cmd(runs, out) -> None:
    """Plot loss terms, learning rate and eval accuracy of runs against steps.

    Each RUN's total loss, each loss term, the learning rate and the eval accuracy (0-100 %).
    Several runs share one figure: one colour per run and a legend of the run folder names
    (widened to parent/name where two share a name); --out is then required. On the accuracy
    panel top-1 is solid on top and top-5 dashed underneath, so equal curves stay visible.
    Lines of RUN/metrics.jsonl without a numeric step are skipped and counted.

    \b
    Examples:
      ssl-cli plot runs/mos
      ssl-cli plot runs/mos runs/mocov3 --out compare.png
    """
    from train.outputs.plots import plot_runs

    if out is None and len(runs) > 1:
        raise click.UsageError(
            f"{len(runs)} runs given: say where the comparison goes with --out PNG "
            "(only a single RUN defaults to RUN/curves.png)"
        )
    path = plot_runs(list(runs), out or Path(runs[0]) / "curves.png")
    click.echo(f"wrote {path}")
