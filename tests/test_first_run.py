"""A first run on the user's own data: what the tool says before it trains, while it starts,
and when the data do not fit the recipe."""

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main as cli
from tests.conftest import encode, photo
from tests.test_train_loop import tiny
from train import loop as loop_mod
from train.config import ConfigError
from train.distributed import init_distributed
from train.loop import build_parts, pretrain, schedule_warnings
from train.methods import resolve_config


def test_a_warm_up_longer_than_the_run_warns_and_the_first_step_is_reported(tmp_path):
    lines = []
    cfg = resolve_config(
        tiny("byol", tmp_path, schedule={"epochs": 1, "steps": 3, "warmup_epochs": 2}),
        {"run": {"log_every": 10}},
    )
    pretrain(cfg, log=lines.append)
    text = "\n".join(lines)
    assert (
        "warning: the lr warm-up (schedule.warmup_epochs=2: 8 steps) is longer than the run" in text
    )
    assert "schedule.warmup_epochs=0" in text
    first = [line for line in lines if line.startswith("first step:")]
    assert len(first) == 1 and "the 2 steps left take 0:00:0" in first[0]


def test_a_slow_cpu_recipe_is_announced_with_its_estimate(tmp_path, monkeypatch):
    cfg = resolve_config(tiny("mocov3", tmp_path))
    parts = build_parts(cfg, init_distributed("cpu"))
    assert not schedule_warnings(cfg, parts)  # synthetic data: nothing to estimate
    real = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "synthetic": False}))
    monkeypatch.setattr(loop_mod, "_SLOW_CPU_STEP_S", 0.0)
    (warning,) = schedule_warnings(real, parts)
    assert "on this CPU a step of this recipe takes about" in warning
    assert "--config configs/demo_mos_cpu.yaml" in warning


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """12 photographs in two class folders, and their shards built as a plain folder."""
    root = tmp_path_factory.mktemp("first_run")
    src = root / "images"
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        for cls in ("cats", "dogs"):
            for size in ((120, 90), (100, 130)):
                (src / cls).mkdir(parents=True, exist_ok=True)
                (src / cls / f"{name}_{size[0]}_{k}.jpg").write_bytes(encode(photo(name, size)))
    out = root / "shards"
    result = CliRunner().invoke(cli, ["shards", "build", str(src), str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return src, out, result.output


def test_class_folders_read_as_a_plain_folder_get_the_imagenet_hint(class_folders, tmp_path):
    src, _, output = class_folders
    assert "labels: none (the images sit in 2 sub-folders: cats, dogs" in output
    assert "--layout imagenet" in output
    out = tmp_path / "labelled"
    result = CliRunner().invoke(
        cli, ["shards", "build", str(src), str(out), "--layout", "imagenet", "--no-progress"]
    )
    assert "labels: 2 classes (cats, dogs)" in result.output
    inspect = CliRunner().invoke(cli, ["shards", "inspect", str(out), "--examples", "0"])
    assert "    0 (cats): 6" in inspect.output and "    1 (dogs): 6" in inspect.output


def test_inspect_lists_every_class_up_to_its_limit(tmp_path):
    src = tmp_path / "many"
    for c in range(33):
        (src / f"c{c:02d}").mkdir(parents=True)
        Image.fromarray(photo("coffee", (64, 48))).save(src / f"c{c:02d}" / "a.png")
    out = tmp_path / "shards"
    result = CliRunner().invoke(
        cli,
        [
            "shards",
            "build",
            str(src),
            str(out),
            "--layout",
            "imagenet",
            "--no-progress",
            "--min-side",
            "8",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert (
        "labels: 33 classes (c00, c01, c02, c03, c04, c05, c06, c07, ... 25 more)" in result.output
    )
    text = CliRunner().invoke(cli, ["shards", "inspect", str(out), "--examples", "0"]).output
    assert "    29 (c29): 1" in text and "    ... 3 more" in text and "(c30)" not in text


def test_pretrain_on_a_folder_of_images_says_to_build_shards_first(class_folders, tmp_path):
    src, _, _ = class_folders
    result = CliRunner().invoke(
        cli,
        [
            "pretrain",
            "--method",
            "mos",
            "--data",
            str(src),
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
        ],  # fmt: skip
    )
    assert result.exit_code != 0
    assert "holds images, not shards" in result.output
    assert f"ssl-cli shards build {src} SHARDS" in result.output


def test_too_few_samples_for_the_recipe_batch_says_what_to_do(class_folders, tmp_path):
    pytest.importorskip("nvidia.dali")
    _, shards, _ = class_folders
    cfg = resolve_config(
        tiny("byol", tmp_path),
        {"data": {"synthetic": False, "shards": str(shards), "batch_size": 64, "size": 32}},
    )
    with pytest.raises(ConfigError) as e:
        pretrain(cfg, log=lambda _: None)
    message = str(e.value)
    assert "holds 12 samples, fewer than one global batch of 64" in message
    assert "--batch-size 4" in message and "configs/demo_mos_cpu.yaml" in message


def test_the_printed_next_steps_run_as_printed_without_an_activated_venv(monkeypatch):
    import shutil
    import subprocess

    from train.demo import cli_command, next_steps

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no ssl-cli on PATH
    command = cli_command()
    assert command != "ssl-cli"
    done = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ssl-cli")
    assert f"{command} shards build IMAGES SHARDS" in next_steps("runs/demo")


@pytest.mark.parametrize(
    "args",
    [
        ["pretrain", "--method", "mos", "--print-config", "--set", "optim.base_lr=fast"],
        ["pretrain", "--method", "dino", "--print-config", "--set", "loss.nope=1"],
        ["bench", "quality", "--train", "x", "--val", "y", "--methods", "simclr"],
    ],
)
def test_config_errors_are_usage_errors_everywhere(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output
