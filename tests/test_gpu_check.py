"""``make gpu-check``: its dry run runs every step of the GPU script on the CPU, on the same
data with the same batch sizes, and fails when a step would fail on the GPU."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline_shards import photo_shards

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)
STEPS = ("data", "pytest-gpu", "pipeline-mos", "pipeline-univip", "train-mos", "train-mos-e2e",
         "train-univip", "quality-data", "quality")  # fmt: skip


def _idx(array: np.ndarray) -> bytes:
    """uint8 ``array`` in the IDX format: magic 0x0000 0x08 ndim, big-endian dims, data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def _small_fashion_mnist(root: Path, n_train: int = 520, n_test: int = 32) -> Path:
    """Fashion-MNIST's four IDX files, 28x28: a bright rectangle per item on black, 10 classes;
    ``n_train`` above the GPU recipe's batch of 512, which a quality plan checks."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        for image in images:
            y, x = rng.integers(2, 10, size=2)
            image[y : y + rng.integers(10, 17), x : x + rng.integers(10, 17)] = rng.integers(
                120, 255
            )
        (root / f"{split}-images-idx3-ubyte").write_bytes(_idx(images))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    return root


def _gpu_check(out: Path, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "GPU_CHECK_OUT": str(out), "BIN": VENV_BIN}
    env.pop("PYTHONPATH", None)
    env.pop("STEPS", None)
    env.update(env_overrides)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _summary(result: subprocess.CompletedProcess) -> dict[str, str]:
    lines = result.stdout.split("== gpu-check summary")[1].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  "))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    fmnist = _small_fashion_mnist(tmp / "fashion-mnist")
    start = time.perf_counter()
    result = _gpu_check(tmp / "out", FMNIST_DIR=str(fmnist))
    print(f"gpu-check dry run: {time.perf_counter() - start:.0f} s")
    print(result.stdout.split("== gpu-check summary")[-1])
    return result, tmp / "out"


@pytest.mark.slow
def test_dry_run_runs_every_step_with_the_gpu_batch_sizes(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result)
    assert tuple(summary) == STEPS, summary
    for name, status in summary.items():
        assert status.startswith("ok ("), (name, status)
    # the data fills the largest batch: 256 samples, built for real
    manifest = json.loads((out / "sample-shards" / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 256
    # the GPU run's batch sizes, on the CPU
    for method in ("mos", "univip"):
        report = json.loads((out / f"pipeline_{method}.json").read_text())
        assert report["batch_size"] == 256 and report["device"] == "cpu"
        assert report["dataset"]["samples"] == 256
        assert "torchvision" in report["images_per_s"], report  # the baseline runs too
    versus = json.loads((out / "train_mos_vs_mocov3.json").read_text())
    assert (versus["method"], versus["baseline"], versus["global_batch"]) == ("mos", "mocov3", 256)
    assert versus["compile"] is True  # as the recipe: the compiled step runs here too
    for name, method, compiled in (("train_mos", "mos", True), ("train_univip", "univip", False)):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["method"] == method and report["global_batch"] == 128
        assert report["compile"] is compiled
        # 3 steps of 128 cross the end of the 256 samples' epoch
        assert report["end_to_end"]["steps"] == 3 and "ratio" in report
        assert report["device"].startswith("CPU")
        # the recipe's view sizes, not smaller ones
        assert report["config"]["data"]["size"] == 224
    assert report["config"]["data"]["instance_size"] == 96
    # the GPU-only tests were collected and skipped, not broken
    assert "skipped" in (out / "pytest-gpu.log").read_text()
    assert "bench quality" in result.stdout and "--recipe gpu" in result.stdout
    assert "mode: dry run (CPU)" in (out / "env.txt").read_text()


def test_a_step_that_would_fail_on_the_gpu_fails_the_dry_run(tmp_path):
    """Shards too small for the batch: the failure the GPU would meet, here, as a failed step
    and exit status 1 (the steps after it still run)."""
    shutil.copytree(photo_shards(), tmp_path / "out" / "sample-shards")
    result = _gpu_check(tmp_path / "out", STEPS="train-univip,quality", FMNIST_DIR="/nonexistent")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = _summary(result)
    assert summary["data"] == "ok (already built)"
    assert summary["train-univip"].startswith("FAILED")
    assert "do not fill one global batch" in (tmp_path / "out" / "train-univip.log").read_text()
    assert summary["quality"].startswith("skipped (no Fashion-MNIST")


def test_plain_python_without_scikit_image(tmp_path):
    """An offline GPU node: no venv and no ``ssl-cli`` script, and here no scikit-image either.
    The data step fails inside the script's error handling, the steps that need its shards are
    skipped, and the others still run."""
    stub = tmp_path / "stub" / "skimage"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named skimage')\n")
    result = _gpu_check(
        tmp_path / "out",
        BIN=str(tmp_path / "no-venv"),
        PYTHON=sys.executable,
        PYTHONPATH=str(stub.parent),
        STEPS="pipeline-mos,quality",
        FMNIST_DIR=str(_small_fashion_mnist(tmp_path / "fashion-mnist")),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = _summary(result)
    assert summary["data"].startswith("FAILED")
    assert "scikit-image" in (tmp_path / "out" / "data.log").read_text()
    assert summary["pipeline-mos"] == "skipped (no shards: the data step failed)"
    assert summary["quality-data"].startswith("ok (") and summary["quality"].startswith("ok (")
    assert f"{sys.executable} -m cli.main bench quality" in result.stdout


def test_a_node_without_dali_still_reports_and_runs(tmp_path):
    """DALI travels to a GPU node separately and may fail to install: the environment report
    names it missing and the script goes on to its steps and summary (here the quality step,
    skipped for want of data), instead of stopping at the report."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoDali:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
        "            raise ImportError('No module named nvidia.dali')\n"
        "sys.meta_path.insert(0, NoDali())\n"
    )
    result = _gpu_check(
        tmp_path / "out", PYTHONPATH=str(block), STEPS="quality", FMNIST_DIR="/nonexistent"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env = (tmp_path / "out" / "env.txt").read_text()
    assert "nvidia.dali: MISSING (ImportError: No module named nvidia.dali)" in env
    assert "torch: " in env and "cpu cores:" in env
    assert _summary(result)["quality"].startswith("skipped (no Fashion-MNIST")
