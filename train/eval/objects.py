"""Object-level evaluation of a frozen backbone on shards with ground-truth boxes.

Two probes, each beside two references computed in the same run:

- **Object probe**: every (non-crowd) ground-truth box of an image gets a feature from the
  backbone's last feature map by RoIAlign (:func:`roi_features`: torchvision's ``roi_align``,
  ``aligned=True``, averaged over its ``7 x 7`` output); the train objects are the memory bank
  of a weighted kNN (k=20, T=0.07, DINO) and the training set of the fast linear probe
  (:func:`train.eval.probes.train_linear_probe`), the val objects are scored: top-1 over the object
  classes.
- **Multi-label image probe**: a one-vs-rest logistic classifier (linear, binary
  cross-entropy per class, :func:`train_multilabel_probe`) on the pooled image feature (the
  backbone's own pooling, as ``ssl-cli eval knn``), scored by macro average precision over the
  classes present in val (:func:`mean_average_precision`).
- **References**: the same architecture at random initialisation (seed :data:`RANDOM_SEED`,
  the same weights every run, :func:`random_backbone`) and raw pixels (:func:`pixel_features`:
  the box resampled to ``8 x 8`` and flattened; the whole image pooled to ``8 x 8`` for the
  multi-label probe).

The feature map (:func:`feature_map`) is the last one of the backbone: a timm ViT's patch
tokens after the final norm, laid out on their grid (no class token, no register tokens); a
CNN's ``forward_features`` (a ResNet's C5, stride 32). Inputs are whole images resized to a
square (:class:`pipeline.eval_objects.ObjectLoader`), boxes scaled with them.

Where this differs from detection practice (Faster R-CNN / Mask R-CNN heads, torchvision
``MultiScaleRoIAlign``): one feature map, no FPN and no multi-scale assignment of boxes to
levels, no trained box head (the RoI output is averaged into one vector), and the maps are
tiny at our input sizes: a 32-px input gives a ResNet one C5 cell and a ViT with patch 4 an
8 x 8 grid, so a small object covers one or two cells and its feature is mostly its
neighbourhood's. Nothing is fine-tuned: this measures what the frozen features already hold
about objects, not detection quality.

:func:`evaluate_objects` runs it on backbones in memory (what ``ssl-cli bench quality`` calls);
:func:`objects_eval` on a checkpoint, writing the report (``ssl-cli eval objects``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.eval_objects import GroundTruth, ObjectLoader
from shards.atomic import atomic_write_bytes
from train.distributed import resolve_device
from train.eval.classify import report_path
from train.eval.features import fit_input_size, load_backbones
from train.eval.probes import (
    LinearProbeConfig,
    knn_accuracy,
    probe_accuracy,
    probe_head,
    probe_threads,
    train_linear_probe,
)
from train.models import build_backbone
from train.runinfo import run_info

__all__ = [
    "BOX_FEATURES",
    "PIXEL_SIZE",
    "RANDOM_SEED",
    "ROI_OUTPUT",
    "ROI_SAMPLING",
    "ObjectFeatures",
    "average_precision",
    "evaluate_objects",
    "extract_object_features",
    "feature_map",
    "mean_average_precision",
    "objects_eval",
    "pixel_features",
    "random_backbone",
    "roi_features",
    "train_multilabel_probe",
    "vit_token_grid",
]

# RoIAlign output per box, averaged afterwards: 7 x 7 bins of 2 x 2 bilinear samples, the box
# pooler of torchvision's Faster R-CNN (MultiScaleRoIAlign(output_size=7, sampling_ratio=2)).
# Averaged, that is a bilinear-weighted mean over 14 x 14 points spread over the box: enough
# for every cell a box covers to be sampled on the largest grid we evaluate (14 x 14: ViT/16
# at 224 px), and on a box of one or two cells it is the bilinear blend of those cells.
ROI_OUTPUT = 7
ROI_SAMPLING = 2

# Raw-pixel reference: each box resampled to 8 x 8 (area average: RoIAlign's adaptive
# sampling, ceil(box / 8) points per bin), 192 values; the whole image pooled to 8 x 8 for the
# multi-label probe. Our choice: a thumbnail keeps an object's colour and coarse shape while a
# shift of a few pixels changes it little (tiny-image kNN baselines, Torralba et al. 2008).
PIXEL_SIZE = 8

# How a box gets its feature (``box_features``): ``roi`` pools the box from the whole image's
# last feature map (detection practice); ``crop`` cuts the box out of the image, resizes it to
# the training view size and takes the backbone's pooled feature of that crop (what a view of
# pretraining looked like: a small CNN at 32 px has a 1 x 1 C5 map, where RoIAlign gives every
# object of an image the same feature).
BOX_FEATURES = ("roi", "crop")

# The random-init reference: the same weights every run (our choice of seed).
RANDOM_SEED = 0

RANDOM_ROW, PIXEL_ROW = "random_init", "raw_pixels"


# ------------------------------------------------------------------------------- features


def vit_token_grid(tokens: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """ViT tokens ``[B, P + gh*gw, D]`` -> patch feature map ``[B, D, gh, gw]``.

    The ``P`` prefix tokens (class token, register tokens) are dropped; patch tokens are in
    row-major order of the grid (timm ``PatchEmbed``: ``flatten(2).transpose(1, 2)`` of the
    ``[B, D, gh, gw]`` convolution output), so token ``P + r*gw + c`` is cell ``(r, c)``.
    """
    gh, gw = grid
    b, n, d = tokens.shape
    if n != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"{n} tokens are not {num_prefix_tokens} prefix tokens + a {gh}x{gw} patch grid"
        )
    return tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(b, d, gh, gw)


def feature_map(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``images [B, 3, S, S]`` -> (last feature map ``[B, D, h, w]``, pooled ``[B, D]``), one
    forward pass of a timm backbone.

    ViT (tokens ``[B, T, D]`` with a ``patch_embed``): :func:`vit_token_grid` of
    ``forward_features`` (after the final norm), grid ``S / patch``. CNN: ``forward_features``
    itself (NCHW; NHWC models, ``output_fmt == "NHWC"``, are permuted). Pooled: timm's
    ``forward_head(..., pre_logits=True)`` of the same output, equal to ``backbone(images)``
    for a ``num_classes=0`` model (the class token / global average pool of ``ssl-cli eval
    knn``).
    """
    out = backbone.forward_features(images)
    pooled = backbone.forward_head(out, pre_logits=True)
    if out.ndim == 3:
        patch_embed = getattr(backbone, "patch_embed", None)
        if patch_embed is None:
            raise ValueError(
                f"{type(backbone).__name__}: tokens {tuple(out.shape)} without a patch_embed"
            )
        ph, pw = (int(v) for v in patch_embed.patch_size)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        return vit_token_grid(out, prefix, grid), pooled
    if out.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            out = out.permute(0, 3, 1, 2)
        return out, pooled
    raise ValueError(
        f"{type(backbone).__name__}: forward_features gives {tuple(out.shape)}, neither ViT "
        "tokens [B, T, D] nor a feature map [B, C, H, W]"
    )


