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
    "mmpretrain_vit_key",
    "vit_shape",
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


def mmpretrain_vit_key(key: str) -> str:
    """A timm ViT key in mmpretrain's ``VisionTransformer`` layout, the backbone mmdetection's
    ViT configs build (the rules of mmpretrain's timm/DeiT-3 converters): ``patch_embed.proj``
    -> ``patch_embed.projection``, ``blocks.N`` -> ``layers.N`` with ``norm1/norm2`` ->
    ``ln1/ln2``, ``mlp.fc1`` -> ``ffn.layers.0.0``, ``mlp.fc2`` -> ``ffn.layers.1``; the final
    ``norm`` -> ``ln1``; ``attn.qkv``, ``attn.proj``, ``cls_token``, ``pos_embed`` as they are."""
    if key.startswith("patch_embed.proj."):
        return key.replace("patch_embed.proj.", "patch_embed.projection.", 1)
    if key.startswith("norm."):
        return "ln1." + key[len("norm.") :]
    if key.startswith("blocks."):
        key = "layers." + key[len("blocks.") :]
        for ours, theirs in (
            (".norm1.", ".ln1."),
            (".norm2.", ".ln2."),
            (".mlp.fc1.", ".ffn.layers.0.0."),
            (".mlp.fc2.", ".ffn.layers.1."),
        ):
            key = key.replace(ours, theirs)
    return key


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
        return {k: mmpretrain_vit_key(k) for k in state}
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


def vit_shape(model) -> dict[str, int]:
    """A timm ViT's sizes that a detection config must repeat: ``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_dim`` (the MLP's hidden width)."""
    block = model.blocks[0]
    return {
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_dim": int(block.mlp.fc1.out_features),
    }


def detection_snippet(
    fmt: str, arch: str, kwargs: dict, path: str, vit: bool, shape: dict | None = None
) -> str:
    """The config lines that load the export at ``path`` in ``fmt``'s framework; ``shape``: a
    ViT's sizes (:func:`vit_shape`)."""
    shape = shape or {}
    if fmt == "detectron2":
        return _vitdet_snippet(kwargs, path, shape) if vit else _d2_resnet_snippet(arch, path)
    if vit:
        return _mmpretrain_vit_snippet(kwargs, path, shape)
    return _mmdet_resnet_snippet(arch, path)


def _d2_resnet_snippet(arch: str, path: str) -> str:
    """detectron2's yacs lines for a torchvision-layout ResNet, as MoCo's detection configs."""
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


def _vitdet_snippet(kwargs: dict, path: str, shape: dict) -> str:
    """detectron2 ViTDet's LazyConfig lines with the ViT's sizes."""
    size = kwargs.get("img_size", 224)
    patch = kwargs.get("patch_size", 16)
    return (
        "# detectron2 ViTDet (LazyConfig, e.g. projects/ViTDet/configs/COCO/"
        "mask_rcnn_vitdet_b_100ep.py)\n"
        f'train.init_checkpoint = "{path}"\n'
        f"model.backbone.net.patch_size = {patch}\n"
        f"model.backbone.net.pretrain_img_size = {size}\n"
        f"model.backbone.net.embed_dim = {shape.get('embed_dim', 'EMBED_DIM')}\n"
        f"model.backbone.net.depth = {shape.get('depth', 'DEPTH')}\n"
        f"model.backbone.net.num_heads = {shape.get('num_heads', 'NUM_HEADS')}\n"
        f"model.backbone.net.mlp_ratio = "
        f"{shape['mlp_dim'] / shape['embed_dim'] if shape else 'MLP_RATIO'}\n"
        f"model.pixel_mean = {PIXEL_MEAN}\n"
        f"model.pixel_std = {PIXEL_STD}\n"
        'model.input_format = "RGB"\n'
    )


def _mmpretrain_vit_snippet(kwargs: dict, path: str, shape: dict) -> str:
    """mmdetection 3's lines with mmpretrain's VisionTransformer as the backbone."""
    size = kwargs.get("img_size", 224)
    patch = kwargs.get("patch_size", 16)
    return (
        "# mmdetection 3 (Python config): mmpretrain's VisionTransformer as the backbone, as\n"
        "# mmdetection's ViTDet project configs build it\n"
        "custom_imports = dict(imports=['mmpretrain.models'], allow_failed_imports=False)\n"
        "model = dict(\n"
        f"    data_preprocessor=dict(mean={PIXEL_MEAN}, std={PIXEL_STD}, bgr_to_rgb=True),\n"
        "    backbone=dict(\n"
        "        _delete_=True, type='mmpretrain.VisionTransformer',\n"
        f"        arch=dict(embed_dims={shape.get('embed_dim', 'EMBED_DIM')}, "
        f"num_layers={shape.get('depth', 'DEPTH')}, "
        f"num_heads={shape.get('num_heads', 'NUM_HEADS')},\n"
        f"                  feedforward_channels={shape.get('mlp_dim', 'MLP_DIM')}),\n"
        f"        img_size={size}, patch_size={patch}, qkv_bias=True,\n"
        "        norm_cfg=dict(type='LN', eps=1e-6), with_cls_token=True,\n"
        f"        init_cfg=dict(type='Pretrained', checkpoint='{path}')))\n"
    )


def _mmdet_resnet_snippet(arch: str, path: str) -> str:
    """mmdetection's lines for a torchvision-keyed ResNet (SyncBN, as its SSL configs)."""
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
