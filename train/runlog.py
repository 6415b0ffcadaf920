"""Where a run's metrics records go: :class:`RunLog`.

Every record of the pretraining loop (a training line, a kNN line) is a flat dict with a
``step``; :meth:`RunLog.write` appends it to ``RUN/metrics.jsonl`` and, when they are on, writes
its numbers to TensorBoard (``run.tensorboard``, events in ``RUN/tb``) and to Weights & Biases
(``run.wandb.project``). Only rank 0 holds a :class:`RunLog`.

Names: a key holding a ``/`` (``eval/knn_top1``) is written under its own name, any other key of
a training line (``loss``, ``lr``, ...) under ``train/`` (``train/loss``); ``step`` is the x axis.

At every start (a new run or a resume) the resolved config goes to TensorBoard as text (the
YAML, tag ``config``) and as hparams (dotted keys such as ``optim.base_lr``, with the metrics
``train/loss`` and, with kNN, ``eval/knn_top1``), and to W&B as the run's config.

Resume: :class:`RunLog` is opened at the resumed step, so the lines of ``metrics.jsonl`` after it
are dropped and TensorBoard purges its events after it (``purge_step``); the curves continue as
if the run had never stopped. W&B cannot rewind a run: the W&B run id is kept in
``RUN/wandb.json`` (with the last step sent), a resume continues the same W&B run
(``resume="allow"``), and records whose step is not beyond the last one W&B already has are not
sent again (they are in ``metrics.jsonl`` and TensorBoard).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shards.atomic import atomic_write_json, atomic_write_text
from shards.dicts import flatten
from train.config import TrainConfig, WandbConfig, dump_yaml, to_dict

__all__ = [
    "METRICS_FILE",
    "WANDB_FILE",
    "RunLog",
    "flatten_config",
    "require_wandb",
    "trim_metrics",
    "wandb_enabled",
]

METRICS_FILE = "metrics.jsonl"  # RUN/metrics.jsonl: one JSON object a line
WANDB_FILE = "wandb.json"  # RUN/wandb.json: {"id": W&B run id, "last_step": last step sent}

_INSTALL = "pip install -e '.[wandb]'"


# ----------------------------------------------------------------------------------- files


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the metrics lines of steps after ``last_step`` (the resumed checkpoint's); lines
    without a step (written by other tools) are kept, unreadable ones dropped."""
    if not path.exists():
        return
    kept = []
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            step = json.loads(line).get("step")
            if step is None or step <= last_step:
                kept.append(line)
        except (ValueError, TypeError, AttributeError):
            continue
    if kept == lines:
        return
    # a new file renamed over the old one: a kill at any moment leaves the old or the new
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------- config


def flatten_config(cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as dotted keys (``optim.base_lr``) -> a number, a bool or a string;
    lists, empty mappings and ``None`` become their JSON text (TensorBoard's hparams)."""
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
        for k, v in flatten(to_dict(cfg)).items()
    }


def _scalar_name(key: str) -> str:
    return key if "/" in key else f"train/{key}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------ Weights & Biases


def wandb_enabled(wandb_cfg: WandbConfig) -> bool:
    """W&B logging is on: a project is named and the mode is not ``disabled``."""
    return bool(wandb_cfg.project) and wandb_cfg.mode != "disabled"


def require_wandb(cfg: TrainConfig) -> Any:
    """The ``wandb`` module when ``run.wandb`` is on (imported here, lazily), else ``None``.

    Raises :class:`RuntimeError` naming how to install it when it is on but not installed."""
    if not wandb_enabled(cfg.run.wandb):
        return None
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            f"run.wandb.project is {cfg.run.wandb.project!r} (Weights & Biases logging) but "
            f"wandb cannot be imported ({e}): install it with {_INSTALL} (or pip install wandb), "
            "or leave run.wandb.project empty"
        ) from None
    return wandb


class _WandbRun:
    """One W&B run for the run directory: its id lives in ``RUN/wandb.json``, so every start of
    the same run directory continues the same W&B run."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int) -> None:
        wandb = require_wandb(cfg)
        self.state_path = run_dir / WANDB_FILE
        state: dict = {}
        try:
            loaded = json.loads(self.state_path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("id"), str) and loaded["id"]:
                state = loaded
        except (OSError, ValueError):
            pass
        self.id = state.get("id") or secrets.token_hex(8)
        last = state.get("last_step")
        w = cfg.run.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            mode=w.mode,
            name=w.name or run_dir.resolve().name,
            tags=list(w.tags) or None,
            dir=str(run_dir),
            config=to_dict(cfg),
            id=self.id,
            resume="allow",
        )
        # W&B keeps the steps it has and cannot rewind: what it has (online, its next step;
        # offline, the last step this directory sent) is not sent again
        known = int(getattr(self.run, "starting_step", 0) or 0) - 1
        self.last_step = max(known, last if isinstance(last, int) else -1)
        self.floor = self.last_step
        self._save_state()

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, {"id": self.id, "last_step": self.last_step})

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if step <= self.floor:
            return
        self.run.log(scalars, step=step)
        if step > self.last_step:
            self.last_step = step
            self._save_state()

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


# ------------------------------------------------------------------------------------ RunLog


class RunLog:
    """The metrics sinks of one start of a run (rank 0): ``RUN/metrics.jsonl``, TensorBoard
    (``run.tensorboard``) and W&B (``run.wandb``).

    ``start``: the step the run starts (or resumes) at; lines and events after it are dropped.
    ``metrics``: the scalar names TensorBoard's hparams dashboard shows next to the config.
    Close it (:meth:`close`, or use it as a context manager) on every exit.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: TrainConfig,
        start: int = 0,
        metrics: Sequence[str] = ("train/loss",),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard: Any = None
        self.wandb: _WandbRun | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trim_metrics(self.path, start)
        try:
            if cfg.run.tensorboard:
                self.tensorboard = _open_tensorboard(self.run_dir, cfg, start, metrics)
            if wandb_enabled(cfg.run.wandb):
                self.wandb = _WandbRun(self.run_dir, cfg, start)
        except BaseException:
            self.close(ok=False)
            raise

    def write(self, record: dict) -> None:
        """Append ``record`` (a flat dict with an int ``step``) to ``metrics.jsonl`` (flushed
        and closed at once) and send its numbers to TensorBoard and W&B."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {_scalar_name(k): v for k, v in record.items() if k != "step" and _is_number(v)}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.write(step, scalars)

    def close(self, ok: bool = True) -> None:
        """Flush and close TensorBoard's events and finish the W&B run (``ok=False``: it is
        marked failed). Safe to call twice."""
        tb, self.tensorboard = self.tensorboard, None
        run, self.wandb = self.wandb, None
        try:
            if tb is not None:
                tb.close()
        finally:
            if run is not None:
                run.close(ok)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(ok=exc_type is None)


def _open_tensorboard(run_dir: Path, cfg: TrainConfig, start: int, metrics: Sequence[str]) -> Any:
    """A ``SummaryWriter`` on ``RUN/tb`` that purges the events after ``start``, with the config
    written at ``start``: as text (tag ``config``) and as hparams."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    # readers drop the earlier events at or after purge_step: those of step start itself are
    # kept (metrics.jsonl keeps its line too), the next one is logged anew
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)
    try:
        writer.add_text("config", f"```yaml\n{dump_yaml(to_dict(cfg))}```", start)
        experiment, session_start, session_end = hparams(
            flatten_config(cfg), dict.fromkeys(metrics, 0.0)
        )
        events = writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            events.add_summary(summary, start)
        writer.flush()
    except BaseException:
        writer.close()
        raise
    return writer