def _rois(boxes: Tensor, owner: Tensor) -> Tensor:
    """``[K, 5]`` (image in the batch, x0, y0, x1, y1): torchvision's RoI format."""
    return torch.cat([owner.to(boxes.dtype)[:, None], boxes], dim=1)


def roi_features(
    fmap: Tensor,
    boxes: Tensor,
    owner: Tensor,
    image_size: int,
    output_size: int = ROI_OUTPUT,
    sampling_ratio: int = ROI_SAMPLING,
) -> Tensor:
    """One feature per box: ``torchvision.ops.roi_align`` on ``fmap [B, D, h, w]``, averaged
    over its ``output_size x output_size`` bins -> ``[K, D]``.

    ``boxes [K, 4]``: float xyxy in pixels of the ``image_size x image_size`` input, right and
    bottom edges exclusive (pixel ``i`` spans ``[i, i + 1)``); ``owner [K]``: each box's image
    in the batch. Spatial scale ``w / image_size`` (1 / stride: 1/16 for ViT/16, 1/32 for C5).
    ``aligned=True`` (Detectron2's correction): cell ``j`` spans input pixels ``[j*stride,
    (j+1)*stride)`` and its value sits at its centre, so a box that covers cells ``a..b`` with
    half a cell to spare on each side samples only those cells.
    """
    from torchvision.ops import roi_align  # torchvision: 2 s to import, needed here only

    h, w = fmap.shape[-2:]
    if h != w:
        raise ValueError(f"a square feature map is expected, got {h}x{w}")
    if len(boxes) == 0:
        return fmap.new_zeros(0, fmap.shape[1])
    pooled = roi_align(
        fmap.float(),
        _rois(boxes.float(), owner),
        output_size=output_size,
        spatial_scale=w / image_size,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )  # [K, D, out, out]
    return pooled.mean(dim=(2, 3))


