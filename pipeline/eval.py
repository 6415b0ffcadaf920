"""The evaluation loader: every sample of a labelled shard set once, centre-cropped.

::

    from pipeline.eval import EvalLoader

    with EvalLoader("data/shards/imagenet_val", size=224, batch_size=256, device="cuda") as loader:
        for batch in loader:      # len(loader) batches, the last one possibly smaller
            feats = backbone(batch["image"])      # [b, 3, 224, 224] float32, normalized
            batch["label"], batch["index"]        # [b] int64: KEY.cls, row of proposals.parquet

Order and coverage: rows of ``proposals.parquet`` in order, cut into batches of ``batch_size``;
the last batch holds what is left (no padding, no sample twice). With ``world_size > 1``, rank
``k`` takes the ``k``-th contiguous part of the rows (``numpy.array_split``: sizes differ by at
most one), so the ranks' outputs concatenated in rank order are the rows in order.

Transform (the DINO / MoCo v3 evaluation transform): decode (``device="mixed"``, nvJPEG, on a
GPU; DALI's CPU decoder otherwise), resize the shorter side to ``floor(size / crop_pct)``
(256 for 224 at the default ``crop_pct`` 0.875) with an antialiased linear filter, crop the
centre ``size x size``, normalize with the ImageNet mean and standard deviation, CHW float32.

Labels: each sample's ``KEY.cls`` (ASCII decimal) read from the tars at the offsets of the
DALI ``.idx`` files, checked against the ``label`` column of ``proposals.parquet``. A shard set
with unlabelled samples raises :class:`UnlabelledShardsError` naming the folder.

Training inputs of the paper linear probe (``ssl-cli eval linear --protocol paper``):
:class:`ProbeTrainLoader` gives random resized crops (area 0.08..1 of the image, aspect ratio
3/4..4/3, resized to ``size``) flipped horizontally with probability 0.5, the training
transform of MoCo v3 ``main_lincls.py`` and DINO ``eval_linear.py`` (torchvision
``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``). It is the trainer's
:class:`~pipeline.loader.ViewLoader` with one more view set (:class:`ProbeViews`): boxes drawn
on the host per ``(seed, epoch, row)`` (:func:`pipeline.scene_pairs.random_resized_crop_boxes`),
the crop, flip and resize done by DALI's ``fn.resize`` (:func:`pipeline.graph.view_pipeline`),
so every epoch decodes and crops the shards again and sees other crops; a seeded shuffle per
epoch, full batches (the remainder opens the next epoch, :mod:`pipeline.source`).

Reading reuses :class:`pipeline.source.ShardIndex` (memory-mapped tars, nothing decoded in
Python); the source is a batch-mode ``fn.external_source`` in the pipeline's own thread: it
only slices bytes, which costs microseconds per sample, so it needs no worker processes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from shards.location import ShardLocation, locate
from shards.verify import load_manifest

from .augment import IMAGENET_MEAN, IMAGENET_STD, NO_AUGMENT, Augment
from .loader import (
    ViewLoader,
    _dali_reason,
    _device,
    _to_torch,
    default_parallelism,
    first_undecodable,
)
from .scene_pairs import random_resized_crop_boxes
from .source import ShardIndex, _parse_index
from .views.banks import RATIO, Bank, SamplePlan, _bank, _check_range, _check_size, _Group, _plan

__all__ = [
    "DEFAULT_CROP_PCT",
    "PROBE_SCALE",
    "EvalLoader",
    "ProbeTrainLoader",
    "ProbeViews",
    "UnlabelledShardsError",
    "eval_pipeline",
    "rank_rows",
    "read_labels",
    "resize_side",
]

# Centre crop / resized side: 224 of 256 (DINO eval_knn.py and eval_linear.py, MoCo v3
# main_lincls.py: Resize(256) then CenterCrop(224)).
DEFAULT_CROP_PCT = 0.875

# Area range of the probe's random resized crops: torchvision RandomResizedCrop's default,
# used by MoCo v3 main_lincls.py and DINO eval_linear.py.
PROBE_SCALE = (0.08, 1.0)

_MEAN = [255.0 * m for m in IMAGENET_MEAN]
_STD = [255.0 * s for s in IMAGENET_STD]


class UnlabelledShardsError(ValueError):
    """The shard set has samples without a label (no ``KEY.cls``)."""


def resize_side(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter side before the centre crop: ``floor(size / crop_pct)`` (256 for 224)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return max(size, int(math.floor(size / crop_pct + 1e-6)))


def rank_rows(num_samples: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Rows of ``rank``: its contiguous part of ``0..num_samples-1`` (sizes differ by <= 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world {world_size}")
    return np.array_split(np.arange(num_samples, dtype=np.int64), world_size)[rank]


def read_labels(index: ShardIndex) -> np.ndarray:
    """Every row's label from its ``KEY.cls``: int64 ``[N]``, rows of ``proposals.parquet``.

    Raises :class:`UnlabelledShardsError` when a sample has no label, ``ValueError`` when a
    ``.cls`` disagrees with the Parquet ``label`` (a damaged shard set: ``ssl-cli shards verify``).
    """

    root = index.root
    manifest = load_manifest(root)
    column = pq.read_table(root / manifest["files"]["proposals"], columns=["label"]).column("label")
    n = len(index)
    if column.null_count:
        raise UnlabelledShardsError(
            f"{root}: {column.null_count} of {n} samples have no label (null in "
            "proposals.parquet, no KEY.cls in the tars). kNN and linear evaluation need a "
            "labelled shard set: build it with --layout imagenet, from CIFAR batches, or from "
            "WebDataset tars that carry .cls"
        )
    expected = column.to_numpy().astype(np.int64)
    row_of = {key: row for row, key in enumerate(index.keys)}
    labels = np.full(n, -1, dtype=np.int64)
    for sid, shard in enumerate(manifest["shards"]):
        entries = _parse_index(root / shard["index"])
        with open(index.tar_path(sid), "rb") as f:  # through the shard cache for a URL
            for entry in entries:
                if "cls" not in entry:
                    continue
                offset, size, name = entry["cls"]
                key = name.rsplit("/", 1)[-1].split(".", 1)[0]
                f.seek(offset)
                text = f.read(size)
                try:
                    labels[row_of[key]] = int(text.decode("ascii").strip())
                except (KeyError, UnicodeDecodeError, ValueError):
                    raise ValueError(
                        f"{root / shard['name']}: {name} ({text[:20]!r}) is not an ASCII "
                        "integer label of a Parquet row; run ssl-cli shards verify"
                    ) from None
    missing = np.flatnonzero(labels < 0)
    if len(missing):
        raise UnlabelledShardsError(
            f"{root}: {len(missing)} of {n} samples have no KEY.cls (e.g. "
            f"{index.keys[int(missing[0])]!r}); kNN and linear evaluation need a labelled "
            "shard set"
        )
    bad = np.flatnonzero(labels != expected)
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"{root}: {len(bad)} KEY.cls labels disagree with proposals.parquet (e.g. "
            f"{index.keys[row]!r}: .cls {labels[row]}, Parquet {expected[row]}); run "
            "ssl-cli shards verify"
        )
    return labels


class _RowSource:
    """Batch-mode ``fn.external_source`` callable: batch ``i`` of ``rows`` -> (JPEG bytes, row
    ``[1]`` int64) per sample; the epoch ends after the last (possibly partial) batch."""

    def __init__(self, index: ShardIndex, rows: np.ndarray, batch_size: int) -> None:
        self.index, self.rows, self.batch_size = index, rows, batch_size

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rows = self.rows[info.iteration * self.batch_size : (info.iteration + 1) * self.batch_size]
        if len(rows) == 0:
            raise StopIteration
        jpegs = [self.index.read_jpeg(int(r)) for r in rows]
        return jpegs, [np.array([r], dtype=np.int64) for r in rows]


def eval_pipeline(
    source: Any,
    batch_size: int,
    size: int,
    crop_pct: float | None = DEFAULT_CROP_PCT,
    device_id: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
) -> Any:
    """The DALI graph of the evaluation transform: the centre crop (shorter side resized to
    ``size / crop_pct``, the central ``size x size`` cut), or with ``crop_pct=None`` the whole
    image resized to ``size x size`` (aspect not kept, nothing cut off: the object loader's).
    Outputs: images float32 ``[b, 3, size, size]`` (on the GPU when ``device_id`` is set) and
    the rows ``[b, 1]`` int64 (CPU)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def
    def graph():
        jpeg, row = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        image = fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if crop_pct is None:
            image = fn.resize(image, resize_x=size, resize_y=size, antialias=True)
            crop = {}
        else:
            image = fn.resize(image, resize_shorter=resize_side(size, crop_pct), antialias=True)
            crop = {"crop": (size, size), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
        image = fn.crop_mirror_normalize(
            image, dtype=types.FLOAT, output_layout="CHW", mean=_MEAN, std=_STD, **crop
        )
        return image, row

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,  # every run's outputs get their own buffers (zero-copy to torch)
    )
    pipe.build()
    return pipe


class EvalLoader:
    """Centre-cropped images, labels and rows of every sample of ``shards_dir`` (module
    docstring).

    Args:
        shards_dir: a labelled output folder of ``ssl-cli shards build``.
        size: side of the centre crop (the model's input size).
        batch_size: per rank; the last batch may be smaller.
        rank, world_size: this process's contiguous part of the rows.
        device: ``"cpu"`` or ``"cuda[:N]"`` (GPU decoding and resizing).
        num_threads: DALI CPU threads [default: this rank's share of the node's cores on CPU,
            ``min(8, share // 2)`` with a GPU: the view loader's threads,
            :func:`~pipeline.loader.default_parallelism`].
        crop_pct: ``size / shorter side`` before the crop.
        prefetch: batches DALI prepares ahead.

    Raises :class:`UnlabelledShardsError` (a ``ValueError``) at construction when a sample
    has no label.
    """

    def __init__(
        self,
        shards_dir: str | Path | ShardLocation,
        size: int = 224,
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        crop_pct: float = DEFAULT_CROP_PCT,
        prefetch: int = 2,
    ):
        for name, v in (("size", size), ("batch_size", batch_size), ("prefetch", prefetch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        resize_side(size, crop_pct)  # checks crop_pct
        self.device = _device(device)
        gpu = self.device.type == "cuda"
        self.num_threads = num_threads or default_parallelism(gpu)[0]
        self.size, self.batch_size, self.crop_pct, self.prefetch = (
            size,
            batch_size,
            crop_pct,
            prefetch,
        )
        self.location = locate(shards_dir)
        self.index = ShardIndex(self.location)
        try:
            self.labels = read_labels(self.index)
        except BaseException:
            self.index.close()
            raise
        classes = load_manifest(self.index.root).get("classes")  # a URL's: in the cache
        self.num_classes = max(len(classes or ()), int(self.labels.max(initial=-1)) + 1)
        self.rows = rank_rows(len(self.index), rank, world_size)
        self.rank, self.world_size = rank, world_size
        self._pipe = None
        self._clean = False  # the pipeline stands at the start of an epoch
        self._closed = False

    def __len__(self) -> int:
        """Batches of this rank (the last one may be partial)."""
        return -(-len(self.rows) // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples of the whole shard set (all ranks)."""
        return len(self.index)

    def _build(self) -> None:
        self._release()
        source = _RowSource(self.index, self.rows, self.batch_size)
        self._pipe = eval_pipeline(
            source,
            self.batch_size,
            self.size,
            self.crop_pct,
            self.device.index if self.device.type == "cuda" else None,
            self.num_threads,
            self.prefetch,
        )
        self._clean = True

    def _release(self) -> None:
        pipe, self._pipe = self._pipe, None
        self._clean = False
        if pipe is not None:
            pipe._shutdown()
            del pipe

    def _explain(self, error: BaseException, batch: int) -> Exception:
        """The sample of batch ``batch`` (or of the ``prefetch`` batches after it) that DALI's
        decoder refuses, as a ``ShardError`` naming its key and shard; else the DALI error."""
        rows = self.rows[batch * self.batch_size : (batch + 1 + self.prefetch) * self.batch_size]
        found = first_undecodable(self.index, [int(r) for r in rows], self.device.index)
        if found is None:
            return RuntimeError(
                f"the evaluation pipeline on {self.location.display} failed at batch {batch}: "
                f"{_dali_reason(error)}"
            )
        row, reason = found
        return self.index.sample_error(
            row, f"its .jpg cannot be decoded by DALI's image decoder ({reason})"
        )

    def __iter__(self):
        """This rank's batches in row order: ``{"image" [b, 3, S, S] float32, "label" [b]
        int64, "index" [b] int64}`` on the loader's device. Iterable again afterwards."""
        if self._closed:
            raise RuntimeError("the loader is closed")
        if len(self) == 0:
            return
        if self._pipe is None or not self._clean:
            self._build()
        self._clean = False
        for i in range(len(self)):
            try:
                images, rows = self._pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError or its own types
                self._release()  # a pipeline that failed cannot run again
                raise self._explain(e, i) from None
            index = _to_torch(rows, torch.device("cpu")).reshape(-1).clone()
            label = torch.from_numpy(self.labels[index.numpy()])
            yield {
                "image": _to_torch(images, self.device),
                "label": label.to(self.device, non_blocking=True),
                "index": index.to(self.device, non_blocking=True),
            }
        try:  # the source ends the epoch after the last batch: take it and rewind
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
            self._clean = True
        else:  # pragma: no cover - the source guarantees the end of epoch
            raise RuntimeError("internal error: the evaluation source did not end the epoch")

    def close(self) -> None:
        """Stop the pipeline and unmap the shards."""
        self._release()
        self.index.close()
        self._closed = True

    def __enter__(self) -> EvalLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass


# --------------------------------------------------------------- paper linear probe (train)


@dataclass(frozen=True)
class ProbeViews:
    """View set of the paper linear probe's training inputs: one random resized crop of area
    ``scale`` and aspect ratio ``ratio`` resized to ``size``, flipped with probability ``flip``,
    no photometric augmentation (MoCo v3 ``main_lincls.py``, DINO ``eval_linear.py``:
    ``RandomResizedCrop(224)``, ``RandomHorizontalFlip()``). The view-set protocol of
    :mod:`pipeline.views` (banks, per-sample plans, assembly), read by
    :class:`~pipeline.loader.ViewLoader`."""

    size: int = 224
    scale: tuple[float, float] = PROBE_SCALE
    ratio: tuple[float, float] = RATIO
    flip: float = 0.5

    name = "probe"
    needs_boxes = False

    def __post_init__(self) -> None:
        _check_size(self.size, "size")
        object.__setattr__(self, "scale", _check_range(self.scale, "scale", 1.0))
        object.__setattr__(self, "ratio", _check_range(self.ratio, "ratio"))
        _ = self.augment  # Augment checks the flip probability

    @property
    def augment(self) -> Augment:
        """Crop, flip, resize and normalize only: no colour, blur or solarization."""
        return dataclasses.replace(NO_AUGMENT, flip=self.flip)

    def banks(self) -> tuple[Bank, ...]:
        return (_bank("image", self.size, 1, self.augment),)

    def plan_batch(self, rng: np.random.Generator) -> None:
        return None

    def plan_sample(self, width, height, boxes, rng, batch_plan) -> SamplePlan:
        box = random_resized_crop_boxes(width, height, 1, rng, self.scale, self.ratio)
        return _plan([_Group("image", box, self.augment)], rng)[0]

    def assemble(self, banks: dict, extras: dict, index) -> dict[str, Any]:
        return {"image": banks["image"][:, 0], "index": index}


class ProbeTrainLoader:
    """Augmented training batches of a labelled shard set for the paper linear probe (module
    docstring): ``{"image" [b, 3, size, size] float32, "label" [b], "index" [b] int64}``.

    Epoch ``e`` (:meth:`set_epoch`) is a seeded permutation of the rows cut into
    ``len(self)`` full batches per rank; its crops and flips are a pure function of
    ``(seed, e, row)``, so two epochs see different crops of a sample and a rerun sees the
    same ones. Labels as :class:`EvalLoader` (``KEY.cls``, checked against the Parquet).

    Args: as :class:`EvalLoader`, plus ``seed``, the crop's ``scale``, ``ratio``, ``flip``, and
    ``workers``: view-source processes (:class:`~pipeline.loader.ViewLoader`). Default 0, on
    the GPU too: a sample's plan is one box and one flip (microseconds, like
    :class:`EvalLoader`'s source), and a worker would import torch with this module.
    """

    def __init__(
        self,
        shards_dir: str | Path | ShardLocation,
        size: int = 224,
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        workers: int = 0,
        scale: tuple[float, float] = PROBE_SCALE,
        ratio: tuple[float, float] = RATIO,
        flip: float = 0.5,
        prefetch: int = 2,
    ):
        self.views = ProbeViews(size, scale, ratio, flip)
        self.location = locate(shards_dir)
        self._loader = ViewLoader(
            self.location,
            self.views,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
            num_threads=num_threads,
            workers=workers,
            prefetch=prefetch,
        )
        try:
            self.labels = torch.from_numpy(read_labels(self._loader.index))
        except BaseException:
            self._loader.close()
            raise
        classes = load_manifest(self._loader.index.root).get("classes")
        self.num_classes = max(len(classes or ()), int(self.labels.max()) + 1)
        self.device, self.size, self.batch_size = self._loader.device, size, batch_size

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self._loader)

    @property
    def num_samples(self) -> int:
        return len(self._loader.index)

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)

    def __iter__(self):
        """The batches of the current epoch; afterwards the loader stands at the next one."""
        for batch in self._loader:
            index = batch["index"]
            label = self.labels[index.cpu()].to(self.device, non_blocking=True)
            yield {"image": batch["image"], "label": label, "index": index}

    def close(self) -> None:
        self._loader.close()

    def __enter__(self) -> ProbeTrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
