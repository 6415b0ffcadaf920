"""``ssl-cli export``: a run's backbone as weights other tools load.

Registered in :mod:`cli.main`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import library_errors

_FORMAT_NAMES = {
    "timm": "timm state dict",
    "safetensors": "safetensors, timm's keys",
    "hf": "Hugging Face Hub / timm folder",
    "detectron2": "detectron2 pickle",
    "mmdet": "mmdetection checkpoint",
}


@click.command("export")
@click.argument("run", type=click.Path(exists=True))
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="File to write (.pth for timm and mmdet, .safetensors, .pkl for detectron2), or folder "
    "for hf.",
)
@click.option(
    "--branch",
    type=click.Choice(["auto", "online", "target"]),
    default="auto",
    show_default=True,
    help="auto: the branch `ssl-cli eval` reports (the momentum encoder of every ssl-cli run); "
    "online: the encoder trained by gradient; target: the momentum (EMA) one.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["timm", "safetensors", "hf", "detectron2", "mmdet"]),
    default="timm",
    show_default=True,
    help="timm: a torch state dict; safetensors: the same tensors as .safetensors; "
    "hf: a folder with config.json and model.safetensors that "
    'timm.create_model("local-dir:OUT", pretrained=True) loads; detectron2: a .pkl in '
    "detectron2's ResNet (or ViTDet) layout; mmdet: a .pth that mmdet's ResNet (or mmpretrain's ViT) loads.",
)
@library_errors
def export_cmd(run, out, branch, fmt) -> None:
    """Export the backbone of RUN (its newest checkpoint, or a checkpoint file) in timm's layout.

    timm and safetensors: load with timm.create_model(arch, num_classes=0, **kwargs) then
    load_state_dict(..., strict=True), the kwargs (depth, img_size, patch_size, ...) as trained;
    OUT.json records them, the input size and the normalisation. ResNets also get
    OUT_torchvision.pth (.safetensors). hf: OUT is a folder (new, empty, or a previous hf export,
    replaced whole) that timm.create_model("local-dir:OUT", pretrained=True) loads as trained.
    detectron2 and mmdet: the backbone renamed to the framework's layout and checked (every
    tensor once, same shape), with the config lines that load it. The exact loading code is
    printed.

    \b
    Examples:
      ssl-cli export runs/mos --out mos_vit.pth
      ssl-cli export runs/mos --format hf --out exports/mos_vit
      ssl-cli export runs/univip --branch target --format safetensors --out r50.safetensors
      ssl-cli export runs/univip --format detectron2 --out r50_d2.pkl
    """
    from train.outputs.export import export_backbone

    info = export_backbone(run, out, branch=branch, fmt=fmt)
    click.echo(
        f"{out}: {info['arch']} ({info['branch']} branch, step {info['step']}), "
        f"{_FORMAT_NAMES[fmt]}; load with:\n"
    )
    if "keys" in info:
        click.echo(
            f"({len(info['keys'])} tensors renamed and checked; the mapping is in {out}.json)"
        )
    click.echo(info["load"])
    if "torchvision" in info["files"]:
        click.echo(f"torchvision layout: {Path(out).with_name(info['files']['torchvision'])}")
