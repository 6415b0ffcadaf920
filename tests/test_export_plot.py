"""Export the pretrained backbone for timm / torchvision, and plot a run's curves."""

import json

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from tests.test_train_loop import quiet, tiny
from train.loop import pretrain
from train.outputs.export import export_backbone
from train.outputs.plots import plot_run
from train.resolve import resolve_config


def _run(method, tmp_path, steps=3):
    cfg = resolve_config(
        tiny(method, tmp_path / method, schedule={"epochs": 1, "steps": steps, "warmup_epochs": 0})
    )
    pretrain(cfg, log=quiet)
    return tmp_path / method


@torch.no_grad()
def _online_features(run_dir, x):
    from train.checkpoint import latest_checkpoint, load_checkpoint
    from train.methods import build_model

    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    model, _ = build_model(resolve_config(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.online.backbone.eval()(x)


def test_vit_export_loads_strictly_in_timm_with_identical_outputs(tmp_path):
    run = _run("mos", tmp_path)
    out = tmp_path / "export" / "backbone.pth"
    info = export_backbone(run, out, branch="online")
    assert info["arch"] == "vit_tiny_patch16_224" and info["input_size"] == 32
    assert json.loads((tmp_path / "export" / "backbone.pth.json").read_text()) == info
    model = timm.create_model(info["arch"], num_classes=0, **info["timm_kwargs"])
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), _online_features(run, x))
    assert "torchvision" not in info["files"]


def test_resnet_export_has_a_torchvision_layout(tmp_path):
    run = _run("byol", tmp_path)
    info = export_backbone(run, tmp_path / "r18.pth", branch="online")
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(
        torch.load(tmp_path / info["files"]["torchvision"]), strict=False
    )
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), _online_features(run, x))


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        export_backbone(tmp_path / "nope", tmp_path / "b.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_backbone(tmp_path / "empty", tmp_path / "b.pth")


def test_plot_has_every_loss_term(tmp_path):
    run = _run("univip", tmp_path, steps=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "eval/knn_top1": 12.5, "eval/knn_top5": 40.0}) + "\n")
    out = plot_run(run, tmp_path / "curves.png")
    img = Image.open(out)
    assert img.size[0] > 800 and img.size[1] > 300
    assert len(np.unique(np.asarray(img.convert("L")))) > 20  # drawn, not blank
