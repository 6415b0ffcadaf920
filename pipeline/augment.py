"""Photometric augmentations of BYOL / MOS Table 6, drawn per crop in numpy, applied in DALI.

Every random decision is drawn on the host by :func:`draw_photometric` from a per-sample
``numpy.random.Generator`` (the view source seeds one per sample from ``(seed, epoch, row)``),
and applied to a whole sequence of crops at once by :func:`apply_photometric` with DALI
per-frame arguments. Drawing on the host makes a batch a pure function of the seed and its
position, so a resumed run reproduces the interrupted one exactly (DALI's own random operators
cannot be rewound to a mid-epoch state), and it costs microseconds per crop.

A crop's augmentations (BYOL, MOS Table 6; DALI applies the blur first, see
:func:`apply_photometric`):

1. colour jitter with probability ``jitter`` (0.8): brightness, contrast, saturation factors
   ``U[1-x, 1+x]`` (0.4, 0.4, 0.2), hue shift ``U[-0.1, 0.1]`` of the hue circle;
2. grayscale with probability ``grayscale`` (0.2): luma ``0.299 R + 0.587 G + 0.114 B``;
3. Gaussian blur with probability ``blur``, sigma ``U[0.1, 2.0]`` pixels of the output crop,
   kernel ``2 * ceil(3 sigma) + 1`` taps (torchvision's BYOL recipe uses 23 taps at 224 px; a
   Gaussian holds 99.7% of its weight within ``3 sigma``);
4. solarization with probability ``solarize``: ``x >= 128 -> 255 - x``;
5. horizontal flip with probability ``flip`` (0.5), applied by the crop itself (a reversed
   region of interest in ``fn.resize``);
6. normalization with the ImageNet mean and standard deviation, CHW float32.

Known differences from torchvision's ``ColorJitter``: the four jitter factors are applied in
DALI's fixed order (``fn.color_twist``: brightness, contrast around mid-grey 128, then hue and
saturation in YIQ space) instead of a random order, and contrast pivots on mid-grey instead of
the image's mean grey. Grayscale is saturation 0 of the same operator; with luma weights summing
to 1 it equals grayscale applied after the jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

__all__ = [
    "BYOL_VIEW1",
    "BYOL_VIEW2",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_SIGMA_RADIUS",
    "NO_AUGMENT",
    "Augment",
    "Photometric",
    "apply_photometric",
    "blur_radius",
    "draw_photometric",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128  # of 0..255; BYOL's 0.5 of [0, 1]
# The Gaussian kernel spans 2 * ceil(3 sigma) + 1 taps (DALI's default for a given sigma).
_SIGMA_TAPS = 3.0


def _check_prob(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Augment:
    """Probabilities and ranges of one view's photometric augmentation (plus its flip).

    Defaults are MOS Table 6 / BYOL except ``blur`` and ``solarize``, which differ per view
    (see :data:`BYOL_VIEW1`, :data:`BYOL_VIEW2`).
    """

    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip", "jitter", "grayscale", "blur", "solarize"):
            _check_prob(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not isinstance(self.hue, (int, float)) or not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        lo, hi = self.sigma
        if not 0 < lo <= hi:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {self.sigma}")

    @classmethod
    def from_dict(cls, d: dict) -> Augment:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Augment keys {sorted(unknown)}; valid: {sorted(known)}")
        d = dict(d)
        if "sigma" in d:
            d["sigma"] = tuple(d["sigma"])
        return cls(**d)


# BYOL (Grill et al. 2020, Table 6 of its appendix): view 1 always blurred, never solarized;
# view 2 rarely blurred, sometimes solarized.
BYOL_VIEW1 = Augment(blur=1.0, solarize=0.0)
BYOL_VIEW2 = Augment(blur=0.1, solarize=0.2)
# Identity photometric transform (crop, resize and normalization only): previews, tests.
NO_AUGMENT = Augment(flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


def blur_radius(sigma: float) -> int:
    """Half-width of the Gaussian kernel for ``sigma``, in pixels: ``ceil(3 sigma)``."""
    return int(math.ceil(_SIGMA_TAPS * sigma))


# Kernel half-width for the largest default sigma (2.0): 6 pixels.
MAX_SIGMA_RADIUS = blur_radius(Augment().sigma[1])


@dataclass
class Photometric:
    """Per-crop parameters, ``n`` crops: the arguments of :func:`apply_photometric`.

    ``colour [n, 4]`` float32: brightness, contrast, saturation factors and hue shift in
    degrees; ``sigma [n]`` float32 and ``window [n]`` int32 (window 1: no blur);
    ``solarize [n]`` uint8 (0/1); ``flip [n]`` bool (applied by the crop geometry).
    """

    colour: np.ndarray
    sigma: np.ndarray
    window: np.ndarray
    solarize: np.ndarray
    flip: np.ndarray

    def take(self, idx: np.ndarray) -> Photometric:
        """The parameters of crops ``idx`` (a crop split into several frames repeats)."""
        return Photometric(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def concat(parts: list[Photometric]) -> Photometric:
        return Photometric(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Photometric))
        )


@lru_cache(maxsize=64)
def _table(augs: tuple[Augment, ...]) -> dict[str, np.ndarray]:
    """Per-crop parameter columns of a tuple of augmentations (cached: few distinct tuples)."""
    cols = {
        name: np.array([getattr(a, name) for a in augs], dtype=np.float64)
        for name in (
            "flip",
            "jitter",
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "grayscale",
            "blur",
            "solarize",
        )
    }
    cols["sigma_lo"] = np.array([a.sigma[0] for a in augs])
    cols["sigma_hi"] = np.array([a.sigma[1] for a in augs])
    return cols


def draw_photometric(
    aug: Augment | tuple[Augment, ...], n: int | None, rng: np.random.Generator
) -> Photometric:
    """Draw the parameters of ``n`` crops augmented by ``aug``, or of one crop per entry of a
    tuple of augmentations (``n`` None), with one generator call."""
    augs = aug if isinstance(aug, tuple) else (aug,) * int(n)
    t = _table(augs)
    u = rng.random((len(augs), 10))
    jitter = u[:, 0] < t["jitter"]
    b = np.where(jitter, 1.0 + t["brightness"] * (2.0 * u[:, 1] - 1.0), 1.0)
    c = np.where(jitter, 1.0 + t["contrast"] * (2.0 * u[:, 2] - 1.0), 1.0)
    s = np.where(jitter, 1.0 + t["saturation"] * (2.0 * u[:, 3] - 1.0), 1.0)
    hue = np.where(jitter, 360.0 * t["hue"] * (2.0 * u[:, 4] - 1.0), 0.0)
    s = np.where(u[:, 5] < t["grayscale"], 0.0, s)
    blur = u[:, 6] < t["blur"]
    sigma = t["sigma_lo"] + (t["sigma_hi"] - t["sigma_lo"]) * u[:, 7]
    window = np.where(blur, 2 * np.ceil(_SIGMA_TAPS * sigma) + 1, 1)
    return Photometric(
        colour=np.stack([b, c, s, hue], axis=1).astype(np.float32),
        sigma=np.where(blur, sigma, 1.0).astype(np.float32),  # any sigma > 0: window 1 = identity
        window=window.astype(np.int32),
        solarize=(u[:, 8] < t["solarize"]).astype(np.uint8),
        flip=u[:, 9] < t["flip"],
    )


def apply_photometric(frames, colour, sigma=None, window=None, solarize=None, crop=None):
    """DALI graph: the per-frame chain on a sequence ``frames [F, H, W, 3]`` uint8.

    ``colour [F, 4]``, ``sigma [F]``, ``window [F]``: per-sample CPU nodes; ``solarize
    [F, 1, 1, 1]`` uint8 on the device of ``frames``. Blur (solarization) is left out of the
    graph when ``sigma`` (``solarize``) is None: no frame of the sequence needs it. ``crop``:
    side of the centre kept after the blur (frames rendered with a blur margin).

    The blur runs first, so that the colour operators see only the pixels kept: blur and the
    colour transform are both linear and commute (up to the clamp to 0..255 that follows the
    colour transform). Returns uint8 ``[F, crop, crop, 3]``.
    """
    from nvidia.dali import fn, types

    x = frames
    if sigma is not None:
        x = fn.gaussian_blur(x, sigma=fn.per_frame(sigma), window_size=fn.per_frame(window))
    if crop is not None:
        x = fn.crop(x, crop=(crop, crop))
    x = fn.color_twist(
        x,
        brightness=fn.per_frame(colour[:, 0]),
        contrast=fn.per_frame(colour[:, 1]),
        saturation=fn.per_frame(colour[:, 2]),
        hue=fn.per_frame(colour[:, 3]),
    )
    if solarize is not None:
        # x ^ 255 == 255 - x for uint8; the [F, 1, 1, 1] mask broadcasts over each frame
        invert = (x >= SOLARIZE_THRESHOLD) & (solarize > 0)
        x = fn.cast(x ^ (fn.cast(invert, dtype=types.UINT8) * np.uint8(255)), dtype=types.UINT8)
    return x
