"""The per-image function every engine runs: read, decode, validate, search, filter.

Kept free of pyarrow/tar code so that worker processes (local or on a Ray cluster) import little.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .images import ImageParams, RejectedImage, decode_image
from .proposals import FilterParams, SearchParams, filter_boxes, selective_search
from .sources import SourceItem


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the bytes of a build (the worker count does not)."""

    search: SearchParams = field(default_factory=SearchParams)
    filter: FilterParams = field(default_factory=FilterParams)
    image: ImageParams = field(default_factory=ImageParams)
    shard_size: int = 1000  # input images per shard (rejects leave a shard shorter)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.filter.top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {self.filter.top_n}")
        if not 0.0 <= self.filter.max_iou <= 1.0:
            raise ValueError(f"max_iou must be in [0, 1], got {self.filter.max_iou}")
        if not 0 < self.filter.min_aspect <= self.filter.max_aspect:
            raise ValueError(
                f"need 0 < min_aspect <= max_aspect, got {self.filter.min_aspect}, {self.filter.max_aspect}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"]["alpha_background"] = list(self.image.alpha_background)
        return d


@dataclass
class Sample:
    key: str
    source: str
    jpeg: bytes
    width: int
    height: int
    label: int | None
    boxes: np.ndarray  # [N, 4] int32 xyxy, decoded-image pixels, rank order
    num_raw_boxes: int
    transcoded: bool
    # Ground truth, set by a build with --annotations (None in a build without):
    # [M, 6] int32 x1, y1, x2, y2, category_id, iscrowd (KEY.gt), the annotations' areas [M],
    # and the image's id in the annotation file (None: an image the file has no entry for).
    gt: np.ndarray | None = None
    gt_areas: np.ndarray | None = None
    image_id: int | None = None

    def components(self) -> dict[str, bytes | str]:
        """The WebDataset sample: ``KEY.jpg``, ``KEY.boxes`` (raw little-endian int32 [N, 4]),
        ``KEY.cls`` (ASCII integer) when labelled, ``KEY.gt`` (raw little-endian int32
        [M, 6]) in a build with annotations."""
        comps: dict[str, bytes | str] = {"__key__": self.key, "jpg": self.jpeg}
        comps["boxes"] = np.ascontiguousarray(self.boxes, dtype="<i4").tobytes()
        if self.label is not None:
            comps["cls"] = str(self.label)
        if self.gt is not None:
            comps["gt"] = np.ascontiguousarray(self.gt, dtype="<i4").tobytes()
        return comps


@dataclass
class Reject:
    key: str
    source: str
    reason: str
    detail: str


def process_item(item: SourceItem, params: BuildParams) -> Sample | Reject:
    """One input -> a :class:`Sample` or a :class:`Reject`; never raises for a bad input."""
    if item.reject is not None:  # known while listing the source (see shards.sources)
        return Reject(item.key, item.source, *item.reject)
    try:
        data = item.read(params.image.max_file_bytes)
    except RejectedImage as e:
        return Reject(item.key, item.source, e.reason, e.detail)
    except OSError as e:
        return Reject(item.key, item.source, "unreadable", str(e))
    try:
        img = decode_image(data, params.image)
    except RejectedImage as e:
        return Reject(item.key, item.source, e.reason, e.detail)
    height, width = img.rgb.shape[:2]
    try:
        raw = selective_search(img.rgb, params.search, key=item.key)
    except Exception as e:  # noqa: BLE001 - cv2.error and friends become a reject
        return Reject(item.key, item.source, "search_failed", f"selective search failed: {e}")
    boxes = filter_boxes(raw, params.filter)
    return Sample(
        key=item.key,
        source=item.source,
        jpeg=img.jpeg,
        width=width,
        height=height,
        label=item.label,
        boxes=boxes,
        num_raw_boxes=len(raw),
        transcoded=img.transcoded,
    )
