"""Object-level evaluation inputs: the ground truth of a shard set and its whole images, resized.

::

    from pipeline.eval_objects import ObjectLoader, read_ground_truth

    gt = read_ground_truth("data/shards/scenes_val")   # objects, classes, multi-label targets
    with ObjectLoader("data/shards/scenes_val", size=64, batch_size=128, device="cuda") as loader:
        for batch in loader:
            batch["image"]   # [b, 3, 64, 64] float32, normalized: the whole image, resized
            batch["index"]   # [b] int64: rows of proposals.parquet (annotated images only)
            batch["boxes"]   # [k, 4] float32 xyxy of the batch's objects, pixels of "image"
            batch["owner"]   # [k] int64: which image of the batch each box belongs to

Ground truth (:func:`read_ground_truth`): the ``image_id``, ``gt_boxes``, ``gt_labels`` and
``gt_crowd`` columns of ``proposals.parquet`` and the manifest's ``annotations.categories``,
written by ``ssl-cli shards build --annotations instances.json`` (COCO detection format).
Images with a null ``image_id`` (no entry in the JSON) are left out: nothing is known about
them. Crowd boxes are left out of the objects and of the multi-label targets, as COCO's
evaluation ignores them. COCO category ids are not contiguous (1..90 for 80 classes): class
``c`` is the ``c``-th id in increasing order of the manifest's categories.

Transform: decode (nvJPEG on a GPU, DALI's CPU decoder otherwise), resize the **whole image**
to ``size x size`` (antialiased linear filter; the aspect ratio is not kept), normalize with
the ImageNet mean and standard deviation, CHW float32. Nothing is cropped, so every object
stays in the input; the boxes are scaled by the same factors (``size / width`` across,
``size / height`` down), as float coordinates of the resized image (not rounded). The
centre crop of :class:`pipeline.eval.EvalLoader` would cut objects near the border out.

Order: the annotated rows of ``proposals.parquet`` in row order, in batches of ``batch_size``
(the last one smaller); every image once. One process (no rank split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from shards.location import ShardLocation, locate
from shards.verify import load_manifest

from .eval import _RowSource, eval_pipeline
from .loader import _dali_reason, _device, _to_torch, default_parallelism, first_undecodable
from .source import ShardIndex

__all__ = [
    "GT_COLUMNS",
    "GroundTruth",
    "NoGroundTruthError",
    "ObjectLoader",
    "read_ground_truth",
]

# The columns ``shards build --annotations`` adds to proposals.parquet.
GT_COLUMNS = ("image_id", "gt_boxes", "gt_labels", "gt_crowd")


class NoGroundTruthError(ValueError):
    """The shard set was built without ``--annotations``."""


@dataclass(frozen=True)
class GroundTruth:
    """The objects and image-level labels of a shard set (module docstring).

    Objects are the non-crowd boxes of the annotated images, flat, ordered by row: object
    ``j`` of image ``i`` (``rows[i]``) is ``offsets[i] + j``.
    """

    root: str
    categories: tuple[tuple[int, str], ...]  # (COCO id, name), increasing id: class c = entry c
    rows: np.ndarray  # [M] int64: annotated rows of proposals.parquet, increasing
    width: np.ndarray  # [M] int32: decoded image width (EXIF applied)
    height: np.ndarray  # [M] int32
    offsets: np.ndarray  # [M + 1] int64: objects of image i are offsets[i]:offsets[i+1]
    boxes: np.ndarray  # [K, 4] int32 xyxy, pixels of the decoded image, right/bottom exclusive
    classes: np.ndarray  # [K] int64 contiguous class index
    num_crowd: int  # crowd boxes left out
    num_unannotated: int  # rows with a null image_id, left out

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def num_images(self) -> int:
        return len(self.rows)

    @property
    def num_objects(self) -> int:
        return len(self.classes)

    def image_targets(self) -> np.ndarray:
        """Multi-hot ``[M, C]`` float32: class ``c`` of image ``i`` is 1 when the image holds a
        (non-crowd) object of that class. An annotated image without objects is all zeros."""
        targets = np.zeros((self.num_images, self.num_classes), dtype=np.float32)
        owner = np.repeat(np.arange(self.num_images), np.diff(self.offsets))
        targets[owner, self.classes] = 1.0
        return targets

    def object_owner(self) -> np.ndarray:
        """``[K]`` int64: the position (in :attr:`rows`) of each object's image."""
        return np.repeat(np.arange(self.num_images, dtype=np.int64), np.diff(self.offsets))


def _no_ground_truth(root, what: str) -> NoGroundTruthError:
    return NoGroundTruthError(
        f"{root}: no ground truth ({what}). Object-level evaluation needs shards built with "
        "COCO annotations: ssl-cli shards build SRC OUT --annotations instances.json"
    )


