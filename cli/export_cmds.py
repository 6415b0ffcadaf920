"""``ssl-cli export``: a run's backbone as weights other tools load.

Registered in :mod:`cli.main`.
"""

from __future__ import annotations

from pathlib import Path

import click


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@click.command("export")
@click.argument("run", type=click.Path(exists=True))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Backbone state dict to write (.pth).",
)
@click.option(
    "--branch",
    type=click.Choice(["online", "target"]),
    default="online",
    help="Online encoder, or the momentum (EMA) one.",
)
def export_cmd(run, out, branch) -> None:
    """Export the backbone of RUN (its newest checkpoint, or a checkpoint file) in timm's layout.

    Loads with timm.create_model(arch, num_classes=0, **kwargs).load_state_dict(..., strict=True);
    OUT.json records arch, kwargs and input size. ResNets also get OUT_torchvision.pth.
    """
    from train.export import export_backbone

    try:
        info = export_backbone(run, out, branch=branch)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _fail(e) from None
    click.echo(f"{out}: {info['arch']} ({info['branch']} branch, step {info['step']}); load with:")
    click.echo(f"  {info['load']}")
    if "torchvision" in info["files"]:
        click.echo(f"  torchvision layout: {Path(out).with_name(info['files']['torchvision'])}")
