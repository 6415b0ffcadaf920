"""Shard sets: ``ssl-cli shards build`` and friends; :func:`read_boxes`, :func:`read_gt` and
:func:`boxes_decoder` read a sample's ``KEY.boxes`` and ``KEY.gt`` (see :mod:`shards.boxes`)."""

from .boxes import BOX_DTYPE, boxes_decoder, read_boxes, read_gt

__all__ = ["BOX_DTYPE", "boxes_decoder", "read_boxes", "read_gt"]
