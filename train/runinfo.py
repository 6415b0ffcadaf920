"""What produced a run: git SHA, library versions, device, command line (DINO's ``get_sha``).

The recorded command line has the values of secret-looking arguments (``--api-key X``,
``--set run.x.token=X``, ``WANDB_API_KEY=X``) replaced by ``***``: ``run.json`` never holds a
credential.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from shards import sysinfo
from shards.sysinfo import cpu_model

__all__ = ["describe_device", "git_sha", "library_versions", "redact_command", "run_info"]

_REPO = Path(__file__).resolve().parent.parent


def git_sha(path: str | Path = _REPO) -> dict | None:
    """``{"sha": ..., "dirty": bool}`` of the checkout holding this code, ``None`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def library_versions() -> dict[str, str | None]:
    """Versions of python and the libraries that shape a run (``None``: not installed)."""
    versions = sysinfo.library_versions(
        "torch", "timm", "numpy", "dali", "ssl-cli", "tensorboard", "wandb"
    )
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = (
        str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    )
    return versions


def describe_device(device: torch.device) -> str:
    """E.g. ``"NVIDIA H100 80GB HBM3 (80.0 GiB), 8 visible"`` or ``"CPU: <model>, 2 cores"``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.1f} GiB), "
            f"{torch.cuda.device_count()} visible"
        )
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


_SECRET = re.compile(r"api[_-]?key|token|secret|passw(or)?d|credential", re.IGNORECASE)
REDACTED = "***"


def redact_command(argv: list[str]) -> list[str]:
    """``argv`` with the value of every argument whose name looks like a secret replaced by
    ``***``: ``NAME=VALUE`` (``--api-key=X``, ``run.wandb.token=X`` after ``--set``,
    ``WANDB_API_KEY=X``) and an option followed by its value (``--api-key X``)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if _SECRET.search(name):
            if eq:
                arg = f"{name}={REDACTED}"
            elif arg.startswith("-"):
                hide_next = True
        out.append(arg)
    return out


def run_info(device: torch.device, world_size: int) -> dict:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
        "versions": library_versions(),
        "device": describe_device(device),
        "world_size": world_size,
        "host": platform.node(),
        "command": redact_command(sys.argv),
    }
