"""Frozen backbone features of a checkpoint over a labelled shard set.

- :func:`load_backbone` / :func:`load_backbones`: the timm backbone(s) of a run's checkpoint
  (online or momentum / EMA target branch; ``auto``: the target when the checkpoint holds one,
  :func:`resolve_branches`), with its config (so the input size is the checkpoint's
  ``data.size``); :func:`fit_input_size`: a ViT evaluated at another size gets its position
  embedding resampled (timm's ``set_input_size``).
- :func:`extract_features`: ``[N, D]`` features, labels and rows of every sample of a shard set
  through :class:`pipeline.eval.EvalLoader` (centre crop, DALI, GPU or CPU). Under DDP every
  rank extracts its contiguous part of the rows and the parts are gathered, so every rank ends
  with the whole set in row order.
- :class:`KNNMonitor`: the periodic kNN of pretraining (``eval.every``): keeps the two eval
  loaders open between evaluations.

The backbone runs in eval mode (BatchNorm running statistics, no drop path) and under
``torch.no_grad``; its previous train/eval mode is restored afterwards. Nothing here draws from
torch, numpy or Python random generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.eval import EvalLoader
from shards.location import ShardLocation
from shards.split import split_rows
from train.checkpoint import BRANCHES, backbone_state_dict, load_checkpoint, resolve_checkpoint
from train.distributed import gather_rows
from train.eval.probes import Accuracy, knn_accuracy
from train.models import build_backbone
from train.resolve import resolve_config

__all__ = [
    "BRANCH_CHOICES",
    "Features",
    "KNNMonitor",
    "extract_features",
    "fit_input_size",
    "gather_rows",
    "load_backbone",
    "load_backbones",
    "resolve_branches",
    "split_features",
]

# What ``--branch`` accepts: ``auto`` resolves per checkpoint (:func:`resolve_branches`).
BRANCH_CHOICES = ("auto", "online", "target", "both")


@dataclass
class Features:
    """Features of a whole shard set, rows of ``proposals.parquet`` in order."""

    features: Tensor  # [N, D] float32, on the extraction device
    labels: Tensor  # [N] int64
    num_classes: int  # classes of the shard set (classes.json, else max label + 1)
    root: str  # the shard directory

    def __len__(self) -> int:
        return self.features.shape[0]


def split_features(
    features: Features, val_fraction: float, seed: int = 0
) -> tuple[Features, Features]:
    """One shard set's features cut in two that share no sample: ``round(val_fraction * N)``
    rows, drawn by a fixed permutation of the row indices (``seed``), are the queries, the rest
    the bank. The same shards, fraction and seed give the same split, and the same samples as
    ``ssl-cli shards split`` (:func:`shards.split.split_rows`)."""
    bank_rows, val_rows = split_rows(len(features), val_fraction, seed)
    bank_idx, val_idx = torch.from_numpy(bank_rows), torch.from_numpy(val_rows)

    def take(idx: Tensor) -> Features:
        idx = idx.to(features.features.device)
        return replace(features, features=features.features[idx], labels=features.labels[idx])

    return take(bank_idx), take(val_idx)


def resolve_branches(checkpoint: dict, branch: str = "auto") -> list[str]:
    """The branches ``branch`` names in ``checkpoint`` (a loaded checkpoint dict), in order.

    ``auto``: ``["target"]`` when the checkpoint holds momentum-encoder (target) backbone
    weights, else ``["online"]``. Every method of :mod:`train.methods` trains a momentum
    encoder, so ``auto`` is the target for every ssl-cli checkpoint. Sources: DINO evaluates
    its momentum teacher (``eval_linear.py`` / ``eval_knn.py``: ``--checkpoint_key teacher``);
    the MOS group the momentum encoder too (as the issue behind this default states; not
    checked against MOS code here). Not every reference does: MoCo v3's ``main_lincls.py``
    loads ``module.base_encoder`` (the online encoder) and BYOL keeps the online encoder
    (§3.1); ``online`` reproduces those. ``both``: ``["online", "target"]``. ``online`` /
    ``target``: themselves; a branch the checkpoint lacks is a ``ValueError``.
    """
    if branch not in BRANCH_CHOICES:
        raise ValueError(f"unknown branch {branch!r}; choose one of {', '.join(BRANCH_CHOICES)}")
    present = [
        name
        for name, prefix in BRANCHES.items()
        if any(k.startswith(prefix) for k in checkpoint["model"])
    ]
    if branch == "auto":
        return ["target"] if "target" in present else ["online"]
    wanted = ["online", "target"] if branch == "both" else [branch]
    missing = [b for b in wanted if b not in present]
    if missing:
        raise ValueError(
            f"branch {branch!r}: the checkpoint has no {' / '.join(missing)} backbone weights "
            f"(it holds: {', '.join(present) or 'none'})"
        )
    return wanted


def load_backbones(
    run_or_ckpt: str | Path, branch: str = "auto"
) -> tuple[dict[str, nn.Module], dict]:
    """The backbones of ``branch`` (:func:`resolve_branches`) of a run's newest checkpoint (or
    of a checkpoint file), loaded once: ``{branch name: backbone}`` on the CPU in eval mode,
    and ``{"checkpoint", "step", "method", "branches", "branch_requested", "config"}``
    (config: the resolved :class:`~train.config.TrainConfig`)."""

    path = resolve_checkpoint(run_or_ckpt)
    ckpt = load_checkpoint(path)
    names = resolve_branches(ckpt, branch)
    cfg = resolve_config(ckpt["config"])
    backbones = {}
    for name in names:
        backbone = build_backbone(cfg.model)
        backbone.load_state_dict(backbone_state_dict(ckpt, name), strict=True)
        backbones[name] = backbone.eval()
    info = {
        "checkpoint": str(path),
        "step": int(ckpt["step"]),
        "method": ckpt.get("method", cfg.method),
        "branches": names,
        "branch_requested": branch,
        "config": cfg,
    }
    return backbones, info


def load_backbone(run_or_ckpt: str | Path, branch: str = "auto") -> tuple[nn.Module, dict]:
    """One backbone (:func:`load_backbones` with ``branch`` other than ``both``) and its info,
    with ``"branch"``: the resolved name (``auto`` -> ``target`` for every ssl-cli checkpoint)."""
    if branch == "both":
        raise ValueError("load_backbone returns one branch; use load_backbones for 'both'")
    backbones, info = load_backbones(run_or_ckpt, branch)
    ((name, backbone),) = backbones.items()
    info["branch"] = name
    return backbone, info


def fit_input_size(backbone: nn.Module, size: int) -> str | None:
    """Make ``backbone`` take ``size`` x ``size`` inputs; returns what was changed, or ``None``.

    CNNs (no ``patch_embed``) and ViTs built with ``dynamic_img_size`` take any size: nothing
    to do. A timm ViT with a fixed grid (built for ``model.img_size``) gets its absolute
    position embedding resampled to the new grid, in place, by timm's own
    ``VisionTransformer.set_input_size`` (bicubic, prefix tokens kept), as timm does when it
    loads weights at another resolution. A size that is not a multiple of the patch, or a
    model that cannot change its grid, is a ``ValueError`` naming the sizes it accepts.
    """
    patch_embed = getattr(backbone, "patch_embed", None)
    grid_size = getattr(patch_embed, "img_size", None)
    if grid_size is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    current = tuple(int(v) for v in grid_size)
    if current == (size, size):
        return None
    ph, pw = (int(v) for v in patch_embed.patch_size)
    name = type(backbone).__name__
    if size < max(ph, pw) or size % ph or size % pw:
        sizes = ", ".join(str(ph * k) for k in range(1, 6)) + ", ..."
        raise ValueError(
            f"--size {size}: this {name} cuts {ph}x{pw} patches, so it takes multiples of "
            f"{ph} ({sizes}); it was pretrained at {current[0]}x{current[1]}"
        )
    if not hasattr(backbone, "set_input_size"):
        raise ValueError(
            f"--size {size}: this {name} was pretrained at {current[0]}x{current[1]} and "
            f"cannot change its input size; use --size {current[0]}"
        )
    backbone.set_input_size(img_size=(size, size))
    return (
        f"position embedding resampled from {current[0] // ph}x{current[1] // pw} to "
        f"{size // ph}x{size // pw} patches (pretrained at {current[0]}x{current[1]}, "
        f"evaluated at {size}x{size})"
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Any,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> Features:
    """Run ``backbone`` over every batch of an :class:`~pipeline.eval.EvalLoader` (on the
    loader's device) and gather the ranks' parts: features ``[N, D]`` float32 and labels
    ``[N]`` of the whole shard set, in row order, on every rank.

    ``autocast``: a context factory for mixed precision (features are cast back to float32);
    ``channels_last``: NHWC inputs (CNNs on GPUs).
    """

    was_training = backbone.training
    backbone.eval()
    feats, labels, rows = [], [], []
    try:
        for batch in tqdm(loader, desc=loader.location.name, disable=not progress, leave=False):
            x = batch["image"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                f = backbone(x)
            feats.append(f.float())
            labels.append(batch["label"])
            rows.append(batch["index"])
    finally:
        backbone.train(was_training)
    device = loader.device
    if feats:
        local, local_labels, local_rows = torch.cat(feats), torch.cat(labels), torch.cat(rows)
    else:  # a rank with no rows (more ranks than samples): learn D from a dry run
        dim = _feature_dim(backbone, loader.size, device)
        local = torch.zeros(0, dim, device=device)
        local_labels = torch.zeros(0, dtype=torch.int64, device=device)
        local_rows = torch.zeros(0, dtype=torch.int64, device=device)
    counts = [
        len(part) for part in np.array_split(np.arange(loader.num_samples), loader.world_size)
    ]
    features = gather_rows(local, counts)
    all_rows = gather_rows(local_rows, counts)
    if not torch.equal(all_rows.cpu(), torch.arange(loader.num_samples)):
        raise RuntimeError(
            f"{loader.location.display}: the gathered rows are not every sample in order"
        )
    return Features(
        features, gather_rows(local_labels, counts), loader.num_classes, str(loader.location)
    )


@torch.no_grad()
def _feature_dim(backbone: nn.Module, size: int, device: torch.device) -> int:
    was_training = backbone.training
    backbone.eval()
    try:
        return int(backbone(torch.zeros(1, 3, size, size, device=device)).shape[1])
    finally:
        backbone.train(was_training)


class KNNMonitor:
    """Periodic weighted kNN (DINO) of pretraining: ``monitor(backbone) -> Accuracy`` on
    ``val`` with ``train`` as the memory bank. Every rank calls it (features are gathered);
    every rank gets the same result."""

    def __init__(
        self,
        train: str | Path | ShardLocation,
        val: str | Path | ShardLocation,
        size: int,
        batch_size: int,
        k: int = 20,
        temperature: float = 0.07,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
    ) -> None:

        self.k, self.temperature = k, temperature
        common = {
            "size": size,
            "batch_size": batch_size,
            "rank": rank,
            "world_size": world_size,
            "device": device,
            "num_threads": num_threads,
        }
        self.train = EvalLoader(train, **common)
        try:
            self.val = EvalLoader(val, **common)
        except BaseException:
            self.train.close()
            raise
        self.num_classes = max(self.train.num_classes, self.val.num_classes)

    def __call__(
        self,
        backbone: nn.Module,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        channels_last: bool = False,
    ) -> Accuracy:
        bank = extract_features(backbone, self.train, autocast, channels_last)
        queries = extract_features(backbone, self.val, autocast, channels_last)
        return knn_accuracy(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            self.num_classes,
            k=self.k,
            temperature=self.temperature,
        )

    def close(self) -> None:
        self.train.close()
        self.val.close()
