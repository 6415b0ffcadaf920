"""``ssl-cli plot``: curves of one or more runs.

Registered in :mod:`cli.main`.
"""

from __future__ import annotations

from pathlib import Path

import click


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@click.command("plot")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG to write [default: RUN/curves.png].",
)
def plot_cmd(run, out) -> None:
    """Plot total loss, each loss term and eval accuracy of RUN against steps."""
    from train.plots import plot_run

    try:
        path = plot_run(run, out or Path(run) / "curves.png")
    except (OSError, ValueError) as e:
        raise _fail(e) from None
    click.echo(f"wrote {path}")
