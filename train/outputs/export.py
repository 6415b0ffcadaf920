"""``ssl-cli export``: the pretrained backbone alone, in timm's key layout, in three formats.

- ``timm`` (default): ``OUT`` (``.pth``, ``.pt`` or ``.bin``) holds a plain state dict that
  ``timm.create_model(arch, num_classes=0, **kwargs)`` loads with
  ``load_state_dict(strict=True)``, no renaming.
- ``safetensors``: ``OUT`` (``.safetensors``) holds the same tensors; its string metadata has
  ``arch``, ``timm_kwargs`` (JSON), ``branch``, ``method``, ``step`` and ``format`` (``"pt"``).
- ``hf``: ``OUT`` is a folder in the Hugging Face Hub / timm layout: ``config.json``
  (``architecture``, ``num_classes`` 0, ``num_features``, ``model_args``: the architecture
  arguments the backbone was built with, ``pretrained_cfg``: the training input size, the
  normalisation and evaluation transform of ssl-cli, nothing inherited from timm's default
  weights of the architecture), ``model.safetensors`` and ``ssl_cli_export.json``.
  ``timm.create_model("local-dir:OUT", pretrained=True)`` rebuilds the backbone with its weights
  (without ``pretrained=True`` timm builds the architecture with random weights).

``kwargs`` are the ``timm.create_model`` arguments of the training config (``backbone_kwargs``,
``img_size``, ``patch_size``); ``drop_path_rate`` is left out: stochastic depth is a training
regulariser, with no effect on the weights or on eval-mode outputs. A bare
``timm.create_model(arch, num_classes=0)`` does not fit a backbone built with other depth,
image or patch size: the description records the kwargs and the exact loading snippet.

The description (``OUT`` with ``.json`` appended; ``OUT/ssl_cli_export.json`` for ``hf``) records
the architecture, the kwargs, the input size, the normalisation, the run, the step, the files
and their loading snippet. For ResNets the ``timm`` and ``safetensors`` formats also write
``OUT_torchvision.pth`` / ``OUT_torchvision.safetensors``: the same tensors in torchvision's
layout (``torchvision.models.resnet50()``: every key but ``fc.*``), ready for a detection
backbone.

Refused before anything is written (:func:`check_export_target`, :func:`check_export_out`): a
target inside the run's ``checkpoints/`` folder, over an existing pretraining checkpoint
anywhere, an ``OUT`` whose suffix belongs to another format, and for ``hf`` an existing file or
a non-empty folder that is not a previous ``hf`` export (a previous export is replaced whole).

Every file is written through :func:`shards.atomic.atomic_file` (a temporary name in its target
folder, renamed into place when complete); an ``hf`` folder is assembled as a temporary folder,
checked by loading it back with timm, then renamed. An interrupted export leaves no partial file
under a target name (at most a ``.NAME.tmp-*`` entry). The description is written last.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import timm
import torch

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.eval import DEFAULT_CROP_PCT
from shards.atomic import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
)
from shards.writer import sha256_file
from train.checkpoint import (
    backbone_state_dict,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
)
from train.eval.features import resolve_branches
from train.outputs.detection import (
    DETECTION_FORMATS,
    check_conversion,
    convert_for,
    detection_snippet,
    vit_shape,
)

FORMATS = ("timm", "safetensors", "hf", *DETECTION_FORMATS)
SUFFIXES = {
    "timm": (".pth", ".pt", ".bin"),
    "safetensors": (".safetensors",),
    "detectron2": (".pkl",),
    "mmdet": (".pth",),
}
HF_FILES = ("config.json", "model.safetensors", "ssl_cli_export.json")
HF_INFO = "ssl_cli_export.json"
# pretrained_cfg keys that describe our weights; timm's defaults for the architecture (tag,
# hub id, url, license, paper, test-time sizes of ImageNet weights, labels) are dropped
_PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "custom_load",
)


def _is_run_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` is a run's ``checkpoints/`` (beside the run's config.yaml or
    metrics.jsonl, or holding ``step-*.pt`` files)."""
    if folder.name != "checkpoints" or not folder.is_dir():
        return False
    run = folder.parent
    return (
        (run / "config.yaml").exists()
        or (run / "metrics.jsonl").exists()
        or any(folder.glob("step-*.pt"))
    )


def _is_checkpoint(path: Path) -> bool:
    try:
        read_checkpoint_config(path)
    except (ValueError, OSError, KeyError):
        return False
    return True


