"""Shard sets: ``ssl-cli shards build`` and friends; :func:`read_boxes` and
:func:`boxes_decoder` read a sample's ``KEY.boxes`` (see :mod:`shards.boxes`)."""

from .boxes import BOX_DTYPE, boxes_decoder, read_boxes

__all__ = ["BOX_DTYPE", "boxes_decoder", "read_boxes"]
