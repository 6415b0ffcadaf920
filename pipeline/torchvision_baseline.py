"""The baseline of ``ssl-cli bench pipeline``: the same views with torchvision + PIL.

A ``torch.utils.data.DataLoader`` whose workers decode each sample with PIL (EXIF orientation
applied, as DALI does) and build its views with the standard torchvision transforms
(``RandomResizedCrop``, ``RandomHorizontalFlip``, ``RandomApply(ColorJitter)``,
``RandomGrayscale``, ``RandomApply(GaussianBlur)``, ``RandomSolarize``, ``ToTensor``,
``Normalize``) with the parameters of our view sets; the MOS stitching runs in the collate
function with :func:`pipeline.stitching.stitch_multiscale`. It reads the same shards through
:class:`~pipeline.source.ShardIndex` and the same epoch order (:class:`EpochPlan`). Only a
yardstick: not used for training.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from .scene_pairs import sample_scene_pair
from .source import EpochPlan, ShardIndex, batch_rng
from .stitching import stitch_multiscale
from .views import DecodeCropViews, MOSViews, MultiCropViews, UniVIPViews

__all__ = ["baseline_loader"]


def _kernel(size: int) -> int:
    """BYOL's blur kernel: 23 taps at 224 px, i.e. about a tenth of the side, odd."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


def _photometric(aug: Augment, size: int):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomHorizontalFlip(aug.flip),
            T.RandomApply(
                [T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)],
                p=aug.jitter,
            ),
            T.RandomGrayscale(aug.grayscale),
            T.RandomApply([T.GaussianBlur(_kernel(size), aug.sigma)], p=aug.blur),
            T.RandomSolarize(128, p=aug.solarize),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _rrc(size: int, scale, ratio):
    from torchvision import transforms as T

    return T.RandomResizedCrop(size, scale=scale, ratio=ratio)


class _ViewDataset(Dataset):
    """``dataset[(row, epoch, batch)]`` -> the sample's views (a dict of tensors)."""

    def __init__(self, index: ShardIndex, views: Any, seed: int):
        self.index, self.views, self.seed = index, views, seed
        v = views
        if isinstance(v, MOSViews):
            self.single = [
                (_rrc(v.size, v.single_scale, v.ratio), _photometric(a, v.size))
                for a in v.single_augment
            ]
            self.multi = [_photometric(a, v.size // 2) for a in v.multi_augment]
        elif isinstance(v, UniVIPViews):
            self.scene = [_photometric(a, v.size) for a in v.scene_augment]
            self.instance = _photometric(v.instance_augment, v.instance_size)
        elif isinstance(v, MultiCropViews):
            self.glob = [
                (_rrc(v.global_size, v.global_scale, v.ratio), _photometric(a, v.global_size))
                for a in v.global_augment
            ]
            self.local = (
                _rrc(v.local_size, v.local_scale, v.ratio),
                _photometric(v.local_augment, v.local_size),
            )
        elif isinstance(v, DecodeCropViews):
            from torchvision import transforms as T

            self.crop = T.Compose(
                [
                    _rrc(v.size, v.scale, v.ratio),
                    T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )
        else:
            raise TypeError(f"no torchvision baseline for {type(v).__name__}")

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, row: int):
        from PIL import Image, ImageOps

        img = Image.open(io.BytesIO(self.index.read_jpeg(row).tobytes()))
        return ImageOps.exif_transpose(img).convert("RGB")

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        from torchvision.transforms import functional as TF

        row, epoch, batch = key
        img = self._image(row)
        v = self.views
        out: dict[str, Any] = {"index": row}
        if isinstance(v, MOSViews):
            for i, (crop, aug) in enumerate(self.single):
                out[f"single{i + 1}"] = aug(crop(img))
            layouts = v.plan_batch(batch_rng(self.seed, epoch, batch))
            for i, (layout, aug) in enumerate(zip(layouts, self.multi)):
                crops = []
                for j, side in enumerate(layout.crop_sizes):
                    rrc = _rrc(side, v.multi_scale, v.ratio)
                    crops += [aug(rrc(img)) for _ in range(layout.crops_per_cell[j])]
                out[f"crops{i + 1}"] = crops
                out[f"layout{i + 1}"] = layout
        elif isinstance(v, UniVIPViews):
            boxes = self.index.read_boxes(row)
            s1, s2, inst = sample_scene_pair(img.width, img.height, boxes, v.k, v.tries)
            for i, (box, aug) in enumerate(zip((s1, s2), self.scene)):
                x0, y0, x1, y1 = (int(c) for c in box)
                out[f"scene{i + 1}"] = aug(
                    TF.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [v.size] * 2)
                )
            out["instances"] = torch.stack(
                [
                    self.instance(
                        TF.resized_crop(
                            img,
                            int(b[1]),
                            int(b[0]),
                            int(b[3] - b[1]),
                            int(b[2] - b[0]),
                            [v.instance_size] * 2,
                        )
                    )
                    for b in inst
                ]
            )
        elif isinstance(v, MultiCropViews):
            crops = [
                aug(crop(img))
                for crop, aug in (self.glob[i % len(self.glob)] for i in range(v.num_global))
            ]
            crops += [self.local[1](self.local[0](img)) for _ in range(v.num_local)]
            out["crops"] = crops
        else:
            out["crop"] = self.crop(img)
        return out


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    first = samples[0]
    out: dict[str, Any] = {"index": torch.tensor([s["index"] for s in samples])}
    for key, value in first.items():
        if key == "index" or key.startswith("layout"):
            continue
        if key.startswith("crops") and key != "crops":  # MOS stitched views
            v = key[len("crops") :]
            layout = first[f"layout{v}"]
            per_crop = [torch.stack([s[key][k] for s in samples]) for k in range(layout.num_crops)]
            cells, k = [], 0
            for n in layout.crops_per_cell:
                cells.append(torch.stack(per_crop[k : k + n], dim=1))
                k += n
            out[f"multi{v}"], out[f"members{v}"] = stitch_multiscale(cells, layout.grid)
        elif key == "crops":
            out["crops"] = [
                torch.stack([s["crops"][i] for s in samples]) for i in range(len(value))
            ]
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


class _BatchSampler:
    """Our epoch order (:class:`EpochPlan`), so both loaders see the same batches."""

    def __init__(self, plan: EpochPlan, epoch: int, epochs: int, rank: int = 0):
        self.plan, self.epoch, self.epochs, self.rank = plan, epoch, epochs, rank

    def __len__(self) -> int:
        return self.plan.batches * self.epochs

    def __iter__(self):
        for e in range(self.epoch, self.epoch + self.epochs):
            for b in range(self.plan.batches):
                yield [(int(r), e, b) for r in self.plan.rows(e, b, self.rank)]


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)


def baseline_loader(
    shards_dir,
    views: Any,
    batch_size: int,
    workers: int,
    seed: int = 0,
    epoch: int = 0,
    epochs: int = 1,
) -> DataLoader:
    """A DataLoader over ``epochs`` epochs of the shards (in our order, from ``epoch``) that
    produces ``views`` with torchvision + PIL in ``workers`` processes."""
    index = ShardIndex(shards_dir)
    plan = EpochPlan(len(index), batch_size, 1, seed)
    return DataLoader(
        _ViewDataset(index, views, seed),
        batch_sampler=_BatchSampler(plan, epoch, epochs),
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
