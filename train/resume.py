"""What a resume may change, and from which checkpoint it starts (``docs/training.md``).

A run restarts from a checkpoint (:func:`resolve_resume` finds it and rebuilds the config that
made it); the config given now must match the checkpoint's except for the keys in
:data:`RESUMABLE_KEYS`, which change where and how a run executes and logs, not what it
computes (:func:`check_resume_config`). After a non-finite stop (``RUN/non-finite.json``,
:data:`NON_FINITE_FILE`), a resume from a checkpoint before the bad step may also lower
``optim.base_lr`` and set or lower ``optim.clip_grad`` (:data:`AFTER_NON_FINITE`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from shards.dicts import flatten
from train.checkpoint import latest_checkpoint, read_checkpoint_config
from train.config import ConfigError, TrainConfig, to_dict
from train.resolve import resolve_config

__all__ = [
    "AFTER_NON_FINITE",
    "NON_FINITE_FILE",
    "RESUMABLE_KEYS",
    "check_resume_config",
    "find_resume_checkpoint",
    "read_non_finite",
    "resolve_resume",
]

# Config keys that may differ between a checkpoint and the run that resumes it: they change
# where and how the run is executed and logged, not what it computes. A section's name
# ("run.wandb") stands for every key in it.
RESUMABLE_KEYS = frozenset(
    {
        "run.out",
        "run.device",
        "run.precision",
        "run.compile",
        "run.channels_last",
        "run.log_every",
        "run.ckpt_every",
        "run.keep_last",
        "run.keep_every",
        "run.tensorboard",
        "run.wandb",
        "run.progress",
        "data.shards",
        "data.num_threads",
        "data.workers",
        "eval.every",
        "eval.train",
        "eval.val",
        "eval.k",
        "eval.temperature",
        "eval.batch_size",
        "eval.branch",
    }
)


# After a non-finite stop, a resume may change these keys only in this direction (the
# stop's advice: a lower lr, gradient clipping).
AFTER_NON_FINITE = {
    "optim.base_lr": lambda old, new: 0 < new < old,
    "optim.clip_grad": lambda old, new: new > 0 and (old == 0 or new < old),
}
NON_FINITE_FILE = "non-finite.json"  # RUN/non-finite.json: where and why the last run stopped


def find_resume_checkpoint(run_dir: str | Path | None, resume: str | Path | None) -> Path | None:
    """An explicit ``resume`` path, else the newest checkpoint in ``run_dir``, else ``None``."""
    if resume:
        path = Path(resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(
                    f"--resume {path}: no checkpoints in {path / 'checkpoints'}"
                )
            return found
        if not path.is_file():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        return path
    return latest_checkpoint(run_dir) if run_dir else None


def resolve_resume(
    cfg: TrainConfig, layers: Sequence[dict] = (), resume: str | Path | None = None
) -> tuple[TrainConfig, Path | None]:
    """The checkpoint a start of the run ``cfg.run.out`` resumes from, and that start's config:
    the one place that decides both (``ssl-cli pretrain`` calls it, then :func:`pretrain`).

    The checkpoint is ``resume`` (a checkpoint file, or a run directory's newest) or else the
    newest in ``cfg.run.out`` (:func:`find_resume_checkpoint`); for a new run it is ``None``
    and ``cfg`` is kept. A resumed run's config is the checkpoint's, under the same ``layers``
    that made ``cfg`` (values given now override it; :func:`check_resume_config` refuses, when
    the run starts, those that change what is computed). Pass the checkpoint on as
    :func:`pretrain`'s ``resume``.
    """
    ckpt = find_resume_checkpoint(cfg.run.out, resume)
    if ckpt is None:
        return cfg, None
    return resolve_config(read_checkpoint_config(ckpt), *layers), ckpt


def _resumable(key: str) -> bool:
    """``key`` or a section holding it (``run.wandb`` for ``run.wandb.project``) is in
    :data:`RESUMABLE_KEYS`."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in RESUMABLE_KEYS for i in range(1, len(parts) + 1))


# free-form sections a resume compares whole (a changed view set or timm kwarg is one change)
_COMPARED_WHOLE = ("views", "backbone_kwargs")


def check_resume_config(
    cfg: TrainConfig, saved: dict, non_finite: dict | None = None, step: int | None = None
) -> list[str]:
    """Raise :class:`ConfigError` when ``cfg`` differs from a checkpoint's config anywhere but
    :data:`RESUMABLE_KEYS`.

    ``non_finite``: the run's ``non-finite.json`` (``{"step", ...}``) and ``step`` the
    checkpoint's step: when the run stopped on a non-finite value after that checkpoint, the
    changes of :data:`AFTER_NON_FINITE` (a lower ``optim.base_lr``, a new or lower
    ``optim.clip_grad``) are allowed too. Returns those allowed changes, one line each.
    """
    old = flatten(to_dict(resolve_config(saved)), leaves=_COMPARED_WHOLE)
    new = flatten(to_dict(cfg), leaves=_COMPARED_WHOLE)
    after_stop = (
        non_finite is not None
        and step is not None
        and isinstance(non_finite.get("step"), int)
        and non_finite["step"] > step
    )
    diffs, allowed = [], []
    for k in sorted(set(old) | set(new)):
        if _resumable(k) or old.get(k) == new.get(k):
            continue
        change = f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
        rule = AFTER_NON_FINITE.get(k)
        if after_stop and rule is not None and rule(old.get(k), new.get(k)):
            allowed.append(change)
        else:
            diffs.append(change)
    if diffs:
        if non_finite is not None and not after_stop:
            diffs.append(
                f"(the non-finite stop at step {non_finite.get('step')} is not after this "
                "checkpoint, so its exception does not apply)"
            )
        elif after_stop:
            diffs.append(
                "(after the non-finite stop only a lower optim.base_lr and a new or lower "
                "optim.clip_grad may change)"
            )
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in keys that change what "
            "is computed:\n  " + "\n  ".join(diffs) + "\nstart a new run directory instead"
        )
    return allowed


def read_non_finite(ckpt_path: Path) -> dict | None:
    """``non-finite.json`` of the run that wrote ``ckpt_path`` (``RUN/checkpoints/x.pt``)."""
    path = ckpt_path.parent.parent / NON_FINITE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
