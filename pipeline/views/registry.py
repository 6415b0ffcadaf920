"""The view-set interface the loader reads (:class:`ViewSet`) and the registry of view sets by
name: ``@register_view_set("mos")`` on a class, :func:`view_set` to build one,
:func:`list_view_sets` to list them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from .banks import Bank, SamplePlan

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["VIEW_SETS", "ViewSet", "list_view_sets", "register_view_set", "view_set"]


class ViewSet(Protocol):
    """What :class:`~pipeline.loader.ViewLoader` and :class:`~pipeline.source.ViewSource` read
    of a view set (:mod:`pipeline.views`). ``batch_plan`` is whatever :meth:`plan_batch` returns; the
    view set alone reads it."""

    needs_boxes: bool  # plan_sample reads the sample's proposal boxes (else it gets None)

    def banks(self) -> tuple[Bank, ...]:
        """The banks DALI renders, in the order of the pipeline's outputs."""
        ...

    def plan_batch(self, rng: np.random.Generator) -> Any:
        """What every sample of one batch shares, drawn from the batch's generator."""
        ...

    def plan_sample(
        self,
        width: int,
        height: int,
        boxes: np.ndarray | None,
        rng: np.random.Generator,
        batch_plan: Any,
    ) -> SamplePlan:
        """One sample's windows and photometric parameters per bank, and its extras."""
        ...

    def assemble(
        self, banks: dict[str, Tensor], extras: dict[str, Tensor], index: Tensor
    ) -> dict[str, Any]:
        """The batch dict: ``banks`` ``[B, F, 3, s, s]`` per bank, ``extras`` per name (host
        int32), ``index [B]`` int64 on the loader's device."""
        ...


_REGISTRY: dict[str, type] = {}
VIEW_SETS: Mapping[str, type] = MappingProxyType(_REGISTRY)  # name -> class, read-only
_V = TypeVar("_V", bound=type)


def register_view_set(name: str) -> Callable[[_V], _V]:
    """Class decorator: register a view set as ``name`` (which becomes its ``name``), so that
    :func:`view_set` builds it and :func:`list_view_sets` lists it."""

    def register(cls: _V) -> _V:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"view set {name!r} is already registered ({_REGISTRY[name]})")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return register


def list_view_sets() -> list[str]:
    """The registered view sets' names, sorted."""
    return sorted(_REGISTRY)


def view_set(name: str, **kwargs: Any) -> ViewSet:
    """The view set registered as ``name`` with its defaults (or ``kwargs``)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown view set {name!r}; valid: {list_view_sets()}") from None
    return cls(**kwargs)
