"""``make gpu-check``: its dry run parses every command line of the GPU script on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_parses_every_command(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "GPU_CHECK_OUT": str(tmp_path / "out")}
    env["BIN"] = str(Path(sys.executable).parent)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("== gpu-check summary")[1]
    for name in ("pytest-gpu", "pipeline-mos", "pipeline-univip", "train-mos", "train-univip",
                 "quality"):  # fmt: skip
        assert f"  {name}: dry-run ok" in summary, summary
    assert "--baseline mocov3" in result.stdout and "--recipe gpu" in result.stdout
