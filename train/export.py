"""``ssl-cli export``: the pretrained backbone alone, in timm's key layout.

``OUT`` holds a plain state dict that ``timm.create_model(arch, num_classes=0, **kwargs)``
loads with ``load_state_dict(strict=True)``, no renaming; ``OUT`` with ``.json`` appended records
the architecture, its ``create_model`` keyword arguments, the input size, the run and the step.
For ResNets a second file, ``*_torchvision.pth``, holds the same tensors in torchvision's layout
(``torchvision.models.resnet50()``: every key but ``fc.*``), ready for a detection backbone.

Refused before anything is written (:func:`check_export_target`): an ``OUT`` (or one of the
files written next to it) inside the run's ``checkpoints/`` folder, or over an existing
pretraining checkpoint anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_config

BRANCHES = {"online": "online.backbone.", "target": "target.backbone."}


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    path = Path(run_or_ckpt)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint in {path / 'checkpoints'}")
        return found
    raise FileNotFoundError(f"{path}: neither a run directory nor a checkpoint file")


def _is_checkpoint(path: Path) -> bool:
    try:
        read_checkpoint_config(path)
    except (ValueError, OSError, KeyError):
        return False
    return True


def check_export_target(ckpt_path: Path, targets: list[Path]) -> None:
    """``ValueError`` when a file to write is in the run's checkpoint folder of the checkpoint
    being exported (``RUN/checkpoints/``) or would replace a pretraining checkpoint."""
    ckpt_dir = ckpt_path.resolve().parent
    for target in targets:
        resolved = target.resolve()
        if resolved.parent == ckpt_dir and ckpt_dir.name == "checkpoints":
            raise ValueError(
                f"refusing to write {target}: it is in the checkpoint folder {ckpt_path.parent} "
                "of the run being exported (the trainer owns it); choose another --out"
            )
        if resolved.is_file() and _is_checkpoint(resolved):
            raise ValueError(
                f"refusing to overwrite {target}: it is a pretraining checkpoint; choose another "
                "--out"
            )


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


def timm_kwargs(model_cfg: dict) -> dict:
    """``timm.create_model`` keyword arguments that rebuild the pretrained backbone."""
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    for key in ("img_size", "patch_size"):
        if model_cfg.get(key) is not None:
            kwargs[key] = model_cfg[key]
    return kwargs


def export_backbone(run_or_ckpt: str | Path, out: str | Path, branch: str = "online") -> dict:
    """Write the backbone (and its description); returns the description."""
    import timm

    ckpt_path = resolve_checkpoint(run_or_ckpt)
    checkpoint = load_checkpoint(ckpt_path)
    state = backbone_state_dict(checkpoint, branch)
    model_cfg = checkpoint["config"]["model"]
    arch = model_cfg["backbone"]
    kwargs = timm_kwargs(model_cfg)
    # prove the promise before writing: a fresh timm model takes these tensors strictly
    timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).load_state_dict(
        state, strict=True
    )

    out = Path(out)
    resnet = arch.startswith(("resnet", "resnext", "wide_resnet"))
    tv_path = out.with_name(out.stem + "_torchvision.pth")
    check_export_target(ckpt_path, [out, Path(str(out) + ".json"), *([tv_path] if resnet else [])])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    files = {"timm": out.name}
    if resnet:
        import torchvision

        tv_name = getattr(torchvision.models, arch, None)
        if tv_name is not None:
            missing, unexpected = tv_name().load_state_dict(state, strict=False)
            if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
                raise ValueError(
                    f"{arch}: keys do not map onto torchvision's layout ({unexpected or missing})"
                )
            torch.save(state, tv_path)
            files["torchvision"] = tv_path.name
    input_size = model_cfg.get("img_size") or checkpoint["config"].get("data", {}).get("size")
    info = {
        "arch": arch,
        "timm_kwargs": kwargs,
        "input_size": input_size,
        "branch": branch,
        "method": checkpoint.get("method"),
        "step": int(checkpoint["step"]),
        "checkpoint": str(ckpt_path),
        "files": files,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "load": f"timm.create_model({arch!r}, num_classes=0"
        + "".join(f", {k}={v!r}" for k, v in kwargs.items())
        + f").load_state_dict(torch.load({out.name!r}))",
    }
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1) + "\n")
    return info
