"""``--branch``: ``auto`` resolves to the momentum (target) encoder when the checkpoint has one
(every ssl-cli method), ``online`` / ``target`` stay selectable, ``both`` reports each."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.test_eval_cli import STEPS, common, invoke, reference_features, tiny_run
from tests.test_eval_loader import labelled_shards
from train.checkpoint import backbone_state_dict, latest_checkpoint, load_checkpoint
from train.eval.classify import knn_eval
from train.eval.features import load_backbone, load_backbones, resolve_branches
from train.eval.probes import knn_accuracy

warnings.filterwarnings("ignore", message=".*external source.*not used.*")


def _online_only(tmp_path):
    """The tiny run's checkpoint without its target tensors (as a method without a momentum
    encoder would save it), outside a run directory."""
    ckpt = load_checkpoint(latest_checkpoint(tiny_run()))
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("target.")}
    path = tmp_path / f"step-{STEPS:08d}.pt"
    torch.save(ckpt, path)
    return path


def test_auto_is_the_target_when_the_checkpoint_has_one_else_the_online(tmp_path):
    ckpt = load_checkpoint(latest_checkpoint(tiny_run()))
    assert resolve_branches(ckpt, "auto") == ["target"]
    assert resolve_branches(ckpt, "both") == ["online", "target"]
    assert resolve_branches(ckpt, "online") == ["online"]
    backbone, info = load_backbone(tiny_run())  # default: auto
    assert info["branch"] == "target" and info["branch_requested"] == "auto"
    target = backbone_state_dict(ckpt, "target")
    assert all(torch.equal(v, target[k]) for k, v in backbone.state_dict().items())
    with pytest.raises(ValueError, match="unknown branch 'ema'"):
        resolve_branches(ckpt, "ema")
    with pytest.raises(ValueError, match="load_backbones"):
        load_backbone(tiny_run(), "both")

    online_only = _online_only(tmp_path)
    stripped = load_checkpoint(online_only)
    assert resolve_branches(stripped, "auto") == ["online"]
    for branch in ("target", "both"):
        with pytest.raises(ValueError, match="no target backbone weights"):
            resolve_branches(stripped, branch)
    report = knn_eval(
        online_only,
        labelled_shards("train"),
        labelled_shards("val"),
        k=5,
        batch_size=4,
        device="cpu",
        num_threads=1,
    )
    assert report["branch"] == "online" and report["branch_requested"] == "auto"
    assert report["path"] == str(tmp_path / "eval" / f"knn-step-{STEPS:08d}.json")


def test_both_reports_each_branch(tmp_path):
    run = tiny_run()
    out = tmp_path / "both.json"
    result = invoke("knn", *common(), "--k", 5, "--branch", "both", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["branch"] == "both" and report["branch_requested"] == "both"
    assert list(report["branches"]) == ["online", "target"]
    assert "top1" not in report and (report["k"], report["n_val"]) == (5, 5)
    # the printed table: one row per branch
    lines = result.output.splitlines()
    assert lines[1].split() == ["branch", "top-1", "top-5"]
    feats = {}
    for i, name in enumerate(("online", "target")):
        bank, bank_y, _ = reference_features(run, labelled_shards("train"), name)
        queries, query_y, _ = reference_features(run, labelled_shards("val"), name)
        acc = knn_accuracy(bank, bank_y, queries, query_y, 4, k=5)
        got = report["branches"][name]
        assert got["top1"] == pytest.approx(acc.top1) and got["top5"] == pytest.approx(acc.top5)
        assert lines[2 + i].split() == [name, f"{acc.top1:.2f}%", f"{acc.top5:.2f}%"]
        feats[name] = queries
    # three steps apart from the initial copy: the two encoders give other features
    assert not torch.allclose(feats["online"], feats["target"], atol=1e-3)


def test_both_branches_of_the_linear_probe_differ(tmp_path):
    out = tmp_path / "both.json"
    args = ("--epochs", 5, "--probe-batch-size", 4, "--branch", "both", "--json", out)
    result = invoke("linear", *common(), *args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    online, target = report["branches"]["online"], report["branches"]["target"]
    assert report["protocol"] == "fast" and report["probe"]["epochs"] == 5
    assert set(online) == {"top1", "top5", "train_top1", "val_loss", "elapsed_s"}
    # the same probe (seed, order) on the features of two encoders
    assert online["val_loss"] != pytest.approx(target["val_loss"], rel=1e-4)
    backbones, info = load_backbones(tiny_run(), "both")
    assert list(backbones) == info["branches"] == ["online", "target"]
