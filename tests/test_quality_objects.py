"""``ssl-cli bench quality`` on scenes: object probes beside the kNN, and what the plan refuses."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from tests.test_quality import stripes
from train.config import ConfigError
from train.tools.quality import QualityPlan, run_quality

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30)]


def _build(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Labelled stripes (kNN bank / val) and scenes of solid-colour items with ground truth."""
    root = tmp_path_factory.mktemp("qobj")
    out = {}
    for split, n, seed in (("train", 12, 0), ("val", 6, 1)):
        stripes(root / split / "train", n, seed)
        out[split] = root / split / "shards"
        _build(["shards", "build", str(root / split / "train"), str(out[split]), "--layout",
                "imagenet", "--min-side", "8", "--workers", "1", "--no-progress"])  # fmt: skip
    items = root / "items"
    for part in ("train", "test"):
        for c, colour in enumerate(COLOURS):
            folder = items / part / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), colour).save(folder / f"{i}.png")
    for split, count in (("train", 24), ("test", 12)):
        scenes = root / f"scenes_{split}"
        _build(["data", "scenes", str(items), str(scenes), "--layout", "folder", "--split", split,
                "--count", str(count), "--size", "48:48", "--objects", "2:3",
                "--plain-share", "1", "--gradient-share", "0"])  # fmt: skip
        out[f"scenes_{split}"] = root / f"scenes_{split}_shards"
        _build(["shards", "build", str(scenes / "images"), str(out[f"scenes_{split}"]),
                "--annotations", str(scenes / "instances.json"), "--min-side", "8",
                "--workers", "1", "--no-progress"])  # fmt: skip
    return out


def _plan(shards, tmp_path, **extra):
    args = dict(
        train=str(shards["scenes_train"]),
        bank=str(shards["train"]),
        val=str(shards["val"]),
        objects_train=str(shards["scenes_train"]),
        objects_val=str(shards["scenes_test"]),
        out=str(tmp_path / "q"),
        methods=("mocov3",),
        seeds=(0,),
        budget_fe=8 * 16 * 4,  # 4 steps of batch 16
        device="cpu",
        assignments=("data.batch_size=16",),
    )
    args.update(extra)
    return QualityPlan.build(**args)


@pytest.mark.slow
def test_scenes_table_has_object_probes_per_branch_and_reference(shards, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a loaded machine
    try:
        report = run_quality(_plan(shards, tmp_path), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    run = report["runs"][0]
    for branch in ("target", "online"):
        obj = run["branches"][branch]["objects"]
        assert 0 <= obj["object_knn_top1"] <= 100 and 0 <= obj["image_map"] <= 100
    refs = report["summary"]["references"]
    # solid colours: raw pixels of each box tell the four classes apart (chance 25%; an object
    # partly hidden by another keeps the other's pixels inside its visible box)
    assert refs["raw_pixels_objects"]["object_knn_top1"] >= 90.0
    assert "object_knn_top1" in refs["random_init/mocov3"]["objects"]
    row = report["summary"]["methods"]["mocov3"]
    assert row["target/objects/image_map"]["n"] == 1
    table = (tmp_path / "q" / "table.md").read_text()
    assert "| mocov3 | " in table.split("Objects")[1]
    assert "| raw pixels | " in table.split("Objects")[1]
    plan = json.loads((tmp_path / "q" / "plan.json").read_text())
    assert plan["identity"]["objects_val"] == str(shards["scenes_test"])


def test_plan_refuses_unlabelled_kNN_sets_and_objects_without_truth(shards, tmp_path):
    with pytest.raises(ConfigError, match="--bank: .* holds no class labels"):
        _plan(shards, tmp_path, bank=None)  # the bank defaults to the unlabelled scenes
    with pytest.raises(ConfigError, match="--objects-val: .* has no ground truth"):
        _plan(shards, tmp_path, objects_val=str(shards["val"]))
    with pytest.raises(ConfigError, match="go together"):
        _plan(shards, tmp_path, objects_val=None)


def test_dry_run_names_the_object_sets(shards, tmp_path):
    args = ["bench", "quality", "--train", str(shards["scenes_train"]), "--bank",
            str(shards["train"]), "--val", str(shards["val"]), "--objects-train",
            str(shards["scenes_train"]), "--objects-val", str(shards["scenes_test"]),
            "--objects-size", "64", "--out", str(tmp_path / "q"), "--methods", "byol",
            "--seeds", "0", "--budget-fe", "1000", "--dry-run", "data.batch_size=8"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"scored on {shards['scenes_test']}, input 64 px" in result.output
