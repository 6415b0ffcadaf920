"""Checkpoints: atomic writes, the last K kept, loadable with ``torch.load(weights_only=True)``.

A checkpoint is ``RUN/checkpoints/step-NNNNNNNN.pt`` holding only tensors and primitives:

- ``format`` (int), ``step`` (optimizer steps done), ``epoch`` (float, ``step / len(loader)``);
- ``model``: the whole :class:`train.models.SSLModel` state dict (online backbone + projector,
  predictor, extras, and the EMA target);
- ``optimizer``, ``scaler`` (``GradScaler``; empty when not fp16): their state dicts;
- ``loader``: the loader's ``state_dict()`` (data position: next batch of which epoch);
- ``rng``: one entry per rank: torch CPU generator state, CUDA generator state (or ``None``),
  Python ``random`` state as nested tuples and numpy's as a tensor + ints;
- ``world_size``, ``config`` (the resolved config as a dict of primitives), ``method``.

Schedules are not stored: they are a pure function of the config and the step.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over
the final name (``os.replace`` is atomic on POSIX), so a crash leaves the previous checkpoints
intact and never a truncated one under a final name.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_config",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (by step number in the name)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as ``step-{step:08d}.pt`` and keep the ``keep_last`` newest."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(d)
    prune_checkpoints(run_dir, keep_last)
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a readable error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise ValueError(f"cannot load checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an ssl-cli pretraining checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return state


def read_checkpoint_config(path: str | Path) -> dict:
    """Only the ``config`` of a checkpoint; the file is memory-mapped, the weights not read."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an ssl-cli pretraining checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return state["config"]


# -------------------------------------------------------------------------------- RNG


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generator states, as tensors and primitives."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": _to_tuples(random.getstate()),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )


def _to_tuples(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuples(v) for v in x)
    return x
