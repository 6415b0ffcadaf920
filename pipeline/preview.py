"""``ssl-cli preview``: a PNG of what the model trains on, for a few samples of the shards.

One row per sample of the first batch. ``mos``: the source image with its proposals, the two
single-object views, the two stitched views with every object crop outlined and labelled with
the batch position of its sample (``members``). ``univip``: the source with its proposals (grey),
the two scene boxes and their overlap (shaded), the instance boxes (numbered); the two scene
views and the instance crops. ``multicrop``: the source with every crop box, then the crops.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD, NO_AUGMENT, Augment
from .loader import ViewLoader
from .views import view_set

__all__ = ["render_preview", "without_photometric"]

_SCENE_COLOURS = ("tab:blue", "tab:orange")


def without_photometric(views: Any) -> Any:
    """The same view set with every augmentation replaced by :data:`NO_AUGMENT` (geometry)."""
    changes = {}
    for f in dataclasses.fields(views):
        v = getattr(views, f.name)
        if isinstance(v, Augment):
            changes[f.name] = NO_AUGMENT
        elif isinstance(v, tuple) and v and all(isinstance(a, Augment) for a in v):
            changes[f.name] = (NO_AUGMENT,) * len(v)
    return dataclasses.replace(views, **changes)


def _image(t: torch.Tensor) -> np.ndarray:
    """A normalized ``[3, H, W]`` view -> uint8 ``[H, W, 3]``."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (t.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _source(loader: ViewLoader, row: int) -> np.ndarray:
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(loader.index.read_jpeg(row).tobytes()))
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _box(ax, box, colour, lw=1.5, ls="-", fill=False, alpha=1.0, label=None):
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            fill=fill,
            edgecolor=colour,
            facecolor=colour,
            lw=lw,
            ls=ls,
            alpha=alpha,
        )
    )
    if label is not None:
        ax.text(
            x0 + 2,
            y0 + 2,
            label,
            color="white",
            fontsize=7,
            va="top",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.85},
        )


def _show(ax, img, title: str | None = None) -> None:
    ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _source_panel(ax, loader: ViewLoader, row: int, b: int, proposals: bool = True) -> None:
    _show(ax, _source(loader, row), f"b={b}: {loader.index.keys[row]}")
    if proposals:
        for box in loader.index.read_boxes(row)[:30]:
            _box(ax, box, "lightgrey", lw=0.6)


def _mos(axes, batch, loader, views) -> None:
    n = batch["index"].shape[0]
    for i in range(n):
        ax = axes[i]
        _source_panel(ax[0], loader, int(batch["index"][i]), i)
        _show(ax[1], _image(batch["single1"][i]), "single 1")
        _show(ax[2], _image(batch["single2"][i]), "single 2")
        for v in (1, 2):
            layout = batch[f"layout{v}"]
            a = ax[2 + v]
            _show(
                a,
                _image(batch[f"multi{v}"][i]),
                f"stitched {v}: r={layout.grid}, s={list(layout.scales)}",
            )
            for box, member in zip(layout.crop_boxes, batch[f"members{v}"][i].tolist()):
                _box(a, box, f"C{member % 10}", lw=1.0, label=f"b={member}")


def _univip(axes, batch, loader, views) -> None:
    from matplotlib.patches import Rectangle

    n = batch["index"].shape[0]
    k = batch["instances"].shape[1]
    for i in range(n):
        ax = axes[i]
        _source_panel(ax[0], loader, int(batch["index"][i]), i)
        scenes = batch["scene_boxes"][i].tolist()
        for s, c in zip(scenes, _SCENE_COLOURS):
            _box(ax[0], s, c, lw=2)
        ov = [
            max(scenes[0][0], scenes[1][0]),
            max(scenes[0][1], scenes[1][1]),
            min(scenes[0][2], scenes[1][2]),
            min(scenes[0][3], scenes[1][3]),
        ]
        ax[0].add_patch(
            Rectangle(
                (ov[0], ov[1]),
                ov[2] - ov[0],
                ov[3] - ov[1],
                facecolor="tab:green",
                alpha=0.2,
                edgecolor="none",
            )
        )
        for j, box in enumerate(batch["instance_boxes"][i].tolist()):
            _box(ax[0], box, "tab:red", lw=1.2, label=str(j))
        for v in (1, 2):
            _show(ax[v], _image(batch[f"scene{v}"][i]), f"scene {v}")
            for side in ("left", "right", "top", "bottom"):
                ax[v].spines[side].set_color(_SCENE_COLOURS[v - 1])
                ax[v].spines[side].set_linewidth(3)
        for j in range(k):
            _show(ax[3 + j], _image(batch["instances"][i, j]), f"instance {j}")


def _multicrop(axes, batch, loader, views) -> None:
    n = batch["index"].shape[0]
    crops = batch["crops"]
    n_global = views.num_global
    for i in range(n):
        ax = axes[i]
        _source_panel(ax[0], loader, int(batch["index"][i]), i, proposals=False)
        for j, box in enumerate(batch["boxes"][i].tolist()):
            glob = j < n_global
            _box(
                ax[0],
                box,
                f"C{j % 10}",
                lw=2 if glob else 1,
                ls="-" if glob else "--",
                label=str(j),
            )
        for j, c in enumerate(crops):
            kind = "global" if j < n_global else "local"
            _show(ax[1 + j], _image(c[i]), f"{j}: {kind} {c.shape[-1]}px")


def render_preview(
    shards_dir: str | Path,
    method: str,
    out: str | Path,
    samples: int = 4,
    seed: int = 0,
    device: str = "cpu",
    augment: bool = True,
) -> Path:
    """Write the preview PNG of the first batch of ``samples`` samples; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = view_set(method)
    if not augment:
        views = without_photometric(views)
    with ViewLoader(shards_dir, views, batch_size=samples, seed=seed, device=device) as loader:
        batch = next(iter(loader))
        if method == "mos":
            cols, draw = 5, _mos
        elif method == "univip":
            cols, draw = 3 + batch["instances"].shape[1], _univip
        else:
            cols, draw = 1 + len(batch["crops"]), _multicrop
        fig, axes = plt.subplots(samples, cols, figsize=(2.6 * cols, 2.7 * samples), squeeze=False)
        draw(axes, batch, loader, views)
    title = {
        "mos": "MOS: source | single views | stitched views (cells labelled with the batch "
        "position b of their sample)\nr = the stitched image's grid (r x r cells, one object "
        "each); s = per cell, its object is s x s smaller views (MOS section 3.1)",
        "univip": "UniVIP: source (proposals grey, scenes blue/orange, overlap green, instances "
        "red) | scenes | instances",
        "multicrop": "multi-crop: source with crop boxes (global solid, local dashed) | crops",
    }[method]
    fig.suptitle(title + ("" if augment else " [no photometric augmentation]"), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
