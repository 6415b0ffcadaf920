"""``ssl-cli bench quality``: the plan, the compute budget, and the harness end to end."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from train.methods import forward_equivalents
from train.resolve import resolve_config
from train.tools.quality import QualityPlan


def stripes(root, per_class: int, seed: int) -> None:
    """An easy 4-class task in an ImageNet layout: stripe orientation (vertical, horizontal,
    diagonal, checker) at a random frequency and phase, grey levels of a random contrast.

    Grey, because instance discrimination learns the cue that tells images apart first: with a
    random colour pair per image, MoCo v3's kNN after 100 steps sat at chance (18.75% and 15.6%
    of 64 images, 4 classes, under two weight-decay and warm-up settings), and only the probe's
    noise decided the learning check. Without it the orientation is that cue (kNN 98.4% against
    65.6% at random init, probe 98.4% against 89.1%)."""
    rng = np.random.default_rng(seed)
    side = 40
    y, x = np.mgrid[0:side, 0:side] / side
    for c in range(4):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            f, ph = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
            wave = [
                np.sin(2 * np.pi * f * x + ph),
                np.sin(2 * np.pi * f * y + ph),
                np.sin(2 * np.pi * f * (x + y) / 1.4 + ph),
                np.sin(2 * np.pi * f * x + ph) * np.sin(2 * np.pi * f * y + ph),
            ][c]
            dark, light = rng.uniform(0.0, 0.2), rng.uniform(0.7, 0.9)
            img = np.repeat(np.where(wave > 0, light, dark)[..., None], 3, axis=2)
            img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    out = {}
    for split, n, seed in (("train", 40, 0), ("val", 16, 1)):
        stripes(root / split / "train", n, seed)
        args = ["shards", "build", str(root / split / "train"), str(root / split / "shards")]
        args += ["--layout", "imagenet", "--min-side", "8", "--workers", "1", "--no-progress"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        out[split] = root / split / "shards"
    return out


def test_a_plan_refuses_a_train_set_smaller_than_a_batch(task, tmp_path):
    # 64 images against the CPU recipe's batch of 128: the run would stop on it, so the dry
    # run does too
    args = ["bench", "quality", "--train", str(task["val"]), "--val", str(task["val"])]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2
    assert "holds 64 samples, fewer than one batch of 128" in result.output


def test_forward_equivalents_count_the_papers_passes():
    layer = {"data": {"size": 32, "instance_size": 16, "num_instances": 4}}
    assert forward_equivalents(resolve_config({"method": "mos", **layer})) == 9  # 2*3 + 3
    symmetric = {"method": "mos", "loss": {"form": "symmetric"}, **layer}
    assert forward_equivalents(resolve_config(symmetric)) == 16  # 4*3 + 4
    assert forward_equivalents(resolve_config({"method": "mocov3", **layer})) == 8
    assert forward_equivalents(resolve_config({"method": "byol", **layer})) == 8
    # UniVIP: 2 scenes both branches + K = 4 instances at a quarter of the pixels
    assert forward_equivalents(resolve_config({"method": "univip", **layer})) == 8 + 4


def test_dry_run_states_the_budget_per_method(task, tmp_path):
    args = ["bench", "quality", "--train", str(task["train"]), "--val", str(task["val"])]
    args += ["--out", str(tmp_path / "q"), "--budget-fe", "100000", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "budget: 100000 forward-equivalents per run" in result.output
    # batch 128 in the CPU recipe: 100000 // (9 * 128) = 86 MOS steps, // (8 * 128) = 97
    assert "mos: vit_tiny_patch16_224, batch 128, 9 forward-equivalents per sample, steps 86" in (
        result.output
    )
    assert (
        "mocov3: vit_tiny_patch16_224, batch 128, 8 forward-equivalents per sample, steps 97"
        in (result.output)
    )
    assert "byol: resnet18" in result.output and "univip: resnet18" in result.output
    assert not (tmp_path / "q").exists()  # a dry run writes nothing


def test_dry_run_shows_the_resolved_schedule_and_overrides(task, tmp_path):
    args = ["bench", "quality", "--train", str(task["train"]), "--val", str(task["val"])]
    args += ["--out", str(tmp_path / "q"), "--budget-fe", "100000", "--methods", "mos,mocov3"]
    result = CliRunner().invoke(main, [*args, "--dry-run", "ema.end=0.5", "optim.base_lr=1e-3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    mos = lines[lines.index(next(x for x in lines if x.startswith("  mos:"))) + 1]
    # 86 steps; the ViT warm-up is 12.5% of them, round(0.125 * 86) = 11; evals ceil(86 / 4)
    assert (
        mos.split()
        == (
            "adamw lr 0.001 per 256, weight decay 0.1, warm-up 11 of 86 steps, momentum 0 -> 0.5, "
            "kNN every 22 steps"
        ).split()
    ), mos
    assert "override ema.end=0.5: resolves to mos 0.5, mocov3 0.5" in result.output


def test_cpu_recipe_resolves_the_cited_schedule_values():
    """Fashion-MNIST's 4x runs: 20,000 train samples, batch 128 (156 steps per epoch)."""
    from train.schedules import build_schedules

    plan = QualityPlan(train="t", val="v", bank="b", out="o", methods=("mos",), seeds=(0,))
    plan.train_samples = 20_000
    for method, steps, warmup in (("mos", 520, 65), ("mocov3", 585, 73), ("byol", 585, 58)):
        cfg = plan.config(method, 0, steps)
        lr = build_schedules(cfg, steps_per_epoch=156).lr
        assert int(np.argmax(lr)) == warmup, method  # 12.5% (ViT, appendix D), 10% (ResNet)
        assert cfg.eval.every * 3 < steps <= cfg.eval.every * 4  # 4 evals, the last at the end
    vit, resnet = plan.config("mos", 0, 520).optim, plan.config("byol", 0, 585).optim
    assert (vit.name, vit.weight_decay, vit.weight_decay_end) == ("adamw", 0.1, 0.1)
    assert (resnet.name, resnet.weight_decay, resnet.weight_decay_end) == ("sgd", 1e-4, 1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "mos,simclr"], "unknown method 'simclr'"),
        (["--methods", "mos,mos"], "must not repeat"),
        (["--seeds", "0,x"], "comma-separated list"),
        (["--set", "optim.bogus=1"], "unknown key 'optim.bogus'"),
        # MOS's views take scale_choices, MoCo v3's do not: an error now, not after the
        # references and MOS's runs
        (["--methods", "mos,mocov3", "data.views.scale_choices=[1]"], "mocov3: data.views"),
    ],
)
def test_bad_options_are_usage_errors(task, tmp_path, extra, message):
    args = ["bench", "quality", "--train", str(task["train"]), "--val", str(task["val"])]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--dry-run", *extra])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_harness_end_to_end_resumes_and_learns(task, tmp_path):
    out = tmp_path / "q"
    plan_args = dict(
        train=str(task["train"]),
        val=str(task["val"]),
        out=str(out),
        methods=("mocov3",),
        seeds=(0,),
        budget_fe=8 * 32 * 100,  # 100 steps of batch 32
        device="cpu",
        # no momentum encoder: at 100 steps an EMA from 0.99 leaves the target near its random
        # init (docs/benchmarks.md: MoCo v3 gains 8-9 kNN points from it at a short budget)
        assignments=("data.batch_size=32", "ema.start=0", "ema.end=0"),
    )
    from train.tools.quality import run_quality

    report = run_quality(QualityPlan.build(**plan_args), log=lambda m: None)
    for name in ("report.json", "table.md", "curves.png", "plan.json", "references.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["plan"]["steps"] == {"mocov3": 100}
    row = report["summary"]["methods"]["mocov3"]
    assert row["steps"] == 100 and row["forward_equivalents"] == 8 * 32 * 100
    for key in ("target/knn_top1", "online/knn_top1", "target/linear_top1", "online/linear_top1"):
        assert row[key]["n"] == 1 and row[key]["min"] == row[key]["mean"] == row[key]["max"]
        assert row[key]["std"] == 0.0
    runs = report["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("mocov3", 0)]
    assert all(len(r["knn_curve"]) == 4 and r["knn_curve"][-1]["step"] == 100 for r in runs)
    assert all(r["knn_curve"][-1]["online"] is not None for r in runs)  # both branches logged
    refs = report["summary"]["references"]
    assert refs["raw_pixels"]["knn_top1"] > 50  # the task is easy in pixel space
    # trained features beat the same backbone at random init, on kNN and the linear probe
    # (best branch; measured 98.4 against 65.6 kNN and 98.4 against 89.1 probe)
    for metric, margin in (("knn_top1", 20), ("linear_top1", 5)):
        random_init = refs["random_init/mocov3"][metric]
        best = max(row[f"online/{metric}"]["mean"], row[f"target/{metric}"]["mean"])
        assert best > random_init + margin, (metric, best, random_init)
    curve = runs[0]["knn_curve"]
    assert curve[-1]["online"] > curve[0]["online"] + 20, curve  # kNN rises during the run
    table = (out / "table.md").read_text()
    assert "| mocov3 | vit_tiny_patch16_224 | 100 |" in table and "raw pixels" in table
    assert "One seed (0), no spread" in table and "±" not in table

    # a re-run with the same options trains nothing again; other options are refused
    again = run_quality(QualityPlan.build(**plan_args), log=lambda m: None)
    assert again["runs"] == runs
    with pytest.raises(ValueError, match="other options"):
        QualityPlan.build(**{**plan_args, "budget_fe": 1000})


def test_spread_over_seeds():
    from train.tools.quality import _spread

    assert _spread([60.0, 62.0, 64.0]) == {
        "mean": 62.0,
        "std": 2.0,
        "min": 60.0,
        "max": 64.0,
        "n": 3,
    }


def test_training_seconds_leave_resumed_runs_out():
    """A resumed run's seconds are its last call's only: they do not enter the mean."""
    from train.tools.quality import _seconds_cell, _train_seconds

    runs = [
        {"train_seconds_this_call": 400.0, "start_step": 0},
        {"train_seconds_this_call": 30.0, "start_step": 111},
        {"train_seconds_this_call": 460.0},  # a result written before start_step was recorded
    ]
    spread = _train_seconds(runs)
    assert spread["mean"] == 430.0 and spread["n"] == 2 and spread["resumed"] == 1
    assert _seconds_cell(spread) == "430 (1 resumed, left out)"
    assert _train_seconds(runs[1:2]) is None and _seconds_cell(None) == "— (resumed)"
    assert _seconds_cell(_train_seconds(runs[:1])) == "400"


def test_table_states_the_spread_only_over_several_seeds():
    from train.tools.quality import QualityPlan, _markdown, _spread

    def summary(values):
        cell = _spread(values)
        row = {"backbone": "vit_tiny_patch16_224", "steps": 10, "forward_equivalents": 1e4}
        row["train_seconds"] = _spread([5.0] * len(values))
        row.update(
            {f"{b}/{m}": cell for b in ("target", "online") for m in ("knn_top1", "linear_top1")}
        )
        refs = {"raw_pixels": {"knn_top1": 80.0}}
        return {"methods": {"mos": row}, "references": refs}

    def plan(seeds):
        return QualityPlan(train="t", val="v", out="o", methods=("mos",), seeds=seeds, budget_fe=1)

    three = _markdown(summary([60.0, 62.0, 64.0]), plan((0, 1, 2)))
    assert "| 62.00 ± 2.00 (60.0–64.0) |" in three and "over seeds 0, 1, 2" in three
    one = _markdown(summary([61.3]), plan((2,)))
    assert "| 61.30 |" in one and "±" not in one and "One seed (2), no spread" in one
