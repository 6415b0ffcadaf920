"""The periodic kNN of pretraining (``--eval-every``): lines in metrics.jsonl and TensorBoard,
training untouched by it, exact resume, DDP gathering, config checks."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from click.testing import CliRunner

from cli.train_cmds import pretrain as pretrain_cmd
from pipeline.eval import EvalLoader
from tests.test_eval_cli import tiny_run
from tests.test_eval_loader import labelled_shards, unlabelled_shards
from tests.test_train_loop import Crash, _free_port, loader_for, quiet, tiny
from train.checkpoint import list_checkpoints, load_checkpoint
from train.config import ConfigError, to_dict
from train.eval.features import extract_features, load_backbone
from train.loop import pretrain
from train.resolve import resolve_config
from train.resume import check_resume_config

warnings.filterwarnings("ignore", message=".*external source.*not used.*")


def eval_section(every=2, **more) -> dict:
    return {
        "every": every,
        "train": str(labelled_shards("train")),
        "val": str(labelled_shards("val")),
        "batch_size": 4,
        **more,
    }


def records(run_dir) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of metrics.jsonl."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/knn_top1" in r]


def test_pretrain_cli_logs_knn_lines(tmp_path):
    layer = tiny("byol", tmp_path / "run", schedule={"epochs": 1, "steps": 5, "warmup_epochs": 0})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(layer))
    result = CliRunner().invoke(
        pretrain_cmd,
        [
            "--config",
            str(config),
            "--eval-every",
            "2",
            "--eval-train",
            str(labelled_shards("train")),
            "--eval-val",
            str(labelled_shards("val")),
            "--set",
            "eval.batch_size=4",
            "--set",
            "run.tensorboard=true",
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    # "kNN top-1 ..." or, naming the evaluated branch, "kNN (target) top-1 ..."
    assert re.search(r"step 2/5 kNN (\((online|target)\) )?top-1", result.output), result.output
    train, evals = records(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and at the end
    for r in evals:
        assert set(r) == {"step", "eval/knn_top1", "eval/knn_top5"}
        assert 0 <= r["eval/knn_top1"] <= r["eval/knn_top5"] <= 100
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["eval"]["every"] == 2 and saved["eval"]["k"] == 20
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/knn_top1")] == [2, 4, 5]
    assert "eval/knn_top5" in tags and "train/loss" in tags


def test_the_knn_line_is_the_knn_of_the_checkpoint(tmp_path):
    """The logged accuracy is the kNN of the backbone saved at that step."""
    cfg = resolve_config(
        tiny("mos", tmp_path, schedule={"epochs": 1, "steps": 2, "warmup_epochs": 0}),
        {"eval": eval_section(every=2, k=3)},
    )
    result = pretrain(cfg, log=quiet)
    assert [r["step"] for r in result["eval"]] == [2]
    backbone, _ = load_backbone(tmp_path, branch=cfg.eval.branch)
    feats = []
    for split in ("train", "val"):
        with EvalLoader(labelled_shards(split), size=32, batch_size=3, num_threads=1) as loader:
            feats.append(extract_features(backbone, loader))
    from train.eval.probes import knn_accuracy

    bank, queries = feats
    acc = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, 4, k=3)
    assert result["eval"][0]["eval/knn_top1"] == pytest.approx(acc.top1)
    assert result["eval"][0]["eval/knn_top5"] == pytest.approx(acc.top5)


def test_evaluation_changes_nothing_in_training_and_resumes_exactly(tmp_path):
    # drop path draws from torch's generator: evaluation must leave its stream untouched;
    # the crash falls after the eval line of step 4, which the resume from step 3 recomputes
    extra = {"model": {"drop_path_rate": 0.1}, "run": {"ckpt_every": 3}}
    plain = resolve_config(tiny("mos", tmp_path / "plain", **extra))
    pretrain(plain, log=quiet)
    whole = resolve_config(tiny("mos", tmp_path / "whole", **extra), {"eval": eval_section()})
    pretrain(whole, log=quiet)
    cut = resolve_config(tiny("mos", tmp_path / "cut", **extra), {"eval": eval_section()})
    with pytest.raises(Crash):
        pretrain(cut, loader=loader_for(cut, limit=5), log=quiet)
    assert [r["step"] for r in records(tmp_path / "cut")[1]] == [2, 4]
    pretrain(cut, log=quiet)

    (p, _), (a, ea), (b, eb) = (records(tmp_path / d) for d in ("plain", "whole", "cut"))
    losses = [[r["loss"] for r in x] for x in (p, a, b)]
    assert len(losses[0]) == 8
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=0)  # eval changes nothing
    np.testing.assert_allclose(losses[2], losses[1], rtol=0, atol=1e-6)  # resume is exact
    assert [r["step"] for r in eb] == [2, 4, 6, 8] and eb == ea
    sa = load_checkpoint(list_checkpoints(tmp_path / "plain")[-1])
    sb = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    for key, value in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], value, rtol=0, atol=0)


def test_eval_keys_may_change_on_resume_and_are_checked():
    base = resolve_config(tiny("byol", "/tmp/x"))
    check_resume_config(
        resolve_config(tiny("byol", "/tmp/x"), {"eval": eval_section(k=5)}), to_dict(base)
    )
    with pytest.raises(ConfigError, match="eval.every=3 needs labelled shards"):
        resolve_config(tiny("byol", "/tmp/x"), {"eval": {"every": 3}})
    with pytest.raises(ConfigError, match="eval.branch"):
        resolve_config(tiny("byol", "/tmp/x"), {"eval": eval_section(branch="ema")})


def test_unlabelled_eval_shards_fail_before_training(tmp_path):
    cfg = resolve_config(
        tiny("byol", tmp_path), {"eval": {**eval_section(), "val": str(unlabelled_shards())}}
    )
    with pytest.raises(ValueError, match=f"{unlabelled_shards()}: 2 of 2 samples have no label"):
        pretrain(cfg, log=quiet)
    assert not list_checkpoints(tmp_path) and not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------ DDP


def _ddp_features_worker(rank: int, world: int, port: int, out: str, run: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    backbone, _ = load_backbone(run)
    with EvalLoader(
        labelled_shards("train"), size=32, batch_size=2, rank=rank, world_size=world, num_threads=1
    ) as loader:
        feats = extract_features(backbone, loader)
    torch.save({"features": feats.features, "labels": feats.labels}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_gather_every_feature_in_row_order(tmp_path):
    run = tiny_run()
    world = 2
    mp.spawn(
        _ddp_features_worker,
        args=(world, _free_port(), str(tmp_path), str(run)),
        nprocs=world,
        join=True,
    )
    backbone, _ = load_backbone(run)
    with EvalLoader(labelled_shards("train"), size=32, batch_size=4, num_threads=1) as loader:
        alone = extract_features(backbone, loader)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["labels"], alone.labels)
        torch.testing.assert_close(got["features"], alone.features, rtol=1e-4, atol=1e-5)
