"""Decode and validate one input image the way the training pipeline will see it.

Every accepted image is stored as ``KEY.jpg``. JPEG inputs in RGB or grayscale keep their
original bytes (the GPU decoder reads them as they are, EXIF orientation applied, as here);
every other input (PNG, WebP, BMP, CMYK/YCCK JPEG) is converted to 8-bit RGB and re-encoded as
JPEG at ``transcode_quality``, so that one decoder path serves the whole data set.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}
_KEEP_JPEG_MODES = {"RGB", "L"}


class RejectedImage(Exception):
    """An input that cannot be used; ``reason`` is a short stable code, ``detail`` explains."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageParams:
    min_side: int = 64  # an image whose shorter side is below this holds no valid proposal
    max_pixels: int = 178_956_970  # width * height; above it decoding is refused (PIL's bomb limit)
    transcode_quality: int = 95
    alpha_background: tuple[int, int, int] = (255, 255, 255)


@dataclass
class DecodedImage:
    rgb: np.ndarray  # [H, W, 3] uint8, EXIF orientation applied
    jpeg: bytes  # what is stored as KEY.jpg
    transcoded: bool


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float grayscale are rescaled, alpha is composited."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(arr * 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, params: ImageParams = ImageParams()) -> DecodedImage:
    """Validate and decode ``data``. Raises :class:`RejectedImage` with a precise reason."""
    if len(data) == 0:
        raise RejectedImage("empty_file", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a corrupt header
        raise RejectedImage("corrupt", f"cannot read image header: {e}") from None
    if img.format not in _FORMATS:
        raise RejectedImage(
            "unsupported_format", f"format {img.format} is not one of {sorted(_FORMATS)}"
        )
    width, height = img.size
    if width * height > params.max_pixels:
        raise RejectedImage(
            "too_large", f"{width}x{height} exceeds the limit of {params.max_pixels} pixels"
        )
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, any decoder error
        raise RejectedImage("corrupt", f"cannot decode: {e}") from None
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - broken EXIF block
        raise RejectedImage("corrupt", f"unreadable EXIF orientation: {e}") from None
    width, height = oriented.size
    if min(width, height) < params.min_side:
        raise RejectedImage(
            "too_small", f"{width}x{height}: shorter side below {params.min_side} px"
        )
    keep = img.format in ("JPEG", "MPO") and img.mode in _KEEP_JPEG_MODES
    rgb_img = _to_rgb(oriented, params.alpha_background)
    if keep:
        jpeg = data
    else:
        buf = io.BytesIO()
        rgb_img.save(buf, "JPEG", quality=params.transcode_quality)
        jpeg = buf.getvalue()
    rgb = np.asarray(rgb_img, dtype=np.uint8)
    return DecodedImage(rgb=rgb, jpeg=jpeg, transcoded=not keep)
