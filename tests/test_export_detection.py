"""``ssl-cli export --format detectron2|mmdet``: the target layouts' own key names (written here
from detectron2's ResNet and ViTDet modules and mmdet's ResNet, neither installed), values,
the self-check, the branch default and refusals."""

import json
import pickle

import pytest
import torch
import torchvision
from click.testing import CliRunner

import train.outputs.export as export_mod
from cli.export_cmds import export_cmd
from tests.test_train_loop import quiet, tiny
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.loop import pretrain
from train.resolve import resolve_config

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def d2_resnet18_keys() -> set[str]:
    """detectron2's ResNet-18 (``build_resnet_backbone``: ``stem.conv1`` with its norm,
    ``res2..res5`` of two BasicBlocks, ``conv1``/``conv2`` each with ``.norm``, a ``shortcut``
    with ``.norm`` where a block changes channels or stride), torchvision's BN buffers."""
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{b}" for b in BN}
    for stage in (2, 3, 4, 5):
        for block in (0, 1):
            for conv in ("conv1", "conv2"):
                keys.add(f"res{stage}.{block}.{conv}.weight")
                keys |= {f"res{stage}.{block}.{conv}.norm.{b}" for b in BN}
        if stage > 2:
            keys.add(f"res{stage}.0.shortcut.weight")
            keys |= {f"res{stage}.0.shortcut.norm.{b}" for b in BN}
    return keys


def vitdet_keys(depth: int) -> set[str]:
    """ViTDet's ViT (``detectron2/modeling/backbone/vit.py``) under ``backbone.net.``, with
    the class token and final norm a timm checkpoint also carries."""
    keys = {"pos_embed", "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return {"backbone.net." + k for k in keys}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for method in ("mos", "byol"):
        sched = {"epochs": 1, "steps": 2, "warmup_epochs": 0}
        pretrain(resolve_config(tiny(method, root / method, schedule=sched)), log=quiet)
    return {"vit": root / "mos", "resnet": root / "byol"}


def _backbone(run, branch):
    model = load_checkpoint(latest_checkpoint(run))["model"]
    prefix = f"{branch}.backbone."
    return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}


