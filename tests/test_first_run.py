"""A first run on the user's own data: what the tool says before it trains, while it starts,
and when the data do not fit the recipe."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.main import main as cli
from tests.conftest import encode, photo
from tests.test_train_loop import tiny
from train import loop as loop_mod
from train.config import ConfigError
from train.distributed import init_distributed
from train.loop import build_parts, pretrain, schedule_warnings
from train.resolve import resolve_config


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
    monkeypatch.setattr(loop_mod, "_SLOW_CPU_RUN_S", 0.0)
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
    assert "holds 12 samples, which do not fill one global batch of 64" in message
    assert "--batch-size 4" in message and "configs/demo_mos_cpu.yaml" in message


def test_the_printed_next_steps_run_as_printed_without_an_activated_venv(monkeypatch):
    import shutil
    import subprocess

    from train.tools.demo import cli_command, next_steps

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


# ----------------------------------------------------------------- checkpoints at scale


def test_keep_last_and_keep_every(tmp_path):
    from train.checkpoint import list_checkpoints, save_checkpoint

    for step in range(1, 11):
        save_checkpoint({"format": 1, "w": torch.zeros(4)}, tmp_path, step, keep_last=2,
                        keep_every=4)  # fmt: skip
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000004.pt", "step-00000008.pt", "step-00000009.pt",
                     "step-00000010.pt"]  # fmt: skip


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import collections
    import shutil

    from train import checkpoint as ckpt_mod

    save_checkpoint = ckpt_mod.save_checkpoint
    save_checkpoint({"format": 1, "w": torch.zeros(4)}, tmp_path, 1, keep_last=3)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    big = {"format": 1, "w": torch.zeros(8 * 2**20)}  # 32 MiB
    with pytest.raises(ckpt_mod.CheckpointWriteError) as e:
        save_checkpoint(big, tmp_path, 2, keep_last=3)
    assert "not enough space on" in str(e.value) and "newest kept: step-00000001.pt" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]


def test_an_empty_checkpoint_file_says_so(tmp_path):
    from train.checkpoint import load_checkpoint

    (tmp_path / "step-00000001.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        load_checkpoint(tmp_path / "step-00000001.pt")


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    from train.config import load_yaml

    lines = ["method: mos", "model:", "  backbone_kwargs:", "    a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"    {name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_yaml(tmp_path / "bomb.yaml")


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.img_size=0", "model.img_size: must be >= 1"),
        ("data.views.grid_choices=[]", "grid_choices must be positive ints"),
        ("data.size=7", "must be divisible by lcm"),
        (
            "model.backbone_kwargs.depth=-1",
            "model: vit_small_patch16_224 (depth=-1) cannot be built",
        ),
    ],
)
def test_print_config_refuses_what_pretrain_refuses(assignment, message):
    result = CliRunner().invoke(
        cli, ["pretrain", "--method", "mos", "--print-config", "--set", assignment]
    )
    assert result.exit_code == 2 and message in result.output


def test_disjoint_labels_warn_and_reports_on_other_data_do_not_overwrite(tmp_path):
    import json

    from train.eval.classify import _free_report_path, _label_warning
    from train.eval.features import Features

    def feats(labels):
        return Features(torch.zeros(len(labels), 2), torch.tensor(labels), 4, "x")

    assert _label_warning(feats([0, 1, 2]), feats([1, 2])) is None
    assert "share no label" in _label_warning(feats([0, 1]), feats([2, 3]))
    assert "1 of 2 queries have a label" in _label_warning(feats([0, 1]), feats([1, 3]))
    path = tmp_path / "knn-target-step-00000003.json"
    path.write_text(json.dumps({"train": "a", "val": "b", "val_fraction": None}))
    same = {"train": "a", "val": "b", "val_fraction": None}
    assert _free_report_path(path, same) == path  # the same data: replaced
    other = _free_report_path(path, {"train": "a", "val": "data/c", "val_fraction": None})
    assert other.name.startswith("knn-target-step-00000003-on-c-") and other != path


def test_idx_files_without_images_say_so(tmp_path):
    from tests.test_scenes import _idx

    src = tmp_path / "idx"
    src.mkdir()
    for split in ("train", "t10k"):
        (src / f"{split}-images-idx3-ubyte").write_bytes(_idx(np.zeros((0, 28, 28))))
        (src / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.zeros((0,))))
    result = CliRunner().invoke(cli, ["shards", "build", str(src), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "hold no images (0 records)" in result.output


def test_a_resume_after_a_non_finite_stop_checks_the_checkpoint_and_steps_back(tmp_path):
    import json

    from train.checkpoint import list_checkpoints, load_checkpoint
    from train.loop import NonFiniteLossError

    layer = tiny("byol", tmp_path, schedule={"epochs": 1, "steps": 5, "warmup_epochs": 0})
    keep = {"run": {"ckpt_every": 1, "keep_last": 5}}
    pretrain(resolve_config(layer, keep), log=lambda _: None)
    # step 5's weights as a diverging lr leaves them: finite, but far beyond a trained network's
    newest = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(newest)
    key = next(
        k for k in state["model"] if k.startswith("online.backbone.") and k.endswith("weight")
    )
    state["model"][key] = state["model"][key] * 1e12
    torch.save(state, newest)
    (tmp_path / "non-finite.json").write_text(json.dumps({"step": 6, "optim.base_lr": 0.032}))
    lines = []
    lower = resolve_config(layer, keep, {"optim": {"base_lr": 0.016}})
    result = pretrain(lower, log=lines.append)
    text = "\n".join(lines)
    assert (
        f"step-00000005.pt cannot be resumed after the non-finite stop: {key} has a weight" in text
    )
    assert "checked step-00000004.pt after the non-finite stop" in text
    assert [m["step"] for m in result["metrics"]] == [5]  # resumed after step 4
    # nothing passes: a clear stop, not a resume from a bad file
    for path in list_checkpoints(tmp_path):
        bad = load_checkpoint(path)
        bad["model"][key] = torch.full_like(bad["model"][key], float("nan"))
        torch.save(bad, path)
    with pytest.raises(NonFiniteLossError, match="no kept checkpoint .* passes the check"):
        pretrain(lower, log=lambda _: None)


def test_build_workers_end_when_the_build_is_killed(tmp_path):
    """``kill -9`` of ``shards build``: its spawn workers (and so the resource tracker) end
    with it, instead of searching on for nobody."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path as P

    from tests.test_elastic import _children

    src = tmp_path / "images"
    src.mkdir()
    for i in range(60):  # enough work to be killed in the middle of
        Image.fromarray(photo("astronaut", (400, 300))).save(src / f"a{i:03d}.jpg")
    cli_path = str(P(sys.executable).parent / "ssl-cli")
    build = subprocess.Popen([cli_path, "shards", "build", str(src), str(tmp_path / "out"),
                              "--workers", "2", "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _children(build.pid)
        time.sleep(0.2)
    assert len(workers) >= 2, "the build started no workers"
    time.sleep(1.0)  # the workers are searching
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in workers if P(f"/proc/{w}").exists()
                 and "Z" not in (P(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[:1])]  # fmt: skip
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived the killed build"
