"""Typed, validated pretraining configuration: frozen dataclasses, loadable from YAML or JSON.

Layers, later wins: the dataclass defaults, the method's recipe (``train.methods``), the config
file (``--config``), then command-line flags and ``--set key.sub=value``. Every layer goes
through :func:`from_dict`, so an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key (``optim.base_lr: expected float, got str 'fast'``).
The resolved config is saved with the run (``RUN/config.yaml``) and inside every checkpoint as
a dict of primitives.

Units: ``data.batch_size`` is the **global** batch (all ranks together, must divide by the
world size); ``optim.base_lr`` is the learning rate per 256 images of global batch, the actual
peak rate is ``base_lr * batch_size / 256`` (the linear scaling rule, see
``docs/training.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "WandbConfig",
    "ScheduleConfig",
    "TrainConfig",
    "deep_merge",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_assignment",
    "to_dict",
]


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key."""


# ------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Where the views come from and how big they are."""

    shards: str = ""  # shard directory written by `ssl-cli shards build`
    batch_size: int = 256  # GLOBAL batch (samples per step, all ranks together)
    size: int = 224  # side of the main views: MOS single/stitched, UniVIP scenes, BYOL/MoCo crops
    instance_size: int = 96  # UniVIP instance crops (section 3.3: 96 x 96)
    num_instances: int = 4  # UniVIP K (section 3.2)
    num_threads: int | None = None  # DALI threads per rank (None: the loader's default)
    workers: int | None = None  # view-source processes per rank (None: the loader's default)
    views: dict[str, Any] = field(default_factory=dict)  # extra kwargs of the loader's view set
    synthetic: bool = False  # random tensors instead of shards (tests, `bench train` ceiling)
    synthetic_samples: int = 4096  # dataset size of the synthetic loader


@dataclass(frozen=True)
class ModelConfig:
    """Backbone from timm by name, heads from lists of layer sizes."""

    backbone: str = "vit_small_patch16_224"
    img_size: int | None = None  # ViT only: input side the position embedding is built for
    patch_size: int | None = None  # ViT only (MOS CIFAR: 2 or 4 for 32-px inputs)
    drop_path_rate: float = 0.0  # stochastic depth ("DropConnect" in MOS appendix D)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model kwargs
    projector: tuple[int, ...] = (4096, 4096, 256)  # output sizes of the projector's layers
    predictor: tuple[int, ...] = (4096, 256)  # output sizes of the predictor's layers
    projector_last_bn: bool = True  # BN (no affine) after the projector's last layer (MoCo v3)
    predictor_last_bn: bool = False
    sync_bn: bool = True  # every BatchNorm (backbone and heads) -> SyncBatchNorm, DDP on CUDA
    # backbone calls: "grouped" concatenates views of equal shape (exact for LayerNorm ViTs),
    # "per_view" gives each view its own call, so BatchNorm normalises each view as its own
    # batch (BYOL / ORL); "auto": per_view when the backbone has BatchNorm, else grouped
    batch_views: Literal["auto", "grouped", "per_view"] = "auto"
    freeze_patch_embed: bool = False  # MoCo v3 sec. 4.2: random, frozen ViT patch projection


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    base_lr: float = 5e-4  # per 256 images: peak lr = base_lr * data.batch_size / 256
    min_lr: float = 1e-6  # end of the cosine decay
    weight_decay: float = 0.04  # start of the (cosine) weight-decay schedule
    weight_decay_end: float = 0.4  # end of it; equal to weight_decay for a constant one
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    momentum: float = 0.9  # SGD / LARS
    lars_eta: float = 0.001  # LARS trust coefficient
    exclude_bias_norm: bool = True  # no weight decay (and no LARS adaptation) on biases, 1-D params
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    clip_per_param: bool = False  # clip each parameter's gradient norm alone (DINO), not the global


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 300
    steps: int | None = None  # train exactly this many steps (schedules span them), else epochs
    warmup_epochs: float = 10.0  # linear lr warmup from 0


