"""``ssl-cli preview`` and ``ssl-cli bench pipeline`` through click's runner."""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.pipeline_cmds import bench_pipeline, preview
from pipeline.torchvision_baseline import baseline_loader
from pipeline.views import MOSViews, MultiCropViews, UniVIPViews
from tests.test_pipeline_shards import photo_shards

warnings.filterwarnings("ignore", message=".*external source.*not used.*")


@pytest.mark.parametrize("method,cols", [("mos", 5), ("univip", 7), ("multicrop", 9)])
def test_preview_writes_a_png(tmp_path, method, cols):
    out = tmp_path / "sub" / f"{method}.png"
    result = CliRunner().invoke(
        preview,
        [
            "--data",
            str(photo_shards()),
            "--method",
            method,
            "--out",
            str(out),
            "--samples",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 200 * cols and img.height > 200 * 3


def test_preview_reports_bad_input(tmp_path):
    result = CliRunner().invoke(
        preview, ["--data", str(tmp_path), "--out", str(tmp_path / "p.png")]
    )
    assert result.exit_code != 0 and "manifest.json" in result.output


def test_bench_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        bench_pipeline,
        [
            "--data",
            str(photo_shards()),
            "--method",
            "univip",
            "--batch-size",
            "4",
            "--seconds",
            "0",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--baseline-workers",
            "0",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["images_per_s"]) == {"ours", "torchvision", "decode+crop"}
    assert all(v > 0 for v in report["images_per_s"].values())
    assert report["dataset"]["samples"] == 12 and "speedup_vs_torchvision" in report
    assert "| ours |" in result.output


@pytest.mark.parametrize(
    "views",
    [
        MOSViews(size=32),
        UniVIPViews(size=32, instance_size=16),
        MultiCropViews(global_size=32, local_size=16, num_local=2),
    ],
    ids=["mos", "univip", "multicrop"],
)
def test_torchvision_baseline_produces_the_same_views(views):
    """The yardstick builds the same tensors (shapes, members) from the same batches."""
    batch = next(iter(baseline_loader(photo_shards(), views, batch_size=4, workers=0)))
    if isinstance(views, MOSViews):
        assert batch["single1"].shape == batch["multi2"].shape == (4, 3, 32, 32)
        assert batch["members1"].dtype == torch.int64 and batch["members1"].shape[0] == 4
    elif isinstance(views, UniVIPViews):
        assert batch["scene2"].shape == (4, 3, 32, 32)
        assert batch["instances"].shape == (4, 4, 3, 16, 16)
    else:
        assert [c.shape[-1] for c in batch["crops"]] == [32, 32, 16, 16]
    assert batch["index"].shape == (4,)
