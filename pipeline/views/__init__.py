"""View sets: which crops of a sample to cut, with which augmentation, and how to assemble them
(:mod:`pipeline.views.banks`)."""

from .banks import (
    MOS_VIEW1,
    MOS_VIEW2,
    VIEW_SETS,
    Bank,
    DecodeCropViews,
    MOSViews,
    MultiCropViews,
    SamplePlan,
    UniVIPViews,
    ViewSet,
    crop_windows,
    frame_windows,
    list_view_sets,
    register_view_set,
    view_set,
)
from .banks import RATIO as RATIO
from .banks import _bank as _bank
from .banks import _check_range as _check_range
from .banks import _check_size as _check_size
from .banks import _Group as _Group
from .banks import _mosaic_frames as _mosaic_frames
from .banks import _plan as _plan

__all__ = [
    "MOS_VIEW1",
    "MOS_VIEW2",
    "VIEW_SETS",
    "Bank",
    "DecodeCropViews",
    "MOSViews",
    "MultiCropViews",
    "SamplePlan",
    "UniVIPViews",
    "ViewSet",
    "crop_windows",
    "frame_windows",
    "list_view_sets",
    "register_view_set",
    "view_set",
]
