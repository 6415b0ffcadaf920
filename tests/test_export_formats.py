"""``ssl-cli export --format timm|safetensors|hf``: round trips into timm, the printed snippets,
the hf folder's config.json, refusals and atomic writes."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open

import train.outputs.export as export_mod
from cli.export_cmds import export_cmd
from shards.atomic import atomic_file
from tests.test_train_loop import quiet, tiny
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.loop import pretrain
from train.methods import build_model
from train.outputs.export import export_backbone
from train.resolve import resolve_config

SOURCE_KEYS = {"tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "license"}
INHERITED_KEYS = SOURCE_KEYS | {"origin_url", "paper_ids", "notes", "test_input_size"}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: MOS with a ViT (depth 2, 32 px, patch 8), BYOL with a ResNet-18."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("mos", "byol"):
        sched = {"epochs": 1, "steps": 2, "warmup_epochs": 0}
        pretrain(resolve_config(tiny(method, root / method, schedule=sched)), log=quiet)
    return {"vit": root / "mos", "resnet": root / "byol"}


@torch.no_grad()
def _features(run_dir, x, branch="target"):  # export's default: eval's branch
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    model, _ = build_model(resolve_config(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return getattr(model, branch).backbone.eval()(x)


def _input():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _run_snippet(code: str) -> torch.nn.Module:
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the snippet the export printed
    return scope["model"].eval()


def _cli(*args):
    return CliRunner().invoke(export_cmd, [str(a) for a in args], catch_exceptions=False)


def _printed_snippet(output: str) -> str:
    """The Python lines the command printed after its ``load with:`` line."""
    lines = output.split("load with:\n", 1)[1].splitlines()
    return "\n".join(line for line in lines if not line.startswith("torchvision layout:"))


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name] == []


FILES = {"timm": "backbone.pth", "safetensors": "backbone.safetensors", "hf": "backbone_hf"}


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("fmt", ["timm", "safetensors", "hf"])
def test_printed_snippet_loads_the_backbone_with_identical_outputs(runs, kind, fmt, tmp_path):
    out = tmp_path / "exports" / FILES[fmt]
    result = _cli(runs[kind], "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    snippet = _printed_snippet(result.output)
    assert str(out.resolve()) in snippet
    x = _input()
    want = _features(runs[kind], x)
    got = _run_snippet(snippet)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert _no_temporaries(out.parent)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_hf_folder_is_what_timm_local_dir_loads(runs, kind, tmp_path):
    out = tmp_path / "hf"
    info = export_backbone(runs[kind], out, fmt="hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "ssl_cli_export.json",
    ]
    assert json.loads((out / "ssl_cli_export.json").read_text()) == info
    x = _input()
    want = _features(runs[kind], x)
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
        # without pretrained=True timm builds the architecture (our kwargs) with random weights
        bare = timm.create_model(f"local-dir:{out}").eval()
        assert bare(x).shape == want.shape and not torch.allclose(bare(x), want, atol=1e-3)
    assert "pretrained=True" in info["load"]


def test_hf_config_describes_our_backbone_only(runs, tmp_path):
    for kind, arch, features in [("vit", "vit_tiny_patch16_224", 192), ("resnet", "resnet18", 512)]:
        out = tmp_path / kind
        export_backbone(runs[kind], out, fmt="hf")
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == arch and config["num_classes"] == 0
        assert config["num_features"] == features
        cfg = config["pretrained_cfg"]
        assert cfg["input_size"] == [3, 32, 32]
        assert cfg["mean"] == MEAN and cfg["std"] == STD
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875
        assert cfg["num_classes"] == 0
        assert not INHERITED_KEYS & set(cfg), INHERITED_KEYS & set(cfg)
        assert not SOURCE_KEYS & set(config)
        assert config["model_args"]["num_classes"] == 0
        if kind == "vit":
            args = config["model_args"]
            assert args["depth"] == 2 and args["patch_size"] == 8
            assert args["img_size"] in (32, [32, 32])
            assert cfg["fixed_input_size"] is True


def test_safetensors_file_and_its_metadata(runs, tmp_path):
    out = tmp_path / "r18.safetensors"
    info = export_backbone(runs["resnet"], out, branch="target", fmt="safetensors")
    ckpt = load_checkpoint(latest_checkpoint(runs["resnet"]))
    prefix = "target.backbone."
    expected = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(expected)
        for k in expected:
            assert torch.equal(f.get_tensor(k), expected[k])
    assert meta["arch"] == "resnet18" and meta["branch"] == "target"
    assert meta["step"] == str(ckpt["step"]) and meta["format"] == "pt"
    assert json.loads(meta["timm_kwargs"]) == {}
    side = json.loads((tmp_path / "r18.safetensors.json").read_text())
    assert side == info and side["format"] == "safetensors" and side["input_size"] == 32
    assert side["files"] == {
        "timm": "r18.safetensors",
        "torchvision": "r18_torchvision.safetensors",
    }
    # the snippet of a target export gives the target backbone
    x = _input()
    torch.testing.assert_close(
        _run_snippet(info["load"])(x), _features(runs["resnet"], x, "target"), rtol=0, atol=1e-6
    )


def test_a_bare_create_model_does_not_fit_a_resized_vit(runs, tmp_path):
    # why the snippet spells out the kwargs: depth 2 / 32 px / patch 8 are not the defaults
    info = export_backbone(runs["vit"], tmp_path / "v.pth")
    assert "depth=2, img_size=32, patch_size=8" in info["load"]
    with pytest.raises(RuntimeError):
        timm.create_model(info["arch"], num_classes=0).load_state_dict(
            torch.load(tmp_path / "v.pth", weights_only=True), strict=True
        )


@pytest.mark.parametrize(
    ("fmt", "name", "match"),
    [
        ("timm", "b.safetensors", r"writes a \.pth, \.pt or \.bin file; name it b\.pth"),
        ("timm", "b", r"name it b\.pth"),
        ("safetensors", "b.pth", r"name it b\.safetensors, or pass --format timm"),
        ("hf", "b.pth", "writes a folder"),
        ("hf", "b.safetensors", "or pass --format safetensors"),
    ],
)
def test_suffix_that_contradicts_the_format_is_refused(runs, tmp_path, fmt, name, match):
    with pytest.raises(ValueError, match=match):
        export_backbone(runs["vit"], tmp_path / name, fmt=fmt)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(
        export_cmd, [str(runs["vit"]), "--format", fmt, "--out", str(tmp_path / name)]
    )
    assert result.exit_code != 0 and "Error: --out" in result.output


def test_hf_refuses_a_foreign_folder_and_a_file_but_replaces_a_previous_export(runs, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    with pytest.raises(ValueError, match="not an ssl-cli hf export.*README.md"):
        export_backbone(runs["vit"], foreign, fmt="hf")
    assert [p.name for p in foreign.iterdir()] == ["README.md"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_backbone(runs["vit"], tmp_path / "file", fmt="hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_backbone(runs["vit"], empty, fmt="hf")  # an empty folder is fine
    # a previous export is replaced whole: online, then target
    out = tmp_path / "hf"
    export_backbone(runs["vit"], out, fmt="hf")
    info = export_backbone(runs["vit"], out, fmt="hf", branch="target")
    assert json.loads((out / "ssl_cli_export.json").read_text())["branch"] == "target"
    x = _input()
    torch.testing.assert_close(
        _run_snippet(info["load"])(x), _features(runs["vit"], x, "target"), rtol=0, atol=1e-6
    )
    assert _no_temporaries(tmp_path)
    # a file format refuses a folder
    folder = tmp_path / "dir.pth"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        export_backbone(runs["vit"], folder, fmt="timm")


@pytest.mark.parametrize("fmt", ["timm", "safetensors", "hf"])
def test_every_format_refuses_the_checkpoint_folder(runs, fmt):
    ckpt_dir = runs["vit"] / "checkpoints"
    before = sorted(p.name for p in ckpt_dir.iterdir())
    name = {"timm": "b.pth", "safetensors": "b.safetensors", "hf": "b"}[fmt]
    for out in (ckpt_dir / name, ckpt_dir / "sub" / name):
        with pytest.raises(ValueError, match="checkpoint folder"):
            export_backbone(runs["vit"], out, fmt=fmt)
    if fmt == "hf":
        with pytest.raises(ValueError, match="checkpoint folder"):
            export_backbone(runs["vit"], ckpt_dir, fmt=fmt)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before


def test_an_interrupted_file_export_leaves_the_previous_file(runs, tmp_path, monkeypatch):
    out = tmp_path / "b.safetensors"
    export_backbone(runs["vit"], out, fmt="safetensors")
    before = out.read_bytes()

    def killed(path, data, fsync=True):  # interrupted halfway through writing the file
        with atomic_file(path) as f:
            f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        export_backbone(runs["vit"], out, fmt="safetensors", branch="target")
    assert out.read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        export_backbone(runs["vit"], tmp_path / "new.safetensors", fmt="safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "b.safetensors.json"]


def test_an_hf_folder_that_does_not_load_back_is_not_written(runs, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export_backbone(runs["vit"], out, fmt="hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(folder, reference, input_size):
        assert (folder / "model.safetensors").is_file()
        raise ValueError("the hf folder loads into timm with other outputs")

    monkeypatch.setattr(export_mod, "_check_hf_folder", fails)
    with pytest.raises(ValueError, match="other outputs"):
        export_backbone(runs["vit"], out, fmt="hf", branch="target")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="other outputs"):
        export_backbone(runs["vit"], tmp_path / "fresh", fmt="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_help_has_the_examples():
    result = CliRunner().invoke(export_cmd, ["--help"])
    assert result.exit_code == 0
    assert (
        "  Examples:\n"
        "    ssl-cli export runs/mos --out mos_vit.pth\n"
        "    ssl-cli export runs/mos --format hf --out exports/mos_vit\n"
        "    ssl-cli export runs/univip --branch target --format safetensors --out r50.safetensors\n"
        "    ssl-cli export runs/univip --format detectron2 --out r50_d2.pkl\n"
    ) in result.output
    assert "[timm|safetensors|hf|detectron2|mmdet]" in result.output
    assert "[auto|online|target]" in result.output
