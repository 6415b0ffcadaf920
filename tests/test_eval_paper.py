"""``ssl-cli eval linear --protocol paper``: the MoCo v3 / DINO linear probe, the frozen
backbone run on random resized crops + flips decoded again every epoch (CPU, tiny shards)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from pipeline.eval import PROBE_SCALE, EvalLoader, ProbeTrainLoader, ProbeViews
from pipeline.views import RATIO
from tests.conftest import encode
from tests.test_eval_cli import STEPS, common, invoke, tiny_run
from tests.test_eval_loader import _build, labelled_shards
from tests.test_pipeline_shards import _tmpdir
from train.eval.classify import linear_eval
from train.eval.probes import PaperProbeConfig
from train.schedules import cosine_schedule


def _images(loader, epoch=None) -> dict[int, torch.Tensor]:
    """Row -> image of one epoch of a loader."""
    if epoch is not None:
        loader.set_epoch(epoch)
    return {
        int(i): img.clone() for b in loader for i, img in zip(b["index"], b["image"], strict=True)
    }


def test_the_views_are_random_resized_crops_and_flips():
    views = ProbeViews(size=32)
    assert (views.scale, views.ratio, views.flip) == (PROBE_SCALE, RATIO) + (0.5,)
    rng = np.random.default_rng(0)
    windows = np.concatenate(
        [views.plan_sample(200, 150, None, rng, None).windows["image"] for _ in range(2000)]
    )
    y0, x0, y1, x1 = windows.T  # x0 > x1: flipped
    flipped = x0 > x1
    w, h = np.abs(x1 - x0), y1 - y0
    area = w * h / (200 * 150)
    assert 0.45 < flipped.mean() < 0.55
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0 and area.std() > 0.2
    aspect = w / h
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    with pytest.raises(ValueError, match="flip"):
        ProbeViews(flip=1.5)


def test_training_crops_change_every_epoch_and_validation_crops_do_not():
    shards = labelled_shards("train")
    kw = dict(size=32, batch_size=2, num_threads=1)
    with ProbeTrainLoader(shards, **kw) as loader:
        assert (len(loader), loader.num_samples, loader.num_classes) == (5, 10, 4)
        first, second = _images(loader, 0), _images(loader, 1)
        again = _images(loader, 0)
    assert set(first) == set(second) == set(range(10))  # every sample once per epoch
    for row in first:
        assert first[row].shape == (3, 32, 32)
        assert not torch.equal(first[row], second[row])  # another crop of the same sample
        assert torch.equal(first[row], again[row])  # a pure function of (seed, epoch, row)
    with ProbeTrainLoader(shards, seed=1, **kw) as loader:
        other_seed = _images(loader, 0)
    assert not any(torch.equal(first[r], other_seed[r]) for r in first)
    with EvalLoader(shards, **kw) as loader:
        a, b = _images(loader), _images(loader)
        labels = loader.labels
    assert all(torch.equal(a[r], b[r]) for r in a)
    with ProbeTrainLoader(shards, **kw) as loader:
        for batch in loader:
            assert torch.equal(batch["label"], torch.from_numpy(labels[batch["index"].numpy()]))


def test_paper_protocol_end_to_end(tmp_path):
    run = tiny_run()
    args = ("--protocol", "paper", "--epochs", 2, "--probe-batch-size", 4, "--lr", 0.5)
    result = invoke("linear", *common(), *args)
    assert result.exit_code == 0, result.output
    # a line per epoch on stderr, the result on stdout
    epochs = [line for line in result.stderr.splitlines() if "linear probe (paper) epoch" in line]
    assert len(epochs) == 2 and epochs[0].startswith("linear probe (paper) epoch 1/2: loss")
    assert "linear probe (paper, 2 epochs): top-1" in result.stdout
    report = json.loads((run / "eval" / f"linear-target-step-{STEPS:08d}.json").read_text())
    assert report["protocol"] == "paper" and report["branch"] == "target"
    assert report["probe"] == {
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.5,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "seed": 0,
        "scale": [0.08, 1.0],
        "ratio": [0.75, 4 / 3],
        "flip": 0.5,
        "global_batch": 4,
        "peak_lr": 0.5 * 4 / 256,
        "steps": 4,  # 10 samples, full batches of 4: 2 per epoch
        "head": "BatchNorm1d(affine=False) + Linear",
    }
    assert (report["n_train"], report["n_val"], report["num_classes"]) == (10, 5, 4)
    history = report["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert report["top1"] == history[-1]["val_top1"] and report["best_top1"] >= report["top1"]
    assert history[0]["lr"] == pytest.approx(report["probe"]["peak_lr"])
    assert history[1]["lr"] < history[0]["lr"]  # cosine


def test_cosine_schedule_and_config_checks():
    lrs = cosine_schedule(1.0, 0.0, 4)  # the probe's: peak to 0, no warm-up
    assert lrs == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.5 - 0.5**0.5 / 2])
    for bad in ({"epochs": 0}, {"batch_size": 1}, {"lr": 0.0}, {"momentum": 1.5}):
        with pytest.raises(ValueError):
            PaperProbeConfig(**bad)
    with pytest.raises(ValueError, match="unknown protocol 'full'; choose one of fast, paper"):
        linear_eval(tiny_run(), labelled_shards("train"), labelled_shards("val"), protocol="full")
    with pytest.raises(TypeError, match="PaperProbeConfig"):
        linear_eval(
            tiny_run(),
            labelled_shards("train"),
            labelled_shards("val"),
            probe=object(),
            protocol="paper",
        )


@functools.cache
def colour_shards(split: str):
    """Two classes a linear probe separates easily: reddish and bluish noise (64 px)."""
    rng = np.random.default_rng({"train": 0, "val": 1}[split])
    root = _tmpdir(f"ssl-eval-colour-{split}-") / "images"
    count = {"train": 8, "val": 4}[split]
    for label, channel in enumerate(("n00_red", "n01_blue")):
        (root / channel).mkdir(parents=True)
        for i in range(count):
            img = rng.integers(0, 90, (64, 72, 3), dtype=np.uint8)
            img[..., 0 if label == 0 else 2] += 150
            (root / channel / f"{channel}_{i}.JPEG").write_bytes(encode(img, quality=90))
    out = root.parent / "shards"
    _build(root, out, "imagenet")
    return out


def test_the_paper_probe_learns_a_separable_task(tmp_path):
    report = linear_eval(
        tiny_run(),
        colour_shards("train"),
        colour_shards("val"),
        probe=PaperProbeConfig(epochs=6, batch_size=4),  # the default lr, 0.1 per 256
        batch_size=8,
        device="cpu",
        num_threads=1,
        protocol="paper",
        out=tmp_path / "r.json",
    )
    assert (report["n_train"], report["n_val"], report["num_classes"]) == (16, 8, 2)
    history = report["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history  # first epoch: ~ln 2
    assert report["top1"] > 75.0, history  # chance: 50%
