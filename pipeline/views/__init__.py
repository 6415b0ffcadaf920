"""View sets: which crops of a sample to cut, with which augmentation, and how to assemble them.

A view set is a frozen dataclass of paper defaults, registered by name
(:func:`register_view_set`, built by :func:`view_set`, listed by :func:`list_view_sets`), with
the interface :class:`ViewSet` that the loader reads:

- :meth:`banks`: the DALI side. Every view is rendered as *frames* of one fixed size; frames of
  one size and one augmentation form a *bank*, one DALI sequence ``[F, s, s, 3]`` per sample
  that one chain of operators (resize per frame, then colour, blur, solarize and normalize
  over the whole sequence with per-frame arguments) turns into ``[B, F, 3, s, s]`` float32.
  A few batched chains instead of one chain per view, and a bank's chain holds only the
  operators its augmentation can use (no solarization where its probability is 0).
- :meth:`plan_batch` (numpy, once per batch, from the batch's generator): what every sample of
  the batch shares (the MOS stitching layouts; ``None`` for the other view sets).
- :meth:`plan_sample` (numpy, in the view source, once per sample): the crop windows of every
  frame in the decoded image and every frame's photometric parameters, drawn from the
  sample's own generator (and from its proposal boxes where ``needs_boxes``).
- :meth:`assemble` (torch, on the loader's device): the batch dict the trainer reads.

Modules: :mod:`~pipeline.views.banks` (banks, sample plans, windows: what every view set
shares), :mod:`~pipeline.views.registry` (:class:`ViewSet`, the registry), one module per view
set: :mod:`~pipeline.views.mos` (``MOSViews``), :mod:`~pipeline.views.univip`
(``UniVIPViews``), :mod:`~pipeline.views.multicrop` (``MultiCropViews``),
:mod:`~pipeline.views.decode` (``DecodeCropViews``). Every name is importable from
:mod:`pipeline.views`.
"""

from .banks import RATIO, Bank, SamplePlan, crop_windows, frame_windows
from .decode import DecodeCropViews
from .mos import MOS_VIEW1, MOS_VIEW2, MOSViews
from .multicrop import MultiCropViews
from .registry import VIEW_SETS, ViewSet, list_view_sets, register_view_set, view_set
from .univip import UniVIPViews

__all__ = [
    "MOS_VIEW1",
    "MOS_VIEW2",
    "VIEW_SETS",
    "RATIO",
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
