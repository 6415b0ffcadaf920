"""The ``KEY.boxes`` and ``KEY.gt`` members of a shard sample, read back as numpy arrays.

A shard sample's ``KEY.boxes`` holds its selective-search proposals as raw little-endian int32,
four numbers per box, no header: ``x1, y1, x2, y2`` in pixels of the decoded image (EXIF
orientation applied, as DALI and PIL decode ``KEY.jpg``; the ``width`` and ``height`` columns of
``proposals.parquet``), right/bottom edges exclusive (``x2 - x1`` is the box width), in
selective-search rank order. An image where no box survived the filter has a 0-byte member.

::

    import webdataset as wds
    import shards

    ds = wds.WebDataset(urls, shardshuffle=False).decode(shards.boxes_decoder, "rgb")
    for sample in ds:
        sample["jpg"]     # H x W x 3 float image (webdataset's "rgb")
        sample["boxes"]   # [N, 4] int32 x1, y1, x2, y2
        sample["gt"]      # [M, 6] int32 x1, y1, x2, y2, category_id, iscrowd (annotated builds)

A build with ``--annotations`` (COCO detection JSON) gives every sample a ``KEY.gt`` member: its
ground-truth objects as raw little-endian int32, six numbers per object, no header: the box
``x1, y1, x2, y2`` in the frame of ``KEY.boxes`` (decoded-image pixels, exclusive right/bottom
edges), the COCO ``category_id`` and ``iscrowd`` (0 or 1). An image without objects (or without
an entry in the annotation file) has a 0-byte member; ``proposals.parquet`` tells the two apart
(``image_id`` is null for the latter) and holds the same data as ``gt_boxes``, ``gt_labels``,
``gt_crowd``, with the annotations' ``gt_areas``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOX_DTYPE", "boxes_decoder", "read_boxes", "read_gt"]

BOX_DTYPE = np.dtype("<i4")  # how KEY.boxes stores each coordinate
_BOX_BYTES = 4 * BOX_DTYPE.itemsize
GT_FIELDS = 6  # KEY.gt: x1, y1, x2, y2, category_id, iscrowd
_GT_BYTES = GT_FIELDS * BOX_DTYPE.itemsize


def read_boxes(data: bytes | bytearray | memoryview, where: str = "KEY.boxes") -> np.ndarray:
    """``KEY.boxes`` bytes -> ``[N, 4]`` int32 array of ``x1, y1, x2, y2`` (a writable copy,
    native byte order; ``[0, 4]`` for a 0-byte member).

    ``ValueError`` (naming ``where``, e.g. ``"shard-000003.tar:photo.boxes"``) when ``data`` is
    not bytes, its length is not a multiple of 16 (4 int32 per box), or a box has a negative
    coordinate or no area (``x2 <= x1`` or ``y2 <= y1``): bytes the shard builder never writes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: expected bytes, got {type(data).__name__}")
    raw = memoryview(data).cast("B")
    if len(raw) % _BOX_BYTES:
        raise ValueError(
            f"{where}: {len(raw)} bytes is not a multiple of {_BOX_BYTES} "
            "(each box is 4 little-endian int32: x1, y1, x2, y2)"
        )
    boxes = np.frombuffer(raw, dtype=BOX_DTYPE).reshape(-1, 4).astype(np.int32)
    bad = (
        (boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: box {i} of {len(boxes)} is {boxes[i].tolist()}, not x1, y1, x2, y2 with "
            "0 <= x1 < x2 and 0 <= y1 < y2 (not a KEY.boxes member?)"
        )
    return boxes


def read_gt(data: bytes | bytearray | memoryview, where: str = "KEY.gt") -> np.ndarray:
    """``KEY.gt`` bytes -> ``[M, 6]`` int32 array of ``x1, y1, x2, y2, category_id, iscrowd``
    (a writable copy; ``[0, 6]`` for a 0-byte member).

    ``ValueError`` naming ``where`` when the length is not a multiple of 24 bytes, a box is not
    ``0 <= x1 < x2``, ``0 <= y1 < y2``, a category id is negative or ``iscrowd`` is not 0/1.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: expected bytes, got {type(data).__name__}")
    raw = memoryview(data).cast("B")
    if len(raw) % _GT_BYTES:
        raise ValueError(
            f"{where}: {len(raw)} bytes is not a multiple of {_GT_BYTES} (each object is 6 "
            "little-endian int32: x1, y1, x2, y2, category_id, iscrowd)"
        )
    gt = np.frombuffer(raw, dtype=BOX_DTYPE).reshape(-1, GT_FIELDS).astype(np.int32)
    bad = (
        (gt[:, :2] < 0).any(axis=1)
        | (gt[:, 2] <= gt[:, 0])
        | (gt[:, 3] <= gt[:, 1])
        | (gt[:, 4] < 0)
        | ((gt[:, 5] != 0) & (gt[:, 5] != 1))
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: object {i} of {len(gt)} is {gt[i].tolist()}, not x1, y1, x2, y2, "
            "category_id, iscrowd with 0 <= x1 < x2, 0 <= y1 < y2, category_id >= 0, iscrowd 0/1"
        )
    return gt


def boxes_decoder(key: str, data: bytes) -> np.ndarray | None:
    """A webdataset decoder handler: ``wds.WebDataset(urls).decode(boxes_decoder, "rgb")``.

    webdataset calls each handler as ``handler(".ext", bytes)`` and takes the first result that
    is not ``None``; this one answers only for the ``boxes`` extension (:func:`read_boxes`) and
    returns ``None`` for every other member, which the following handlers decode. The
    ``gt`` extension of an annotated build is read too (:func:`read_gt`).
    """
    ext = key.rsplit(".", 1)[-1].lower()
    if ext == "boxes":
        return read_boxes(data, where="a .boxes member")
    if ext == "gt":
        return read_gt(data, where="a .gt member")
    return None