def _cli(*args, code=0):
    result = CliRunner().invoke(export_cmd, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def test_detectron2_resnet_has_detectron2s_keys_and_the_target_branch(runs, tmp_path):
    out = tmp_path / "r18.pkl"
    result = _cli(runs["resnet"], "--format", "detectron2", "--out", out)
    assert "(target branch" in result.output  # eval's default branch, said
    for line in ("WEIGHTS:", "PIXEL_MEAN: [123.675, 116.28, 103.53]", "DEPTH: 18",
                 "RES2_OUT_CHANNELS: 64", 'NORM: "SyncBN"', "STRIDE_IN_1X1: False",
                 'FORMAT: "RGB"'):  # fmt: skip
        assert line in result.output
    data = pickle.loads(out.read_bytes())
    assert data["matching_heuristics"] is True and "__author__" in data
    assert set(data["model"]) == d2_resnet18_keys()
    ours = _backbone(runs["resnet"], "target")
    assert torch.equal(torch.as_tensor(data["model"]["res4.0.shortcut.norm.running_var"]),
                       ours["layer3.0.downsample.1.running_var"])  # fmt: skip
    assert torch.equal(torch.as_tensor(data["model"]["stem.conv1.weight"]), ours["conv1.weight"])
    info = json.loads((tmp_path / "r18.pkl.json").read_text())
    assert info["branch"] == "target" and info["keys"]["bn1.weight"] == "stem.conv1.norm.weight"


def test_mmdet_resnet_loads_into_torchvisions_resnet_with_the_same_features(runs, tmp_path):
    out = tmp_path / "r18_mmdet.pth"
    result = _cli(runs["resnet"], "--format", "mmdet", "--branch", "online", "--out", out)
    assert "type='ResNet', depth=18" in result.output and "type='Pretrained'" in result.output
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["branch"] == "online"
    reference = torchvision.models.resnet18()
    missing, unexpected = reference.load_state_dict(saved["state_dict"], strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    ours = _backbone(runs["resnet"], "online")
    assert set(saved["state_dict"]) == set(ours)
    for key, value in ours.items():
        assert torch.equal(saved["state_dict"][key], value)


def test_detectron2_vit_is_vitdets_layout(runs, tmp_path):
    out = tmp_path / "vit.pkl"
    result = _cli(runs["vit"], "--format", "detectron2", "--out", out)
    assert "train.init_checkpoint" in result.output and "pretrain_img_size = 32" in result.output
    assert "model.backbone.net.embed_dim = 192" in result.output
    assert "model.backbone.net.num_heads = 3" in result.output
    assert "model.backbone.net.mlp_ratio = 4.0" in result.output
    data = pickle.loads(out.read_bytes())
    assert set(data["model"]) == vitdet_keys(depth=2)
    ours = _backbone(runs["vit"], "target")
    qkv = data["model"]["backbone.net.blocks.1.attn.qkv.weight"]
    assert torch.equal(torch.as_tensor(qkv), ours["blocks.1.attn.qkv.weight"])


def mmpretrain_vit_keys(depth: int) -> set[str]:
    """mmpretrain's ``VisionTransformer`` (the backbone of mmdetection's ViT configs):
    ``patch_embed.projection``, ``layers.N`` of ``ln1``, ``attn.qkv``, ``attn.proj``, ``ln2``,
    ``ffn.layers.0.0`` (first linear, inside a Sequential with its activation) and
    ``ffn.layers.1`` (second linear), the final norm as ``ln1``."""
    keys = {"pos_embed", "cls_token", "patch_embed.projection.weight"}
    keys |= {"patch_embed.projection.bias", "ln1.weight", "ln1.bias"}
    for i in range(depth):
        for part in ("ln1", "attn.qkv", "attn.proj", "ln2", "ffn.layers.0.0", "ffn.layers.1"):
            keys |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
    return keys


def test_mmdet_vit_is_mmpretrains_layout(runs, tmp_path):
    out = tmp_path / "vit_mmdet.pth"
    result = _cli(runs["vit"], "--format", "mmdet", "--out", out)
    saved = torch.load(out, weights_only=True)
    assert set(saved["state_dict"]) == mmpretrain_vit_keys(depth=2)
    ours = _backbone(runs["vit"], "target")
    pairs = {
        "layers.1.ffn.layers.0.0.weight": "blocks.1.mlp.fc1.weight",
        "layers.1.ffn.layers.1.bias": "blocks.1.mlp.fc2.bias",
        "layers.0.ln2.weight": "blocks.0.norm2.weight",
        "ln1.bias": "norm.bias",
        "patch_embed.projection.weight": "patch_embed.proj.weight",
        "layers.1.attn.qkv.weight": "blocks.1.attn.qkv.weight",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(saved["state_dict"][theirs], ours[mine])
    # the printed config repeats the backbone's sizes (vit_tiny: 192 wide, 3 heads, MLP 768)
    assert "type='mmpretrain.VisionTransformer'" in result.output
    assert "embed_dims=192, num_layers=2, num_heads=3" in result.output
    assert "feedforward_channels=768" in result.output and "patch_size=8" in result.output
    assert f"checkpoint='{out.resolve()}'" in result.output


def test_a_conversion_that_loses_a_tensor_writes_nothing(runs, tmp_path, monkeypatch):
    real = export_mod.convert_for

    def lossy(fmt, arch, state, tv):
        mapping = real(fmt, arch, state, tv)
        mapping["bn1.bias"] = mapping["bn1.weight"]  # two tensors onto one name
        return mapping

    monkeypatch.setattr(export_mod, "convert_for", lossy)
    out = tmp_path / "bad.pkl"
    result = _cli(runs["resnet"], "--format", "detectron2", "--out", out, code=1)
    assert "several tensors onto" in result.output
    assert not out.exists() and not (tmp_path / "bad.pkl.json").exists()


def test_suffixes_of_the_detection_formats(runs, tmp_path):
    result = _cli(runs["resnet"], "--format", "detectron2", "--out", tmp_path / "r.pth", code=1)
    assert "writes a .pkl file" in result.output
    result = _cli(runs["resnet"], "--format", "mmdet", "--out", tmp_path / "r.pkl", code=1)
    assert "writes a .pth file" in result.output


def test_no_export_into_another_runs_checkpoint_folder(runs, tmp_path):
    other = runs["vit"] / "checkpoints" / "step-00000099.pt"
    result = _cli(runs["resnet"], "--out", other, code=1)
    assert f"the checkpoint folder of the run {runs['vit']}" in result.output
    assert not other.exists()
