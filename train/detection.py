"""Backbone weights in the key layouts of the detection frameworks: detectron2 and mmdetection.

Both papers measure transfer by fine-tuning Mask R-CNN on COCO, in detectron2 (MoCo's and
ORL's detection code) or mmdetection. A backbone whose keys do not match loads silently as
random weights there (both load non-strictly), so every conversion here checks itself
(:func:`check_conversion`): every backbone tensor appears exactly once, under its new name,
with its shape.

- **detectron2, ResNets**: the rules of detectron2's ``tools/convert-torchvision-to-d2.py`` and
  MoCo's ``detection/convert-pretrain-to-detectron2.py``: a key without ``layer`` goes under
  ``stem.``; ``layerN`` -> ``res{N+1}``; ``bnK`` -> ``convK.norm``; ``downsample.0`` ->
  ``shortcut``, ``downsample.1`` -> ``shortcut.norm``. The file is a pickle of
  ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``, the
  detectron2 model-zoo form its checkpointer reads as it is.
- **detectron2, ViTs** (ViTDet, ``detectron2/modeling/backbone/vit.py``): timm's ViT keys are
  ViTDet's (``patch_embed.proj``, ``pos_embed``, ``blocks.N.norm1``, ``.attn.qkv``,
  ``.attn.proj``, ``.norm2``, ``.mlp.fc1``, ``.mlp.fc2``), under the module path of ViTDet's
  model, ``backbone.net.``. ViTDet has no class token and no final norm: ``cls_token`` and
  ``norm.*`` are written too (the position embedding keeps the class token's slot, as
  ViTDet's ``pretrain_use_cls_token=True`` expects) and detectron2 reports them unused.
- **mmdetection, ResNets**: mmdet's ``ResNet`` (``style='pytorch'``) has torchvision's key
  names; the file is ``{"state_dict": {name: tensor}, "meta": {...}}``, loaded by
  ``init_cfg=dict(type='Pretrained', checkpoint=FILE)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DETECTION_FORMATS",
    "check_conversion",
    "convert_for",
    "d2_resnet_key",
    "detection_snippet",
    "is_vit_state",
]

DETECTION_FORMATS = ("detectron2", "mmdet")
# the normalisation the views had, in the 0..255 RGB scale both frameworks take
PIXEL_MEAN = [round(255 * m, 3) for m in IMAGENET_MEAN]  # [123.675, 116.28, 103.53]
PIXEL_STD = [round(255 * s, 3) for s in IMAGENET_STD]  # [58.395, 57.12, 57.375]
_RESNET_DEPTHS = {
    "resnet18": 18,
    "resnet34": 34,
    "resnet50": 50,
    "resnet101": 101,
    "resnet152": 152,
}
_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def d2_resnet_key(key: str) -> str:
    """A torchvision ResNet key in detectron2's layout (the converters' rules, in order)."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def is_vit_state(state: dict) -> bool:
    """Whether every key of ``state`` is one of timm's plain ViT keys (no layer scale, no
    register tokens, no qk-norm: the blocks ViTDet has)."""
    return bool(state) and all(_VIT_KEY.match(k) for k in state)


def convert_for(fmt: str, arch: str, state: dict, torchvision_layout: bool) -> dict[str, str]:
    """``{our key: the target's key}`` for ``fmt``; ``ValueError`` for a backbone the target's
    layout does not have."""
    if fmt not in DETECTION_FORMATS:
        raise ValueError(f"unknown detection format {fmt!r}")
    if torchvision_layout:
        rename: Callable[[str], str] = d2_resnet_key if fmt == "detectron2" else (lambda k: k)
        return {k: rename(k) for k in state}
    if is_vit_state(state):
        if fmt == "detectron2":
            return {k: "backbone.net." + k for k in state}
        raise ValueError(
            f"--format mmdet: {arch} is a ViT, and mmdetection's ViT backbones (mmpretrain's "
            "VisionTransformer, the ViTDet project's) each name their keys their own way; export "
            "--format detectron2 for ViTDet, or --format hf / timm for a timm-based backbone"
        )
    raise ValueError(
        f"--format {fmt}: {arch} has neither torchvision's ResNet layout nor timm's plain ViT "
        "layout, the two backbones the detection formats map; export --format timm or hf"
    )


