"""``ssl-cli eval knn`` / ``ssl-cli eval linear`` end to end on a tiny checkpoint and tiny
labelled shards (CPU): printed accuracy, the JSON report in the run, the numbers against a
direct computation, and the errors."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from cli.eval_cmds import eval_group
from pipeline.eval import EvalLoader
from tests.test_eval_loader import labelled_shards, unlabelled_shards
from tests.test_pipeline_shards import _tmpdir
from tests.test_train_loop import quiet, tiny
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.eval.classify import report_path
from train.eval.probes import LinearProbeConfig, knn_accuracy, probe_accuracy, train_linear_probe
from train.loop import pretrain
from train.methods import build_model
from train.resolve import resolve_config

warnings.filterwarnings("ignore", message=".*external source.*not used.*")

STEPS = 3


@functools.cache
def tiny_run():
    """A MOS run (ViT-T, 32 px, synthetic data) with a checkpoint at step 3."""
    out = _tmpdir("ssl-eval-run-") / "run"
    cfg = resolve_config(
        tiny("mos", out, schedule={"epochs": 1, "steps": STEPS, "warmup_epochs": 0})
    )
    pretrain(cfg, log=quiet)
    return out


@torch.no_grad()
def reference_features(run, shards, branch="online"):
    """Features the way tests/test_export_plot.py loads a backbone: the whole model from the
    checkpoint, then its backbone in eval mode, on the eval loader's images."""
    ckpt = load_checkpoint(latest_checkpoint(run))
    model, _ = build_model(resolve_config(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    backbone = getattr(model, branch).backbone.eval()
    with EvalLoader(shards, size=32, batch_size=3, num_threads=1) as loader:
        batches = list(loader)
        feats = torch.cat([backbone(b["image"]) for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        return feats, labels, loader.num_classes


def invoke(*args):
    return CliRunner().invoke(eval_group, [str(a) for a in args], catch_exceptions=False)


def common(run=None):
    return [
        run or tiny_run(),
        "--train",
        labelled_shards("train"),
        "--val",
        labelled_shards("val"),
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--num-threads",
        1,
    ]


def test_knn_prints_accuracy_and_writes_the_report():
    # the default branch (auto) is the momentum encoder: the checkpoint has target weights
    run = tiny_run()
    result = invoke("knn", *common(), "--k", 5)
    assert result.exit_code == 0, result.output
    assert "kNN (k=5, T=0.07): top-1" in result.output and "top-5" in result.output
    assert "vit_tiny_patch16_224 target step 3" in result.output
    path = run / "eval" / f"knn-target-step-{STEPS:08d}.json"
    assert f"wrote {path}" in result.output
    report = json.loads(path.read_text())
    assert report["eval"] == "knn" and report["step"] == STEPS and report["branch"] == "target"
    assert report["branch_requested"] == "auto"
    assert (report["n_train"], report["n_val"], report["num_classes"]) == (10, 5, 4)
    assert (report["k"], report["temperature"], report["size"]) == (5, 0.07, 32)
    assert report["feature_dim"] == 192 and report["backbone"] == "vit_tiny_patch16_224"
    assert "git" in report["run"] and "versions" in report["run"]
    # the numbers: DINO's weighted kNN on the checkpoint's target (momentum) backbone
    bank, bank_y, classes = reference_features(run, labelled_shards("train"), "target")
    queries, query_y, _ = reference_features(run, labelled_shards("val"), "target")
    acc = knn_accuracy(bank, bank_y, queries, query_y, max(classes, 4), k=5, temperature=0.07)
    assert report["top1"] == pytest.approx(acc.top1) and report["top5"] == pytest.approx(acc.top5)
    assert f"top-1 {acc.top1:.2f}%" in result.output


def test_knn_of_the_online_branch_and_an_explicit_report_path(tmp_path):
    run = tiny_run()
    ckpt = latest_checkpoint(run)
    out = tmp_path / "r.json"
    result = invoke("knn", *common(ckpt), "--branch", "online", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["branch"] == "online" and report["checkpoint"] == str(ckpt)
    assert report["branch_requested"] == "online"
    bank, bank_y, _ = reference_features(run, labelled_shards("train"), "online")
    queries, query_y, _ = reference_features(run, labelled_shards("val"), "online")
    acc = knn_accuracy(bank, bank_y, queries, query_y, 4)
    assert report["top1"] == pytest.approx(acc.top1) and report["top5"] == pytest.approx(acc.top5)
    # the report paths of every resolved branch
    assert report_path(ckpt, "knn", 3) == run / "eval" / "knn-step-00000003.json"
    assert report_path(ckpt, "knn", 3, "target") == run / "eval" / "knn-target-step-00000003.json"
    assert report_path(ckpt, "linear", 3, "both") == run / "eval" / "linear-both-step-00000003.json"
    with pytest.raises(ValueError, match="resolved branch"):
        report_path(ckpt, "knn", 3, "auto")


def test_linear_probe_prints_accuracy_and_writes_the_report():
    run = tiny_run()
    result = invoke(
        "linear", *common(), "--epochs", 5, "--probe-batch-size", 4, "--lr", 0.5, "--seed", 1
    )
    assert result.exit_code == 0, result.output
    assert "linear probe (fast, 5 epochs): top-1" in result.output
    report = json.loads((run / "eval" / f"linear-target-step-{STEPS:08d}.json").read_text())
    assert report["eval"] == "linear" and report["n_val"] == 5
    assert report["protocol"] == "fast" and report["branch"] == "target"
    assert report["probe"] == {
        "epochs": 5,
        "batch_size": 4,
        "lr": 0.5,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "seed": 1,
    }
    bank, bank_y, _ = reference_features(run, labelled_shards("train"), "target")
    queries, query_y, _ = reference_features(run, labelled_shards("val"), "target")
    probe = train_linear_probe(
        bank, bank_y, 4, LinearProbeConfig(epochs=5, batch_size=4, lr=0.5, seed=1)
    )
    acc = probe_accuracy(probe, queries, query_y)
    assert report["top1"] == pytest.approx(acc.top1) and report["top5"] == pytest.approx(acc.top5)
    assert 0 <= report["train_top1"] <= 100


def test_unlabelled_shards_fail_with_the_folder_named():
    args = common()
    args[args.index("--val") + 1] = unlabelled_shards()
    result = invoke("knn", *args)
    assert result.exit_code == 1
    assert f"{unlabelled_shards()}: 2 of 2 samples have no label" in result.output


def test_usage_errors(tmp_path):
    result = invoke("knn", tiny_run(), "--train", labelled_shards("train"))
    assert result.exit_code == 2 and "--val" in result.output
    (tmp_path / "empty").mkdir()
    args = common(tmp_path / "empty")
    result = invoke("knn", *args)
    assert result.exit_code == 2 and "no checkpoint" in result.output
    if not torch.cuda.is_available():
        args = common()
        args[args.index("--device") + 1] = "cuda"
        result = invoke("knn", *args)
        assert result.exit_code == 2 and "no CUDA GPU" in result.output
        result = invoke("linear", *common(), "--precision", "bf16")
        assert result.exit_code == 2 and "bf16 autocast needs a CUDA GPU" in result.output
    # probe options: checked by click before any work
    result = invoke("linear", *common(), "--epochs", 0)
    assert result.exit_code == 2 and "Invalid value for '--epochs'" in result.output
    result = invoke("linear", *common(), "--protocol", "papers")
    assert result.exit_code == 2 and "Invalid value for '--protocol'" in result.output
    assert "'fast', 'paper'" in result.output
    result = invoke("linear", *common(), "--protocol", "paper", "--probe-batch-size", 1)
    assert result.exit_code == 2 and "--probe-batch-size" in result.output
    result = invoke("knn", *common(), "--branch", "ema")
    assert result.exit_code == 2 and "Invalid value for '--branch'" in result.output


@pytest.mark.gpu
def test_knn_on_the_gpu_matches_the_cpu(tmp_path):
    cpu = invoke("knn", *common(), "--json", tmp_path / "cpu.json")
    args = common()
    args[args.index("--device") + 1] = "cuda"
    gpu = invoke("knn", *args, "--json", tmp_path / "gpu.json")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    a = json.loads((tmp_path / "cpu.json").read_text())
    b = json.loads((tmp_path / "gpu.json").read_text())
    assert b["run"]["device"] != a["run"]["device"]
    # nvJPEG vs libjpeg and TF32 may flip a borderline neighbour on 5 queries, not more
    assert abs(a["top1"] - b["top1"]) <= 20.0 and b["n_val"] == a["n_val"] == 5


# ------------------------------------------------------------------- one shard set, split


def test_val_fraction_scores_a_share_of_train_that_the_bank_does_not_hold(tmp_path):
    from train.eval.features import Features, split_features

    feats = Features(torch.arange(20.0)[:, None], torch.arange(20) % 3, 3, "x")
    bank, queries = split_features(feats, 0.25)
    assert (len(bank), len(queries)) == (15, 5)
    assert not set(bank.features[:, 0].tolist()) & set(queries.features[:, 0].tolist())
    again, _ = split_features(feats, 0.25)
    assert torch.equal(again.features, bank.features)  # the same split every time
    train = labelled_shards("train")
    args = [tiny_run(), "--train", train, "--val-fraction", 0.5, "--batch-size", 4,
            "--device", "cpu", "--json", tmp_path / "knn.json", "--k", 2]  # fmt: skip
    result = invoke("knn", *args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "knn.json").read_text())
    n = report["n_train"] + report["n_val"]
    assert report["val_fraction"] == 0.5 and report["n_val"] == round(0.5 * n)


def test_the_same_shards_for_train_and_val_warn(tmp_path):
    train = labelled_shards("train")
    result = CliRunner().invoke(
        eval_group,
        [
            str(a)
            for a in (
                "knn",
                tiny_run(),
                "--train",
                train,
                "--val",
                train,
                "--batch-size",
                4,
                "--device",
                "cpu",
                "--json",
                tmp_path / "k.json",
            )
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "warning: --train and --val are the same shards" in result.stderr
    assert "--val-fraction 0.1" in result.stderr


def test_no_val_and_a_folder_of_runs_are_clear_errors(tmp_path):
    train = labelled_shards("train")
    result = CliRunner().invoke(eval_group, ["knn", str(tiny_run()), "--train", str(train)])
    assert result.exit_code == 2 and "--val-fraction F to split --train" in result.output
    runs = tiny_run().parent  # the folder that holds the run
    result = CliRunner().invoke(
        eval_group, ["knn", str(runs), "--train", str(train), "--val", str(train)]
    )
    assert result.exit_code != 0
    assert f"is a folder of 1 run(s), not a run: pass one of {runs / 'run'}" in result.output