@dataclass(frozen=True)
class EMAConfig:
    """Momentum of the target encoder, cosine from ``start`` to ``end`` over training."""

    start: float = 0.992
    end: float = 1.0


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (``pip install -e '.[wandb]'``); off while ``project`` is empty.

    ``mode: offline`` writes the run under ``RUN/wandb`` for a later ``wandb sync``. Like
    TensorBoard, it may be switched on or off on resume.
    """

    project: str = ""  # W&B project; "" = no W&B logging
    entity: str = ""  # team or user; "" = the account's default
    mode: Literal["online", "offline", "disabled"] = "online"
    name: str = ""  # run name; "" = the run directory's name
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    out: str = ""  # run directory
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the backbones and heads
    channels_last: bool = True  # NHWC memory format on CUDA
    log_every: int = 10  # steps between metrics lines (and non-finite-loss checks)
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep those whose step is a multiple of this (0: none)
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm bar (only on rank 0 and on a terminal)


@dataclass(frozen=True)
class EvalConfig:
    """Weighted kNN (DINO) on labelled shards every ``every`` steps and at the end of training.

    The backbone of ``branch`` in eval mode, centre crops of side ``data.size``; ``train`` is
    the kNN memory bank, ``val`` the queries (``pipeline.eval.EvalLoader``). Changing these
    keys does not change what training computes: they may differ on resume.
    """

    every: int = 0  # steps between kNN evaluations (plus one at the last step); 0: off
    train: str = ""  # labelled shard directory: the memory bank
    val: str = ""  # labelled shard directory: the queries
    k: int = 20  # neighbours (DINO)
    temperature: float = 0.07  # vote weight exp(cos / temperature) (DINO)
    batch_size: int = 256  # images per forward pass, per rank
    # the momentum (EMA) encoder by default, as the MOS group and DINO (its teacher) evaluate;
    # every registered method has one. MoCo v3 and BYOL report their online encoder: "online".
    # "both" also logs the online backbone (eval/knn_online_*)
    branch: Literal["online", "target", "both"] = "target"


@dataclass(frozen=True)
class TrainConfig:
    method: str = "mos"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: Any = None  # the method's loss dataclass (train.methods), filled by resolve_config
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------ conversion


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: expected one of {choices}, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
            if not isinstance(v, (str, int, float, bool, type(None), list, tuple)):
                raise ConfigError(f"{key}.{k}: expected a plain value, got {_describe(v)}")
            out[k] = list(v) if isinstance(v, tuple) else v
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {_describe(value)}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")  # a bug, not user input


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping, checking every key and every value's type.

    Unknown keys raise :class:`ConfigError` naming the key and the valid ones; missing keys take
    the dataclass default. Nested dataclasses are built recursively; lists become tuples where
    the annotation says ``tuple``; an int is accepted for a float field (never a bool, never a
    string).
    """
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        valid = ", ".join(names)
        hints_ = [difflib.get_close_matches(str(k), names, n=1, cutoff=0.6) for k in unknown]
        guess = [prefix + h[0] for h in hints_ if h]
        maybe = f" (did you mean {' or '.join(repr(g) for g in guess)}?)" if guess else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(prefix + str(k)) for k in unknown)}{maybe}; valid keys here: {valid}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A config as plain dicts, lists and scalars (YAML/JSON-safe and ``weights_only``-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, recursively for nested mappings (new dict)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (an empty file is ``{}``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    _check_expanded_size(data, path)
    return data


# A config is a few hundred values; YAML aliases can make a small file expand exponentially
# (a "billion laughs"), which the merging and checking of the layers would then copy.
MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(data: Any, path: Path) -> None:
    """``ConfigError`` when ``data``, aliases expanded, holds more than :data:`MAX_CONFIG_VALUES`
    values; the walk stops as soon as it has seen that many."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                "repeating a block?); a config is a few hundred: refusing it"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_assignment(text: str) -> dict:
    """``"optim.base_lr=1e-3"`` -> ``{"optim": {"base_lr": 0.001}}`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"expected KEY=VALUE with a dotted key (optim.base_lr=1e-3), got {text!r}"
        )
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
