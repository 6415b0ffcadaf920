"""``make gpu-check``: its dry run parses every command line of the GPU script on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(tmp_path, **env_overrides):
    env = {**os.environ, "DRY_RUN": "1", "GPU_CHECK_OUT": str(tmp_path / "out"), **env_overrides}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_dry_run_parses_every_command(tmp_path):
    result = _dry_run(tmp_path, BIN=str(Path(sys.executable).parent))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("== gpu-check summary")[1]
    for name in ("pytest-gpu", "pipeline-mos", "pipeline-univip", "train-mos", "train-univip",
                 "quality"):  # fmt: skip
        assert f"  {name}: dry-run ok" in summary, summary
    assert "--baseline mocov3" in result.stdout and "--recipe gpu" in result.stdout


def test_gpu_check_runs_from_a_plain_python_without_the_entry_point(tmp_path):
    """An offline GPU node: no venv and no ``ssl-cli`` script, only a Python with the packages."""
    result = _dry_run(tmp_path, BIN=str(tmp_path / "no-venv"), PYTHON=sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{sys.executable} -m cli.main bench train" in result.stdout
    assert f"{sys.executable} -m pytest -q -m gpu" in result.stdout
    assert "  train-univip: dry-run ok" in result.stdout
