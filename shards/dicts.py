"""Nested mappings as dotted keys: the one flattener of configs, build parameters and reports."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["flatten"]


def flatten(d: Mapping, leaves: Collection[str] = (), prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``. A non-empty mapping is walked into, unless its key
    is in ``leaves`` (a free-form section compared whole, such as ``model.backbone_kwargs``);
    an empty mapping, a list or a scalar is a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and k not in leaves:
            out.update(flatten(v, leaves, f"{key}."))
        else:
            out[key] = v
    return out