def _list_values(column, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow ``list<...>`` column as (per-row lengths ``[N]``, flat values): a null list
    counts as empty. ``width``: the values are fixed-size lists of that width, flattened to
    ``[n, width]``."""

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(array)  # skips null lists
    if width is not None:
        values = pc.list_flatten(values)
        flat = values.to_numpy(zero_copy_only=False).reshape(-1, width)
    else:
        flat = values.to_numpy(zero_copy_only=False)
    return lengths, flat


def read_ground_truth(shards_dir: str | Path | ShardLocation | ShardIndex) -> GroundTruth:
    """The ground truth of a shard folder (or of an open :class:`ShardIndex`; URLs through
    its cache). Raises :class:`NoGroundTruthError` naming the folder when it was built
    without ``--annotations``, ``ValueError`` naming the sample for a label outside the
    manifest's categories or a box outside its image (a damaged shard set)."""
    if isinstance(shards_dir, ShardIndex):
        root = shards_dir.root
    else:
        location = locate(shards_dir)
        if location.is_remote:
            location.cache.open()  # the manifest and proposals.parquet, fetched when changed
            root = location.cache.root
        else:
            root = location.path
    manifest = load_manifest(root)
    path = root / manifest["files"]["proposals"]
    categories, ids = _categories(root, manifest, path)
    table = pq.read_table(path, columns=["key", "width", "height", *GT_COLUMNS])
    annotated = table.column("image_id").is_valid().to_numpy(zero_copy_only=False)
    n_box, boxes = _list_values(table.column("gt_boxes"), 4)
    n_label, labels = _list_values(table.column("gt_labels"))
    n_crowd, crowd = _list_values(table.column("gt_crowd"))
    keys = table.column("key").to_pylist()
    if not (np.array_equal(n_box, n_label) and np.array_equal(n_box, n_crowd)):
        row = int(np.flatnonzero((n_box != n_label) | (n_box != n_crowd))[0])
        raise ValueError(
            f"{path}: sample {keys[row]!r} has {n_box[row]} gt_boxes, {n_label[row]} "
            f"gt_labels and {n_crowd[row]} gt_crowd flags; run ssl-cli shards verify"
        )
    width = table.column("width").to_numpy().astype(np.int32)
    height = table.column("height").to_numpy().astype(np.int32)
    owner_row = np.repeat(np.arange(len(keys), dtype=np.int64), n_box)
    boxes = boxes.astype(np.int32)
    crowd = crowd.astype(bool)

    _check_boxes(path, keys, owner_row, boxes, labels, ids, width, height)
    position = np.searchsorted(ids, labels)
    keep = ~crowd & annotated[owner_row]
    rows = np.flatnonzero(annotated).astype(np.int64)
    per_row = np.bincount(owner_row[keep], minlength=len(keys))[rows]
    return GroundTruth(
        root=str(root),
        categories=tuple(categories),
        rows=rows,
        width=width[rows],
        height=height[rows],
        offsets=np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64),
        boxes=boxes[keep],
        classes=position[keep].astype(np.int64),
        num_crowd=int((crowd & annotated[owner_row]).sum()),
        num_unannotated=int((~annotated).sum()),
    )


def _categories(root: Path, manifest: dict, path: Path) -> tuple[list, np.ndarray]:
    """The manifest's annotation categories as sorted ``(id, name)`` and their ids; a folder
    built without annotations is a :class:`NoGroundTruthError`."""
    names = set(pq.read_schema(path).names)
    missing = [c for c in GT_COLUMNS if c not in names]
    if missing:
        raise _no_ground_truth(root, f"proposals.parquet has no {', '.join(missing)} column")
    annotations = manifest.get("annotations")
    if not annotations or not annotations.get("categories"):
        raise _no_ground_truth(root, "manifest.json records no annotation categories")
    categories = sorted((int(c["id"]), str(c["name"])) for c in annotations["categories"])
    ids = np.array([c[0] for c in categories], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{root / 'manifest.json'}: annotations.categories repeats an id")
    return categories, ids


def _check_boxes(
    path: Path,
    keys: list[str],
    owner_row: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    width: np.ndarray,
    height: np.ndarray,
) -> None:
    """Every ground-truth box has a category of the manifest and lies inside its image; the
    first that does not is a ``ValueError`` naming its sample."""
    position = np.searchsorted(ids, labels)
    unknown = (position >= len(ids)) | (ids[np.minimum(position, len(ids) - 1)] != labels)
    if unknown.any():
        j = int(np.flatnonzero(unknown)[0])
        raise ValueError(
            f"{path}: sample {keys[owner_row[j]]!r} has category id {int(labels[j])}, not one "
            f"of the manifest's {len(ids)} categories; run ssl-cli shards verify"
        )
    w, h = width[owner_row], height[owner_row]
    x0, y0, x1, y1 = boxes.T if len(boxes) else (np.zeros(0),) * 4
    bad = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h) | (x1 <= x0) | (y1 <= y0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: sample {keys[owner_row[j]]!r}: ground-truth box {boxes[j].tolist()} "
            f"(xyxy, right/bottom exclusive) is outside its {w[j]}x{h[j]} image; run "
            "ssl-cli shards verify"
        )