def check_conversion(state: dict, converted: dict, mapping: dict[str, str]) -> None:
    """Every tensor of ``state`` exactly once in ``converted``, under ``mapping[key]``, with its
    shape and values; nothing else in ``converted``. ``ValueError`` otherwise."""
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        twice = sorted({t for t in targets if targets.count(t) > 1})
        raise ValueError(f"conversion maps several tensors onto {twice[:3]}")
    if set(mapping) != set(state):
        raise ValueError("conversion does not cover every backbone tensor")
    if set(converted) != set(targets):
        extra = sorted(set(converted) - set(targets))
        missing = sorted(set(targets) - set(converted))
        raise ValueError(f"converted file: extra keys {extra[:3]}, missing {missing[:3]}")
    for key, new in mapping.items():
        value = torch.as_tensor(converted[new])
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{key} -> {new}: shape {tuple(value.shape)}, expected "
                             f"{tuple(state[key].shape)}")  # fmt: skip
        if not torch.equal(value.to(state[key].dtype), state[key].detach().cpu()):
            raise ValueError(f"{key} -> {new}: values changed")


def detection_snippet(fmt: str, arch: str, kwargs: dict, path: str, vit: bool) -> str:
    """The config lines that load the export at ``path`` in ``fmt``'s framework."""
    if fmt == "detectron2" and not vit:
        depth = _RESNET_DEPTHS.get(arch, "DEPTH")
        small = depth in (18, 34)
        return (
            "# detectron2 (yacs config), as MoCo's detection configs: SyncBN, RGB input\n"
            "MODEL:\n"
            f'  WEIGHTS: "{path}"\n'
            f"  PIXEL_MEAN: {PIXEL_MEAN}\n"
            f"  PIXEL_STD: {PIXEL_STD}\n"
            "  BACKBONE:\n    FREEZE_AT: 0\n"
            "  RESNETS:\n"
            f"    DEPTH: {depth}\n"
            + ("    RES2_OUT_CHANNELS: 64\n" if small else "")
            + '    NORM: "SyncBN"\n'
            "    STRIDE_IN_1X1: False  # torchvision's stride-2 3x3 conv\n"
            '  FPN:\n    NORM: "SyncBN"\n'
            'INPUT:\n  FORMAT: "RGB"\n'
        )
    if fmt == "detectron2":
        size = kwargs.get("img_size", 224)
        patch = kwargs.get("patch_size", 16)
        return (
            "# detectron2 ViTDet (LazyConfig, e.g. projects/ViTDet/configs/COCO/"
            "mask_rcnn_vitdet_b_100ep.py)\n"
            f'train.init_checkpoint = "{path}"\n'
            f"model.backbone.net.patch_size = {patch}\n"
            f"model.backbone.net.pretrain_img_size = {size}\n"
            "# embed_dim, depth, num_heads as the backbone: see the export's description\n"
            f"model.pixel_mean = {PIXEL_MEAN}\n"
            f"model.pixel_std = {PIXEL_STD}\n"
            'model.input_format = "RGB"\n'
        )
    depth = _RESNET_DEPTHS.get(arch, "DEPTH")
    return (
        "# mmdetection (Python config)\n"
        "model = dict(\n"
        f"    data_preprocessor=dict(mean={PIXEL_MEAN}, std={PIXEL_STD}, bgr_to_rgb=True),\n"
        "    backbone=dict(\n"
        f"        type='ResNet', depth={depth}, style='pytorch',\n"
        "        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False,\n"
        f"        init_cfg=dict(type='Pretrained', checkpoint='{path}')))\n"
    )
