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

Writes go through :func:`shards.atomic.atomic_file`: a temporary file in the same directory
(``.step-NNNNNNNN.pt.tmp-PID-TID``), flushed to disk, then renamed over the final name, so a
crash leaves the previous checkpoints intact and never a truncated one under a final name. A
failed write (disk full, quota, I/O error) removes its temporary file, keeps every previous
checkpoint and raises :class:`CheckpointWriteError` naming the directory ("no space left on
DIR"). A temporary file left by a process that was killed while writing is removed by
:func:`remove_stale_temporaries` when the next run starts.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.atomic import atomic_file, is_temporary, stale_temporaries

__all__ = [
    "BRANCHES",
    "backbone_state_dict",
    "resolve_checkpoint",
    "CHECKPOINT_FORMAT",
    "CheckpointWriteError",
    "capture_rng",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_config",
    "remove_stale_temporaries",
    "restore_rng",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
# The two encoders of every ssl-cli model by the prefix of their backbone's keys in a checkpoint
BRANCHES = {"online": "online.backbone.", "target": "target.backbone."}
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# the files of a run directory written atomically (checkpoints here; metrics.jsonl, run.json
# and the shard check cache in train/loop.py): their temporary files are ours to clean
_ATOMIC_TARGETS = re.compile(r"^(step-\d{8,}\.pt|metrics\.jsonl|run\.json|[\w.-]+\.json)$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous
    checkpoints are intact and the temporary file was removed."""


class _RecordingWriter:
    """A file for ``torch.save`` that remembers the ``OSError`` of a failed write: torch's
    zip writer replaces it by ``[enforce fail at inline_container.cc:...] unexpected pos``,
    which says neither what failed nor where."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


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


def save_checkpoint(
    state: dict, run_dir: str | Path, step: int, keep_last: int, keep_every: int = 0
) -> Path:
    """Write ``state`` atomically as ``step-{step:08d}.pt``, then keep the ``keep_last`` newest
    and every checkpoint whose step is a multiple of ``keep_every`` (:func:`prune_checkpoints`).
    Before writing, the free space of the folder is checked against the state's size
    (:func:`check_free_space`): a clear error instead of a half-written file."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}.pt"
    check_free_space(d, state, final)
    try:
        with atomic_file(final) as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(state, writer)
            except RuntimeError as e:  # torch's writer hides the OSError of a failed write
                if writer.error is None:
                    raise
                raise writer.error from e
    except OSError as e:
        raise _write_error(e, d, final) from None
    prune_checkpoints(run_dir, keep_last, keep_every)
    return final


# room left beside a checkpoint: torch's zip framing, and the other writes of the run
_FREE_SPACE_MARGIN = 1.05
_FREE_SPACE_EXTRA = 16 * 2**20


def state_bytes(state: Any) -> int:
    """Bytes of the tensors and arrays in ``state`` (nested dicts, lists), about its file size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, np.ndarray):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def check_free_space(folder: Path, state: dict, final: Path) -> None:
    """:class:`CheckpointWriteError` (ENOSPC) when ``folder``'s file system has less room than
    ``state`` needs, before anything is written."""

    need = int(state_bytes(state) * _FREE_SPACE_MARGIN) + _FREE_SPACE_EXTRA
    free = shutil.disk_usage(folder).free
    if free < need:
        kept = list_checkpoints(folder.parent)
        previous = f"newest kept: {kept[-1].name}" if kept else "none written before"
        raise CheckpointWriteError(
            errno.ENOSPC,
            f"not enough space on {folder} for checkpoint {final.name}: it needs about "
            f"{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free ({previous}). Free "
            "space (or lower run.keep_last) and run the same command again to resume.",
        )


def _write_error(e: OSError, d: Path, final: Path) -> CheckpointWriteError:
    kept = list_checkpoints(d.parent)
    previous = (
        f"the previous checkpoints are kept (newest: {kept[-1].name})"
        if kept
        else "no checkpoint was written before it"
    )
    if e.errno in _FULL:
        quota = " (disk quota exceeded)" if e.errno == errno.EDQUOT else ""
        return CheckpointWriteError(
            e.errno,
            f"no space left on {d}{quota}: checkpoint {final.name} not written; {previous}. "
            "Free space and run the same command again to resume.",
        )
    return CheckpointWriteError(
        e.errno, f"cannot write checkpoint {final} ({e.strerror or e}); {previous}"
    )


def remove_stale_temporaries(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove the temporary files of atomic writes (:mod:`shards.atomic`) that a killed
    process left in ``run_dir`` and its ``checkpoints/``. Returns (removed, kept): a file whose
    writer is a running process other than this one is kept (another writer may own it)."""
    removed, kept = [], []
    run_dir = Path(run_dir)
    for folder in (run_dir, checkpoint_dir(run_dir)):
        if not folder.is_dir():
            continue
        stale = stale_temporaries(folder, _ATOMIC_TARGETS)
        for path in sorted(folder.iterdir()):
            found = is_temporary(path.name)
            if found is None or not _ATOMIC_TARGETS.match(found[0]) or not path.is_file():
                continue
            if path in stale or found[1] == os.getpid():
                path.unlink(missing_ok=True)
                removed.append(path)
            else:
                kept.append(path)
    return removed, kept


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all checkpoints but the ``keep_last`` newest and, with ``keep_every`` > 0, those
    whose step is a multiple of it (a 300-epoch run keeps a few recent ones to resume from and
    a checkpoint every K steps to evaluate later)."""
    found = list_checkpoints(run_dir)
    for old in found[:-keep_last] if keep_last > 0 else []:
        step = int(_NAME.match(old.name).group(1))
        if keep_every > 0 and step % keep_every == 0:
            continue
        old.unlink(missing_ok=True)


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError(
            f"cannot load checkpoint {path}: the file is empty (0 bytes: a copy or a write "
            "that did not finish); use another checkpoint of the run"
        )


def _reason(e: Exception) -> str:
    """An exception's message, or its type when the message is empty."""
    return str(e).strip() or type(e).__name__


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a readable error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_not_empty(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise ValueError(f"cannot load checkpoint {path}: {_reason(e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an ssl-cli pretraining checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return state


def read_checkpoint_config(path: str | Path) -> dict:
    """Only the ``config`` of a checkpoint; the file is memory-mapped, the weights not read."""
    path = Path(path)
    if path.is_file():
        _check_not_empty(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {_reason(e)}") from None
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


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    path = Path(run_or_ckpt)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            runs = sorted(  # run folders up to two levels down (runs/demo/mos, table/runs/x)
                str(p.relative_to(path))
                for p in [*path.glob("*"), *path.glob("*/*")]
                if p.is_dir() and p.name != "checkpoints" and latest_checkpoint(p) is not None
            )
            if runs:  # a folder of runs (runs/demo): name them
                shown = ", ".join(str(path / r) for r in runs[:6]) + (
                    ", ..." if len(runs) > 6 else ""
                )
                raise FileNotFoundError(
                    f"{path} is a folder of {len(runs)} run(s), not a run: pass one of {shown}"
                )
            raise FileNotFoundError(f"{path}: no checkpoint in {path / 'checkpoints'}")
        return found
    raise FileNotFoundError(f"{path}: neither a run directory nor a checkpoint file")


def backbone_state_dict(checkpoint: dict, branch: str = "online") -> dict[str, torch.Tensor]:
    """Backbone tensors of ``branch`` with the model prefix removed (timm's own key names)."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; choose one of {', '.join(BRANCHES)}")
    prefix = BRANCHES[branch]
    state = {
        k[len(prefix) :]: v.clone() for k, v in checkpoint["model"].items() if k.startswith(prefix)
    }
    if not state:
        raise ValueError(
            f"checkpoint has no '{prefix}*' tensors: not an ssl-cli pretraining checkpoint"
        )
    return state