class ObjectLoader:
    """Whole images of the annotated samples of ``shards_dir`` and their ground-truth boxes
    (module docstring).

    Args:
        shards_dir: an output folder of ``ssl-cli shards build --annotations``.
        size: side of the square input (the whole image is resized to it).
        batch_size: images per batch; the last batch may be smaller.
        device: ``"cpu"`` or ``"cuda[:N]"`` (GPU decoding and resizing).
        num_threads: DALI CPU threads [default: this rank's share of the node's cores on CPU,
            ``min(8, share // 2)`` with a GPU: the view loader's threads,
            :func:`~pipeline.loader.default_parallelism`].
        prefetch: batches DALI prepares ahead.

    Raises :class:`NoGroundTruthError` (a ``ValueError``) at construction when the shards carry
    no ground truth. :attr:`ground_truth` is the :class:`GroundTruth`.
    """

    def __init__(
        self,
        shards_dir: str | Path | ShardLocation,
        size: int = 224,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        prefetch: int = 2,
    ):
        for name, v in (("size", size), ("batch_size", batch_size), ("prefetch", prefetch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.device = _device(device)
        gpu = self.device.type == "cuda"
        self.num_threads = num_threads or default_parallelism(gpu)[0]
        self.size, self.batch_size, self.prefetch = size, batch_size, prefetch
        self.location = locate(shards_dir)
        self.index = ShardIndex(self.location)
        try:
            self.ground_truth = read_ground_truth(self.index)
        except BaseException:
            self.index.close()
            raise
        self._closed = False

    def __len__(self) -> int:
        """Batches (the last one may be partial)."""
        return -(-self.ground_truth.num_images // self.batch_size)

    def _scaled_boxes(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes of images ``first:last`` (positions in the ground truth's rows) in the pixels
        of the resized input, float32 ``[k, 4]``, and their image in the batch ``[k]``."""
        gt = self.ground_truth
        lo, hi = int(gt.offsets[first]), int(gt.offsets[last])
        owner = gt.object_owner()[lo:hi]
        scale = np.stack(
            [self.size / gt.width[owner], self.size / gt.height[owner]], axis=1
        )  # [k, 2]: x, y
        boxes = gt.boxes[lo:hi].astype(np.float64) * np.tile(scale, 2)
        return (
            torch.from_numpy(boxes.astype(np.float32)),
            torch.from_numpy(owner - first),
        )

    def _explain(self, error: BaseException, batch: int) -> Exception:
        rows = self.ground_truth.rows
        window = rows[batch * self.batch_size : (batch + 1 + self.prefetch) * self.batch_size]
        found = first_undecodable(self.index, [int(r) for r in window], self.device.index)
        if found is None:
            return RuntimeError(
                f"the object evaluation pipeline on {self.location.display} failed at batch {batch}: "
                f"{_dali_reason(error)}"
            )
        row, reason = found
        return self.index.sample_error(
            row, f"its .jpg cannot be decoded by DALI's image decoder ({reason})"
        )

    def __iter__(self):
        """The batches in row order: ``{"image" [b, 3, S, S] float32, "index" [b] int64,
        "boxes" [k, 4] float32, "owner" [k] int64, "classes" [k] int64}``; images and boxes
        on the loader's device. A new pipeline per pass."""
        if self._closed:
            raise RuntimeError("the loader is closed")
        if len(self) == 0:
            return
        gt = self.ground_truth
        source = _RowSource(self.index, gt.rows, self.batch_size)
        pipe = eval_pipeline(
            source,
            self.batch_size,
            self.size,
            crop_pct=None,  # the whole image, resized to size x size
            device_id=self.device.index if self.device.type == "cuda" else None,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
        )
        try:
            for i in range(len(self)):
                try:
                    images, rows = pipe.run()
                except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError or its own types
                    raise self._explain(e, i) from None
                index = _to_torch(rows, torch.device("cpu")).reshape(-1).clone()
                first, last = i * self.batch_size, min((i + 1) * self.batch_size, gt.num_images)
                if not torch.equal(index, torch.from_numpy(gt.rows[first:last])):
                    raise RuntimeError(
                        f"{self.location.display}: batch {i} is not the rows expected"
                    )
                boxes, owner = self._scaled_boxes(first, last)
                lo, hi = int(gt.offsets[first]), int(gt.offsets[last])
                yield {
                    "image": _to_torch(images, self.device),
                    "index": index.to(self.device),
                    "boxes": boxes.to(self.device),
                    "owner": owner.to(self.device),
                    "classes": torch.from_numpy(gt.classes[lo:hi]).to(self.device),
                }
        finally:
            pipe._shutdown()
            del pipe

    def close(self) -> None:
        """Unmap the shards."""
        self.index.close()
        self._closed = True

    def __enter__(self) -> ObjectLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