def crop_boxes(images: Tensor, boxes: Tensor, owner: Tensor, crop_size: int) -> Tensor:
    """Each box cut out of ``images [B, 3, S, S]`` and resampled to ``crop_size`` ->
    ``[K, 3, crop_size, crop_size]`` (RoIAlign with adaptive sampling: a bilinear resize with
    area averaging where the box is larger than the crop)."""
    from torchvision.ops import roi_align  # torchvision: 2 s to import, needed here only

    if len(boxes) == 0:
        return images.new_zeros(0, images.shape[1], crop_size, crop_size)
    return roi_align(
        images.float(),
        _rois(boxes.float(), owner),
        output_size=crop_size,
        spatial_scale=1.0,
        sampling_ratio=0,
        aligned=True,
    )


def pixel_features(images: Tensor, boxes: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """The raw-pixel reference: (each box resampled to ``PIXEL_SIZE x PIXEL_SIZE`` from
    ``images [B, 3, S, S]``, flattened ``[K, 3*PIXEL_SIZE**2]``; each image area-pooled to the
    same size ``[B, 3*PIXEL_SIZE**2]``). RoIAlign with adaptive sampling (``sampling_ratio=0``:
    ``ceil(box side / PIXEL_SIZE)`` points per bin and side), so a bin is about the mean of its
    pixels."""
    from torchvision.ops import roi_align  # torchvision: 2 s to import, needed here only

    images = images.float()
    whole = F.adaptive_avg_pool2d(images, PIXEL_SIZE).flatten(1)
    if len(boxes) == 0:
        return images.new_zeros(0, whole.shape[1]), whole
    crops = roi_align(
        images,
        _rois(boxes.float(), owner),
        output_size=PIXEL_SIZE,
        spatial_scale=1.0,
        sampling_ratio=0,
        aligned=True,
    )
    return crops.flatten(1), whole


@dataclass
class ObjectFeatures:
    """Features of one shard set for one row (a backbone or a reference)."""

    objects: Tensor  # [K, D] float32: one per non-crowd ground-truth box
    classes: Tensor  # [K] int64 contiguous class index
    images: Tensor  # [M, D] float32: pooled feature of each annotated image
    targets: Tensor  # [M, C] float32 multi-hot image labels
    root: str


def random_backbone(model_cfg: Any, size: int | None = None, seed: int = RANDOM_SEED) -> nn.Module:
    """The architecture of ``model_cfg`` (:class:`~train.config.ModelConfig`) at random init,
    seeded (the caller's random state is left as it was), in eval mode; ``size``: input side
    (:func:`train.eval.features.fit_input_size`)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(model_cfg)
    if size is not None:
        fit_input_size(backbone, size)
    return backbone.eval()


@torch.no_grad()
def extract_object_features(
    backbones: Mapping[str, nn.Module | None],
    loader: Any,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
    box_features: str = "roi",
    crop_size: int | None = None,
) -> dict[str, ObjectFeatures]:
    """Object and image features of every annotated image of an
    :class:`~pipeline.eval_objects.ObjectLoader`, for each of ``backbones`` in one pass over
    the images (decoded once). A ``None`` backbone is the raw-pixel reference
    (:func:`pixel_features`). Backbones run in eval mode (restored afterwards).
    ``box_features``: ``roi`` (:func:`roi_features` on the whole image's map) or ``crop``
    (the pooled feature of each box cut out at ``crop_size``, :func:`crop_boxes`)."""
    if box_features not in BOX_FEATURES:
        raise ValueError(f"unknown box features {box_features!r}; choose one of {BOX_FEATURES}")
    if box_features == "crop" and not crop_size:
        raise ValueError("box features 'crop' need a crop size")

    modes = {name: b.training for name, b in backbones.items() if b is not None}
    for b in backbones.values():
        if b is not None:
            b.eval()
    objects: dict[str, list[Tensor]] = {name: [] for name in backbones}
    images: dict[str, list[Tensor]] = {name: [] for name in backbones}
    classes = []
    try:
        for batch in tqdm(loader, desc=loader.location.name, disable=not progress):
            x, boxes, owner = batch["image"], batch["boxes"], batch["owner"]
            for name, backbone in backbones.items():
                if backbone is None:
                    obj, whole = pixel_features(x, boxes, owner)
                elif box_features == "crop":
                    small = x
                    if x.shape[-1] != crop_size:  # the backbone takes crop_size inputs
                        small = F.interpolate(
                            x.float(), size=crop_size, mode="bilinear", antialias=True
                        )
                    with autocast() if autocast is not None else contextlib.nullcontext():
                        whole = backbone(small)
                        obj = (
                            backbone(crop_boxes(x, boxes, owner, crop_size))
                            if len(boxes)
                            else whole.new_zeros(0, whole.shape[1])
                        )
                else:
                    with autocast() if autocast is not None else contextlib.nullcontext():
                        fmap, whole = feature_map(backbone, x)
                    obj = roi_features(fmap.float(), boxes, owner, loader.size)
                objects[name].append(obj.float())
                images[name].append(whole.float())
            classes.append(batch["classes"])
    finally:
        for name, was_training in modes.items():
            backbones[name].train(was_training)
    gt = loader.ground_truth
    device = loader.device
    targets = torch.from_numpy(gt.image_targets()).to(device)
    labels = torch.cat(classes) if classes else torch.zeros(0, dtype=torch.int64, device=device)
    out = {}
    for name in backbones:
        out[name] = ObjectFeatures(
            objects=torch.cat(objects[name]) if objects[name] else torch.zeros(0, 0),
            classes=labels,
            images=torch.cat(images[name]) if images[name] else torch.zeros(0, 0),
            targets=targets,
            root=str(loader.location),
        )
    return out


# ---------------------------------------------------------------------------------- metrics


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Average precision of one class: ``scores [N]``, binary ``targets [N]`` -> AP in [0, 1].

    Non-interpolated AP, the area under the step precision-recall curve: ``sum_n (R_n -
    R_{n-1}) P_n`` over the distinct score thresholds in decreasing order (scikit-learn's
    ``average_precision_score``). Tied scores form one threshold, so the order of tied samples
    does not matter. PASCAL VOC (11-point / all-point) and COCO (101-point) interpolate the
    precision; we do not, as scikit-learn. ``ValueError`` when there is no positive.
    """
    s = scores.detach().double().cpu().reshape(-1)
    t = targets.detach().double().cpu().reshape(-1)
    positives = float(t.sum())
    if positives <= 0:
        raise ValueError("average precision needs at least one positive")
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], t[order]
    tp = torch.cumsum(t, 0)
    fp = torch.cumsum(1 - t, 0)
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).reshape(-1), torch.tensor([len(s) - 1])])
    tp, fp = tp[last], fp[last]  # counts at the end of each group of tied scores
    precision = tp / (tp + fp)
    recall = tp / positives
    step = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((step * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> tuple[float, dict[int, float]]:
    """Macro mean of :func:`average_precision` over the classes with at least one positive in
    ``targets``: ``scores [N, C]``, ``targets [N, C]`` -> (mAP in percent, ``{class: AP}`` in
    percent). ``ValueError`` when no class has a positive."""
    present = [c for c in range(targets.shape[1]) if float(targets[:, c].sum()) > 0]
    if not present:
        raise ValueError("mean average precision: no class has a positive")
    aps = {c: 100.0 * average_precision(scores[:, c], targets[:, c]) for c in present}
    return sum(aps.values()) / len(aps), aps


def train_multilabel_probe(
    features: Tensor, targets: Tensor, config: LinearProbeConfig = LinearProbeConfig()
) -> nn.Module:
    """One-vs-rest logistic classifiers on frozen ``features [N, D]`` for multi-hot ``targets
    [N, C]``: :func:`~train.eval.probes.probe_head` (non-affine BatchNorm + Linear) trained with
    binary cross-entropy per class, summed over classes and averaged over the batch (so each
    class's classifier steps like the softmax probe's), SGD with momentum, cosine lr: the
    recipe of the fast linear probe (:class:`~train.eval.probes.LinearProbeConfig`). Returns the
    head in eval mode; the caller's random state is left as it was. On the CPU it runs on one
    thread (:func:`~train.eval.probes.probe_threads`)."""
    with probe_threads(features.device):
        return _train_multilabel_probe(features, targets, config)


def _train_multilabel_probe(
    features: Tensor, targets: Tensor, config: LinearProbeConfig
) -> nn.Module:
    x, y = features.float(), targets.float()
    lr = config.lr * config.batch_size / 256
    steps_per_epoch = max(1, math.ceil(x.shape[0] / config.batch_size))
    total = config.epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        probe = probe_head(x.shape[1], y.shape[1]).to(x.device)
        opt = torch.optim.SGD(
            probe.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        probe.train()
        step = 0
        for _ in range(config.epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0], config.batch_size):
                idx = order[start : start + config.batch_size]
                if idx.numel() < 2:  # BatchNorm needs two samples
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                logits = probe(x[idx])
                loss = F.binary_cross_entropy_with_logits(logits, y[idx], reduction="sum")
                loss = loss / idx.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    return probe.eval()


# ------------------------------------------------------------------------------ evaluation


def _check_sets(train_gt: Any, val_gt: Any) -> None:
    """Same categories on both sides, and objects on both."""
    if train_gt.categories != val_gt.categories:
        a, b = dict(train_gt.categories), dict(val_gt.categories)
        only_train = sorted(set(a.items()) - set(b.items()))[:5]
        only_val = sorted(set(b.items()) - set(a.items()))[:5]
        raise ValueError(
            f"{train_gt.root} and {val_gt.root} have different annotation categories "
            f"({len(a)} and {len(b)}; only in train: {only_train}, only in val: {only_val}); "
            "build both from annotation files with the same categories"
        )
    for gt in (train_gt, val_gt):
        if gt.num_objects == 0:
            raise ValueError(
                f"{gt.root}: no objects to evaluate ({gt.num_images} annotated images, "
                f"{gt.num_crowd} crowd boxes left out, {gt.num_unannotated} images without "
                "an annotation entry)"
            )


def _score_row(
    bank: ObjectFeatures,
    queries: ObjectFeatures,
    num_classes: int,
    k: int,
    temperature: float,
    probe: LinearProbeConfig,
) -> dict:
    """Object kNN, object linear probe and image mAP of one row (features of both sets)."""
    knn = knn_accuracy(
        bank.objects, bank.classes, queries.objects, queries.classes, num_classes, k, temperature
    )
    device = bank.objects.device
    # train_linear_probe seeds torch's global generator: keep the caller's state
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        with torch.enable_grad():
            head = train_linear_probe(bank.objects, bank.classes, num_classes, probe)
            multi = train_multilabel_probe(bank.images, bank.targets, probe)
    linear = probe_accuracy(head, queries.objects, queries.classes)
    with torch.no_grad():
        scores = multi(queries.images.float())
    mean_ap, aps = mean_average_precision(scores, queries.targets)
    return {
        "object_knn_top1": knn.top1,
        "object_linear_top1": linear.top1,
        "image_map": mean_ap,
        "image_ap": aps,
        "feature_dim": int(bank.objects.shape[1]),
    }


def evaluate_objects(
    backbones: nn.Module | Mapping[str, nn.Module],
    cfg: Any,
    train: str | Path,
    val: str | Path,
    *,
    size: int | None = None,
    references: bool = True,
    k: int = 20,
    temperature: float = 0.07,
    probe: LinearProbeConfig = LinearProbeConfig(),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    box_features: str = "roi",
    crop_size: int | None = None,
) -> dict:
    """Object probe and multi-label image probe of frozen ``backbones`` on shards with ground
    truth (module docstring); the function ``ssl-cli bench quality`` calls.

    ``box_features``: ``roi`` (default; RoIAlign on the map of the whole image at ``size``) or
    ``crop`` (each box cut from the image at ``size`` and resized to ``crop_size``, default
    ``cfg.data.size``; the backbones then take ``crop_size`` inputs, and the image probe sees
    the whole image resized to ``crop_size`` too).

    Args:
        backbones: one timm backbone (reported as ``"backbone"``) or ``{row name: backbone}``
            (e.g. ``{"online": ..., "target": ...}``), already at input ``size`` (ViTs:
            :func:`train.eval.features.fit_input_size`); moved to ``device``.
        cfg: the run's :class:`~train.config.TrainConfig` (``model``: the random-init
            reference's architecture; ``data.size``: the default input size).
        train, val: shard folders built with ``--annotations`` and the same categories: the
            kNN bank / probes' training set, and the scored set.
        references: add the rows ``random_init`` (:func:`random_backbone`) and
            ``raw_pixels`` (:func:`pixel_features`).
        k, temperature: the weighted kNN (DINO's 20, 0.07); ``probe``: both linear probes.
        batch_size: images per forward pass; ``autocast``: mixed precision of the backbones.
        log: a line per stage; ``None``: silent.

    Returns ``{"rows": {name: {"object_knn_top1", "object_linear_top1" (percent),
    "image_map" (percent), "image_ap" ({category name: AP %}), "feature_dim", "elapsed_s"}},
    "categories", counts of images / objects / crowd boxes per set, "classes_in_val", "size",
    "k", "temperature", "probe", "roi"}``. Raises ``ValueError`` for shards without ground
    truth (:class:`~pipeline.eval_objects.NoGroundTruthError`), different categories, or a set
    without objects.
    """

    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")
    say = log or (lambda _line: None)
    if isinstance(backbones, nn.Module):
        backbones = {"backbone": backbones}
    size = size or cfg.data.size
    if box_features not in BOX_FEATURES:
        raise ValueError(f"unknown box features {box_features!r}; choose one of {BOX_FEATURES}")
    crop_size = (crop_size or cfg.data.size) if box_features == "crop" else None
    model_size = crop_size or size  # the input side the backbones take
    device = torch.device(device)
    models = _rows_to_score(backbones, cfg, references, model_size, device)
    common = {"size": size, "batch_size": batch_size, "device": device, "num_threads": num_threads}
    with ObjectLoader(train, **common) as bank_loader, ObjectLoader(val, **common) as query_loader:
        train_gt, val_gt = bank_loader.ground_truth, query_loader.ground_truth
        _check_sets(train_gt, val_gt)
        features = {}
        for part, loader in (("train", bank_loader), ("val", query_loader)):
            gt = loader.ground_truth
            started = time.perf_counter()
            features[part] = extract_object_features(
                models, loader, autocast, progress, box_features, crop_size
            )
            say(
                f"{part}: {gt.num_objects} objects in {gt.num_images} images, features of "
                f"{', '.join(models)} in {time.perf_counter() - started:.1f} s"
            )
    names = [name for _, name in train_gt.categories]
    rows = {}
    for name in models:
        started = time.perf_counter()
        row = _score_row(
            features["train"][name], features["val"][name], len(names), k, temperature, probe
        )
        row["image_ap"] = {names[c]: ap for c, ap in row["image_ap"].items()}
        row["elapsed_s"] = round(time.perf_counter() - started, 3)
        rows[name] = row
        say(
            f"{name}: object kNN {row['object_knn_top1']:.2f}%, object linear "
            f"{row['object_linear_top1']:.2f}%, image mAP {row['image_map']:.2f}%"
        )
    settings = {
        "size": size,
        "k": k,
        "temperature": temperature,
        "probe": asdict(probe),
        "box_features": box_features,
        "crop_size": crop_size,
    }
    return _objects_report(rows, train, val, train_gt, val_gt, settings)


def _rows_to_score(
    backbones: Mapping[str, nn.Module],
    cfg: Any,
    references: bool,
    model_size: int,
    device: torch.device,
) -> dict[str, nn.Module | None]:
    """Row name -> backbone on ``device``: the given ones, and with ``references`` the random
    init (:func:`random_backbone` at ``model_size``) and raw pixels (``None``)."""
    models: dict[str, nn.Module | None] = dict(backbones)
    reserved = {RANDOM_ROW, PIXEL_ROW} & set(models)
    if reserved and references:
        raise ValueError(f"row names {sorted(reserved)} are the references' own")
    if references:
        models[RANDOM_ROW] = random_backbone(cfg.model, model_size)
        models[PIXEL_ROW] = None
    for backbone in models.values():
        if backbone is not None:
            backbone.to(device)
    return models


def _objects_report(
    rows: dict,
    train: Any,
    val: Any,
    train_gt: GroundTruth,
    val_gt: GroundTruth,
    settings: dict,
) -> dict:
    """:func:`evaluate_objects`'s report: the rows, the two sets' counts, the settings and the
    RoIAlign parameters."""
    names = [name for _, name in train_gt.categories]
    return {
        "rows": rows,
        "train": str(train),
        "val": str(val),
        "categories": [{"id": i, "name": n} for i, n in train_gt.categories],
        "num_classes": len(names),
        "classes_in_val": int((val_gt.image_targets().sum(0) > 0).sum()),
        "n_train_images": train_gt.num_images,
        "n_val_images": val_gt.num_images,
        "n_train_objects": train_gt.num_objects,
        "n_val_objects": val_gt.num_objects,
        "crowd_excluded": {"train": train_gt.num_crowd, "val": val_gt.num_crowd},
        "unannotated_excluded": {"train": train_gt.num_unannotated, "val": val_gt.num_unannotated},
        **settings,
        "roi": {
            "op": "torchvision.ops.roi_align",
            "aligned": True,
            "output_size": ROI_OUTPUT,
            "sampling_ratio": ROI_SAMPLING,
            "reduce": "mean",
            "pixels_output_size": PIXEL_SIZE,
            "random_init_seed": RANDOM_SEED,
        },
    }


def objects_eval(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    k: int = 20,
    temperature: float = 0.07,
    probe: LinearProbeConfig = LinearProbeConfig(),
    size: int | None = None,
    batch_size: int = 256,
    box_features: str = "roi",
    crop_size: int | None = None,
    device: str = "auto",
    branch: str = "auto",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict:
    """:func:`evaluate_objects` on the backbone(s) of ``branch`` of a checkpoint (a run
    directory: its newest), at ``size`` (default: the checkpoint's ``data.size``), with both
    references. Writes the report to ``RUN/eval/objects[-target|-both]-step-N.json``
    (:func:`train.eval.classify.report_path`) or ``out``, and returns it: the fields of
    :func:`evaluate_objects` plus ``eval`` ("objects"), checkpoint, step, method, backbone,
    resolved ``branch``, ``branch_requested``, ``precision``, ``elapsed_s``, ``run``, ``path``
    (and ``input_size_change`` when a ViT's position embedding was resampled). One process."""

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    resolved = resolve_device(device)
    if precision == "bf16" and resolved.type != "cuda":
        raise ValueError("precision 'bf16' (autocast) needs a CUDA GPU; use fp32")
    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if precision == "bf16"
        else None
    )
    started = time.perf_counter()
    backbones, meta = load_backbones(checkpoint, branch)
    cfg = meta["config"]
    size = size or cfg.data.size
    if box_features == "crop":
        crop_size = crop_size or cfg.data.size
    changes = [fit_input_size(b, crop_size or size) for b in backbones.values()]
    report = evaluate_objects(
        backbones,
        cfg,
        train,
        val,
        size=size,
        box_features=box_features,
        crop_size=crop_size,
        k=k,
        temperature=temperature,
        probe=probe,
        batch_size=batch_size,
        device=resolved,
        num_threads=num_threads,
        autocast=autocast,
        log=log,
        progress=progress,
    )
    resolved_branch = meta["branches"][0] if len(meta["branches"]) == 1 else "both"
    report = {
        "eval": "objects",
        **report,
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "method": meta["method"],
        "backbone": cfg.model.backbone,
        "branch": resolved_branch,
        "branch_requested": meta["branch_requested"],
        "precision": precision,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "run": run_info(resolved, 1),
    }
    if changes[0] is not None:
        report["input_size_change"] = changes[0]
    path = (
        Path(out)
        if out
        else report_path(meta["checkpoint"], "objects", meta["step"], resolved_branch)
    )
    report["path"] = str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())
    return report
