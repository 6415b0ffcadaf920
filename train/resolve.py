"""From config layers to a checked :class:`~train.config.TrainConfig`: the one validation path.

- :func:`resolve_config`: layers of nested dicts (defaults, the method's recipe, ``--config``
  files, flags, ``--set``), later layers winning, merged (:func:`train.config.deep_merge`)
  and typed by :func:`train.config.from_dict` (unknown keys and wrong types, per key); the
  ``loss`` section against the method's loss dataclass (``train.methods``).
- :func:`validate_config`: the checks types alone cannot express (ranges, and keys that need
  each other, such as ``eval.every`` and its shards), one table.

Every error is a :class:`~train.config.ConfigError` that names the key. The view sets check
their own options (``data.views``) when the loader builds them.
"""

from __future__ import annotations

import math

from train.config import ConfigError, TrainConfig, deep_merge, from_dict
from train.methods import get_method

__all__ = ["resolve_config", "validate_config"]


def resolve_config(*layers: dict) -> TrainConfig:
    """The typed config from layers of nested dicts, later layers winning.

    The method (``method`` key of the merged layers, default ``mos``) puts its recipe under the
    layers; the ``loss`` section is checked against the method's loss dataclass. Unknown keys,
    wrong types and out-of-range values raise :class:`ConfigError`.
    """
    merged: dict = {}
    for layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"a config layer must be a mapping, got {type(layer).__name__}")
        merged = deep_merge(merged, layer)
    name = merged.get("method", TrainConfig.method)
    if not isinstance(name, str):
        raise ConfigError(f"method: expected str, got {type(name).__name__} {name!r}")
    try:
        method = get_method(name)
    except ValueError as e:
        raise ConfigError(f"method: {e}") from None
    merged = deep_merge(method.recipe, merged)
    merged["method"] = name
    loss = merged.pop("loss", None)
    cfg = from_dict(TrainConfig, merged)
    loss_cfg = from_dict(method.loss_config, {} if loss is None else loss, prefix="loss.")
    cfg = cfg.replace(loss=loss_cfg)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Range checks that types alone cannot express; raises :class:`ConfigError`."""
    checks = [
        ("data.batch_size", cfg.data.batch_size >= 1, ">= 1"),
        ("data.size", cfg.data.size >= 1, ">= 1"),
        ("data.instance_size", cfg.data.instance_size >= 1, ">= 1"),
        ("data.num_instances", cfg.data.num_instances >= 1, ">= 1"),
        (
            "data.num_threads",
            cfg.data.num_threads is None or cfg.data.num_threads >= 1,
            ">= 1 or null",
        ),
        ("data.workers", cfg.data.workers is None or cfg.data.workers >= 0, ">= 0 or null"),
        ("data.synthetic_samples", cfg.data.synthetic_samples >= 1, ">= 1"),
        (
            "model.projector",
            all(s >= 1 for s in cfg.model.projector) and cfg.model.projector,
            "non-empty, sizes >= 1",
        ),
        (
            "model.predictor",
            all(s >= 1 for s in cfg.model.predictor) and cfg.model.predictor,
            "non-empty, sizes >= 1",
        ),
        ("model.drop_path_rate", 0.0 <= cfg.model.drop_path_rate < 1.0, "in [0, 1)"),
        ("model.img_size", cfg.model.img_size is None or cfg.model.img_size >= 1, ">= 1 or null"),
        (
            "model.patch_size",
            cfg.model.patch_size is None or cfg.model.patch_size >= 1,
            ">= 1 or null",
        ),
        ("optim.base_lr", 0 <= cfg.optim.base_lr < math.inf, "finite and >= 0"),
        ("optim.min_lr", 0 <= cfg.optim.min_lr < math.inf, "finite and >= 0"),
        ("optim.weight_decay", 0 <= cfg.optim.weight_decay < math.inf, "finite and >= 0"),
        (
            "optim.weight_decay_end",
            0 <= cfg.optim.weight_decay_end < math.inf,
            "finite and >= 0",
        ),
        ("optim.momentum", 0.0 <= cfg.optim.momentum < 1.0, "in [0, 1)"),
        ("optim.betas", all(0.0 <= b < 1.0 for b in cfg.optim.betas), "in [0, 1)"),
        ("optim.lars_eta", cfg.optim.lars_eta > 0, "> 0"),
        (
            "optim.clip_grad",
            0 <= cfg.optim.clip_grad < math.inf,
            "finite and >= 0 (0 disables clipping)",
        ),
        ("schedule.epochs", cfg.schedule.epochs >= 1, ">= 1"),
        ("schedule.steps", cfg.schedule.steps is None or cfg.schedule.steps >= 1, ">= 1 or null"),
        ("schedule.warmup_epochs", cfg.schedule.warmup_epochs >= 0, ">= 0"),
        ("ema.start", 0.0 <= cfg.ema.start <= 1.0, "in [0, 1]"),
        ("ema.end", 0.0 <= cfg.ema.end <= 1.0, "in [0, 1]"),
        ("run.log_every", cfg.run.log_every >= 1, ">= 1"),
        ("run.ckpt_every", cfg.run.ckpt_every >= 1, ">= 1"),
        ("run.keep_last", cfg.run.keep_last >= 1, ">= 1"),
        ("run.keep_every", cfg.run.keep_every >= 0, ">= 0 (0: none)"),
        ("eval.every", cfg.eval.every >= 0, ">= 0 (0: off)"),
        ("eval.k", cfg.eval.k >= 1, ">= 1"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, ">= 1"),
        ("eval.temperature", cfg.eval.temperature > 0, "> 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}, got {_value(cfg, key)!r}")
    if cfg.eval.every and not (cfg.eval.train and cfg.eval.val):
        raise ConfigError(
            f"eval.every={cfg.eval.every} needs labelled shards for eval.train and eval.val "
            "(--eval-train SHARDS --eval-val SHARDS)"
        )


def _value(cfg: TrainConfig, key: str) -> object:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