def check_export_target(ckpt_path: Path, targets: list[Path]) -> None:
    """``ValueError`` when a path to write is in (or is) the checkpoint folder of the checkpoint
    being exported (``RUN/checkpoints/``) or would replace a pretraining checkpoint."""
    ckpt_dir = ckpt_path.resolve().parent
    for target in targets:
        resolved = target.resolve()
        inside = resolved == ckpt_dir or ckpt_dir in resolved.parents
        if inside and ckpt_dir.name == "checkpoints":
            raise ValueError(
                f"refusing to write {target}: it is in the checkpoint folder {ckpt_path.parent} "
                "of the run being exported (the trainer owns it); choose another --out"
            )
        other = next((d for d in [resolved, *resolved.parents] if _is_run_checkpoints(d)), None)
        if other is not None:
            raise ValueError(
                f"refusing to write {target}: it is in {other}, the checkpoint folder of the run "
                f"{other.parent} (its resume reads every file there); choose another --out"
            )
        if resolved.is_file() and _is_checkpoint(resolved):
            raise ValueError(
                f"refusing to overwrite {target}: it is a pretraining checkpoint; choose another "
                "--out"
            )


def _format_of_suffix(suffix: str) -> str | None:
    for fmt, suffixes in SUFFIXES.items():
        if suffix.lower() in suffixes:
            return fmt
    return None


def check_export_out(out: Path, fmt: str) -> None:
    """``ValueError`` when ``out`` does not fit ``fmt``: a suffix of another format, a file
    format's ``OUT`` that is a folder, an ``hf`` ``OUT`` that is a file or a non-empty folder
    other than a previous ``hf`` export."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffix_fmt = _format_of_suffix(out.suffix)
    if fmt == "hf":
        if suffix_fmt is not None or out.suffix.lower() == ".json":
            raise ValueError(
                f"--out {out}: --format hf writes a folder, but {out.name!r} has the suffix of a "
                f"file; name a folder (e.g. {out.with_suffix('')})"
                + (f", or pass --format {suffix_fmt}" if suffix_fmt else "")
            )
        if out.is_file():
            raise ValueError(f"--out {out}: is a file; --format hf writes a folder")
        if out.is_dir():
            entries = sorted(p.name for p in out.iterdir())
            previous = HF_INFO in entries and set(entries) <= set(HF_FILES)
            if entries and not previous:
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise ValueError(
                    f"--out {out}: a non-empty folder that is not an ssl-cli hf export (holds "
                    f"{shown}); choose a new or empty folder"
                )
        return
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; --format {fmt} writes a file")
    if out.suffix.lower() not in SUFFIXES[fmt]:
        allowed = SUFFIXES[fmt]
        wanted = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        hint = f", or pass --format {suffix_fmt}" if suffix_fmt else ""
        raise ValueError(
            f"--out {out}: --format {fmt} writes a {wanted} file; name it "
            f"{out.with_suffix(allowed[0]).name}{hint}"
        )


def timm_kwargs(model_cfg: dict) -> dict:
    """``timm.create_model`` keyword arguments that rebuild the pretrained backbone."""
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    for key in ("img_size", "patch_size"):
        if model_cfg.get(key) is not None:
            kwargs[key] = model_cfg[key]
    return kwargs


def _py(value) -> str:
    """A Python literal: strings in double quotes (paths), everything else as ``repr``."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def load_snippet(fmt: str, arch: str, kwargs: dict, path: Path) -> str:
    """Python lines that load the export at ``path`` (absolute) into a timm model."""
    path = str(path.resolve())
    if fmt == "hf":
        return (
            "import timm\n"
            "# pretrained=True loads model.safetensors; without it timm builds random weights\n"
            f"model = timm.create_model({_py('local-dir:' + path)}, pretrained=True)\n"
        )
    create = (
        f"model = timm.create_model({_py(arch)}, num_classes=0"
        + "".join(f", {k}={_py(v)}" for k, v in kwargs.items())
        + ")\n"
    )
    if fmt == "safetensors":
        return (
            "import timm\nfrom safetensors.torch import load_file\n"
            + create
            + f"model.load_state_dict(load_file({_py(path)}), strict=True)\n"
        )
    return (
        "import timm\nimport torch\n"
        + create
        + f"model.load_state_dict(torch.load({_py(path)}, weights_only=True), strict=True)\n"
    )


