"""``ssl-cli pretrain`` and ``ssl-cli bench train`` through click's CliRunner."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from cli.train_cmds import bench_train, pretrain
from tests.test_train_loop import tiny


def write_config(tmp_path, method="mos", **sections):
    layer = tiny(method, tmp_path / "run", **sections)
    del layer["run"]["out"]
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(layer))
    return path


def test_pretrain_runs_then_resumes_from_its_run_directory(tmp_path):
    config = write_config(tmp_path, "mos")
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["--config", str(config), "--out", str(run), "--steps", "3", "--ckpt-every", "2"]
    result = runner.invoke(pretrain, args)
    assert result.exit_code == 0, result.output
    assert "step 3/3" in result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["schedule"]["steps"] == 3 and saved["method"] == "mos"
    # the same command again: auto-resume from the newest checkpoint, nothing left to do
    again = runner.invoke(pretrain, args)
    assert again.exit_code == 0, again.output
    assert "already trained to step 3" in again.output
    # only --out: the checkpoint's config is the base
    bare = runner.invoke(pretrain, ["--out", str(run)])
    assert bare.exit_code == 0, bare.output
    # a flag that changes what is computed is refused
    changed = runner.invoke(pretrain, ["--out", str(run), "--batch-size", "16"])
    assert changed.exit_code == 2 and "data.batch_size: checkpoint 8, now 16" in changed.output


def test_flags_override_the_file_and_set_overrides_flags(tmp_path):
    config = write_config(tmp_path, "univip")
    result = CliRunner().invoke(
        pretrain,
        [
            "--config",
            str(config),
            "--base-lr",
            "0.5",
            "--set",
            "optim.base_lr=0.25",
            "--set",
            "loss.sinkhorn_iters=5",
            "--print-config",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["method"] == "univip" and cfg["optim"]["base_lr"] == 0.25
    assert cfg["loss"]["sinkhorn_iters"] == 5 and cfg["data"]["size"] == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.bogus=1"], "unknown key 'optim.bogus'"),
        (["--set", "data.batch_size=many"], "data.batch_size: expected int"),
        (["--method", "simclr"], "unknown method 'simclr'; choose one of: byol, dino, mocov3, mos"),
        ([], "no run directory: pass --out RUN"),
    ],
)
def test_usage_errors(args, message):
    result = CliRunner().invoke(pretrain, ["--synthetic", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_unknown_key_in_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: mos\nmodel:\n  backbone: resnet18\n  heads: 3\n")
    result = CliRunner().invoke(pretrain, ["--config", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown key 'model.heads'" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's errors")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--precision", "bf16"], "needs a CUDA GPU"),
        (["--set", "run.precision=fp16"], "needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_on_a_cpu_machine_are_clear_errors(args, message, tmp_path):
    result = CliRunner().invoke(pretrain, ["--synthetic", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "r").exists()  # refused before any work


def test_missing_shards_and_missing_loader_are_clear_errors(tmp_path):
    result = CliRunner().invoke(
        pretrain, ["--out", str(tmp_path / "r"), "--data", str(tmp_path / "none")]
    )
    assert result.exit_code == 2 and "is not a directory" in result.output


def test_nan_loss_is_a_clear_error(tmp_path):
    # a learning rate this large overflows the tiny model within a few steps
    config = write_config(tmp_path, "byol")
    result = CliRunner().invoke(
        pretrain,
        [
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--base-lr",
            "1e30",
            "--set",
            "optim.name=sgd",
            "--set",
            "schedule.warmup_epochs=0",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "non-finite loss at step" in result.output


def test_bench_train_synthetic_only(tmp_path):
    config = write_config(tmp_path, "mos")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        bench_train,
        [
            "--config",
            str(config),
            "--synthetic-only",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["synthetic"]["images_per_s"] > 0 and report["global_batch"] == 8
    assert "device" in report and "versions" in report
    assert "images/s" in result.output


def test_bench_train_end_to_end_on_a_stand_in_loader(tmp_path):
    # data.synthetic feeds the "end to end" phase from batches made per step on the CPU
    config = write_config(tmp_path, "univip")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        bench_train, ["--config", str(config), "--steps", "2", "--warmup", "0", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["end_to_end"]["steps"] == 2 and report["ratio"] > 0
    assert "of the synthetic ceiling" in result.output
