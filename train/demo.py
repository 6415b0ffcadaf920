"""The pretraining half of ``make demo``: short MOS and UniVIP runs on the sample shards, CPU.

Each run reads ``configs/demo_<method>_cpu.yaml`` (a tiny model, 30 steps; well under two
minutes on two cores) and writes ``OUT/<method>/``. Running it again resumes, i.e. finds the
runs finished and returns at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from train.config import load_yaml
from train.loop import pretrain
from train.methods import resolve_config

__all__ = ["DEMO_METHODS", "demo_config_path", "demo_pretrain"]

DEMO_METHODS = ("mos", "univip")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def demo_config_path(method: str) -> Path:
    path = CONFIGS / f"demo_{method}_cpu.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found (run from a source checkout)")
    return path


def demo_pretrain(
    shards_dir: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = DEMO_METHODS,
    log: Callable[[str], None] = print,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict[str, dict]:
    """Pretrain each of ``methods`` on ``shards_dir`` into ``out_dir/<method>``; returns
    ``{method: {"checkpoint": ..., "first": first metrics line, "last": last one}}``.
    ``overrides``: a config layer applied last (e.g. ``{"schedule": {"steps": 4}}``)."""
    results = {}
    for method in methods:
        cfg = resolve_config(
            load_yaml(demo_config_path(method)),
            {
                "data": {"shards": str(shards_dir)},
                "run": {"out": str(Path(out_dir) / method), "progress": progress},
            },
            overrides or {},
        )
        log(f"--- {method}: {demo_config_path(method).name} -> {cfg.run.out}")
        result = pretrain(cfg, log=log)
        metrics = result["metrics"]
        results[method] = {
            "checkpoint": result["checkpoint"],
            "first": metrics[0] if metrics else None,
            "last": metrics[-1] if metrics else None,
        }
    return results