def _safetensors_bytes(state: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def _check_torchvision_layout(arch: str, state: dict) -> bool:
    """Whether ``arch`` is a ResNet torchvision also builds, whose keys ``state`` has (all but
    ``fc.*``); ``ValueError`` when torchvision has the architecture but other keys."""
    if not arch.startswith(("resnet", "resnext", "wide_resnet")):
        return False
    import torchvision

    tv_model = getattr(torchvision.models, arch, None)
    if tv_model is None:
        return False
    missing, unexpected = tv_model().load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise ValueError(
            f"{arch}: keys do not map onto torchvision's layout ({unexpected or missing})"
        )
    return True


def hf_config(model: torch.nn.Module, kwargs: dict, input_size: int) -> dict:
    """``config.json`` of the ``hf`` format for a timm ``model`` built with ``kwargs``: timm's
    ``save_config_for_hf`` with our preprocessing, ``pretrained_cfg`` cut to the keys that
    describe these weights."""
    from timm.models._hub import save_config_for_hf

    data_config = {
        "input_size": (3, input_size, input_size),
        "mean": tuple(IMAGENET_MEAN),
        "std": tuple(IMAGENET_STD),
        "interpolation": "bilinear",  # the evaluation loader's antialiased linear resize
        "crop_pct": DEFAULT_CROP_PCT,
        "crop_mode": "center",
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        try:
            save_config_for_hf(model, path, model_args=kwargs, data_config=data_config)
        except TypeError as e:  # a timm whose helper predates model_args / data_config
            raise ValueError(
                f"--format hf needs a timm whose save_config_for_hf takes model_args and "
                f"data_config (timm {timm.__version__} installed: {e})"
            ) from None
        config = json.loads(path.read_text())
    pretrained = config["pretrained_cfg"]
    config["pretrained_cfg"] = {k: pretrained[k] for k in _PRETRAINED_CFG_KEYS if k in pretrained}
    return config


@torch.no_grad()
def _check_hf_folder(folder: Path, reference: torch.nn.Module, input_size: int) -> None:
    """Load ``folder`` as timm does and compare its outputs with ``reference``'s."""

    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # noqa: BLE001 - whatever timm raises, the export is not written
        raise ValueError(f"the hf folder does not load back into timm: {e}") from None
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    want, got = reference.eval()(x), loaded(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=0, atol=1e-5):
        raise ValueError(
            "the hf folder loads into timm with other outputs than the exported backbone; "
            "nothing was written"
        )


def _write_hf(out: Path, state: dict, config: dict, info: dict, metadata: dict[str, str], check):
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        atomic_write_bytes(tmp / "model.safetensors", _safetensors_bytes(state, metadata))
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        info["sha256"] = sha256_file(tmp / "model.safetensors")
        atomic_write_json(tmp / HF_INFO, info)
        tmp.chmod(0o777 & ~current_umask())  # as mkdir would create it, not mkdtemp's 0700
        check(tmp)
        if out.exists():  # a previous hf export (check_export_out): replaced whole
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old.tmp"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_detection(out: Path, fmt: str, state: dict, mapping: dict, info: dict) -> None:
    """The detectron2 pickle or the mmdet checkpoint, written atomically, then read back and
    checked against the backbone (:func:`train.outputs.detection.check_conversion`)."""

    if fmt == "detectron2":
        model = {mapping[k]: v.detach().cpu().numpy() for k, v in state.items()}
        payload = {"model": model, "__author__": "ssl-cli", "matching_heuristics": True}
        atomic_write_bytes(out, pickle.dumps(payload, protocol=4))
        with open(out, "rb") as f:
            written = pickle.load(f, encoding="latin1")["model"]
    else:
        meta = {k: info[k] for k in ("arch", "branch", "method", "step")}
        payload = {"state_dict": {mapping[k]: v for k, v in state.items()}, "meta": meta}
        with atomic_file(out) as f:
            torch.save(payload, f)
        written = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    try:
        check_conversion(state, written, mapping)
    except ValueError as e:
        out.unlink(missing_ok=True)
        raise ValueError(f"{out}: the written file failed its check ({e}); removed") from None


def export_backbone(
    run_or_ckpt: str | Path, out: str | Path, branch: str = "auto", fmt: str = "timm"
) -> dict:
    """Write the backbone (and its description) in format ``fmt`` (:data:`FORMATS`); returns the
    description, whose ``load`` is the snippet that loads it. ``branch`` ``auto`` is the branch
    ``ssl-cli eval`` reports by default (:func:`train.eval.features.resolve_branches`: the momentum
    encoder of every ssl-cli run)."""

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    ckpt_path = resolve_checkpoint(run_or_ckpt)
    out = Path(out)
    tv_path = out.with_name(out.stem + "_torchvision" + out.suffix)
    json_path = out / HF_INFO if fmt == "hf" else Path(str(out) + ".json")
    targets = [out, json_path] + ([out / n for n in HF_FILES] if fmt == "hf" else [tv_path])
    check_export_target(ckpt_path, targets)
    check_export_out(out, fmt)

    checkpoint = load_checkpoint(ckpt_path)
    if branch not in ("online", "target"):
        if branch != "auto":
            raise ValueError(f"unknown branch {branch!r}; choose one of auto, online, target")
        branch = resolve_branches(checkpoint, "auto")[0]
    state = backbone_state_dict(checkpoint, branch)
    model_cfg = checkpoint["config"]["model"]
    arch = model_cfg["backbone"]
    kwargs = timm_kwargs(model_cfg)
    # prove the promise before writing: a fresh timm model takes these tensors strictly
    reference = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    reference.load_state_dict(state, strict=True)
    input_size = model_cfg.get("img_size") or checkpoint["config"].get("data", {}).get("size")
    torchvision_layout = fmt != "hf" and _check_torchvision_layout(arch, state)
    mapping = (
        convert_for(fmt, arch, state, torchvision_layout) if fmt in DETECTION_FORMATS else None
    )
    info, metadata = _describe(
        checkpoint, ckpt_path, fmt, branch, out, reference, torchvision_layout, mapping
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        config = hf_config(reference, kwargs, int(input_size))
        _write_hf(
            out,
            state,
            config,
            info,
            metadata,
            check=lambda folder: _check_hf_folder(folder, reference, int(input_size)),
        )
    elif mapping is not None:
        _write_detection(out, fmt, state, mapping, info)
        info["files"] = {fmt: out.name}
        info["keys"] = mapping
        info["sha256"] = sha256_file(out)
        atomic_write_json(json_path, info)
    else:
        _write_state(out, fmt, state, metadata)
        if torchvision_layout:
            _write_state(tv_path, fmt, state, metadata)
            info["files"]["torchvision"] = tv_path.name
        info["sha256"] = sha256_file(out)
        atomic_write_json(json_path, info)
    return info


def _describe(
    checkpoint: dict,
    ckpt_path: Path,
    fmt: str,
    branch: str,
    out: Path,
    reference: torch.nn.Module,
    torchvision_layout: bool,
    mapping: dict | None,
) -> tuple[dict, dict]:
    """The export's description (``OUT.json``: what it holds, where from, the snippet that loads
    it) and the string metadata a safetensors file carries."""
    model_cfg = checkpoint["config"]["model"]
    arch = model_cfg["backbone"]
    kwargs = timm_kwargs(model_cfg)
    input_size = model_cfg.get("img_size") or checkpoint["config"].get("data", {}).get("size")
    step = int(checkpoint["step"])
    metadata = {
        "arch": arch,
        "timm_kwargs": json.dumps(kwargs),
        "branch": branch,
        "method": str(checkpoint.get("method")),
        "step": str(step),
        "format": "pt",
    }
    info = {
        "arch": arch,
        "timm_kwargs": kwargs,
        "input_size": input_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "format": fmt,
        "branch": branch,
        "method": checkpoint.get("method"),
        "step": step,
        "checkpoint": str(ckpt_path),
        "files": (
            {"config": "config.json", "weights": "model.safetensors"}
            if fmt == "hf"
            else {"timm": out.name}
        ),
        "load": (
            load_snippet(fmt, arch, kwargs, out)
            if mapping is None
            else detection_snippet(
                fmt,
                arch,
                kwargs,
                str(out.resolve()),
                not torchvision_layout,
                None if torchvision_layout else vit_shape(reference),
            )
        ),
    }
    return info, metadata


def _write_state(path: Path, fmt: str, state: dict, metadata: dict) -> None:
    """A plain state dict at ``path``, atomically: safetensors (with ``metadata``) or torch."""
    if fmt == "safetensors":
        atomic_write_bytes(path, _safetensors_bytes(state, metadata))
    else:
        with atomic_file(path) as f:
            torch.save(state, f)
