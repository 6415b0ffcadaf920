"""Decode and validate one input image the way the training pipeline will see it.

Every accepted image is stored as ``KEY.jpg``. JPEG inputs keep their original bytes only when
DALI (nvJPEG on a GPU, libjpeg-turbo on a CPU) decodes them to the same pixels and size as here:
baseline, extended or progressive Huffman coding (SOF0/1/2), 8-bit, grayscale or RGB, at most
one EXIF block and no XMP orientation. Every other input (PNG, WebP, BMP, CMYK/YCCK JPEG,
lossless SOF3 or arithmetic-coded JPEG, two EXIF blocks, XMP-only orientation) is converted to
8-bit RGB, turned upright and re-encoded as JPEG at ``transcode_quality``, with no metadata, so
that one decoder path serves the whole data set and the recorded size is the decoded size.

Measured with DALI 2.4 (``fn.decoders.image``, CPU): a lossless SOF3 JPEG fails to decode; with
two EXIF blocks DALI uses the last one and PIL the first; an XMP-only orientation is applied by
PIL and ignored by DALI. Such inputs are the ones re-encoded.
"""

from __future__ import annotations

import contextlib
import io
import struct
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
    min_side: int = 64  # shorter side below this: ``too_small`` (``--min-image-side``)
    max_pixels: int = 178_956_970  # width * height above this: ``too_large`` (``--max-pixels``)
    transcode_quality: int = 95
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    max_file_bytes: int = 1 << 30  # inputs larger than this are not read (``--max-file-bytes``)

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ValueError("min_side, max_pixels and max_file_bytes must be >= 1")
        if not 1 <= self.transcode_quality <= 100:
            raise ValueError(f"transcode_quality must be in [1, 100], got {self.transcode_quality}")


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


# JPEG frame markers DALI decodes on every device: baseline, extended, progressive Huffman.
_DALI_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_NAMES = {
    0xC3: "lossless (SOF3)",
    0xC5: "hierarchical (SOF5)",
    0xC6: "hierarchical progressive (SOF6)",
    0xC7: "hierarchical lossless (SOF7)",
    0xC9: "arithmetic-coded (SOF9)",
    0xCA: "arithmetic-coded progressive (SOF10)",
    0xCB: "arithmetic-coded lossless (SOF11)",
    0xCD: "hierarchical arithmetic (SOF13)",
    0xCE: "hierarchical arithmetic progressive (SOF14)",
    0xCF: "hierarchical arithmetic lossless (SOF15)",
}
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass(frozen=True)
class JpegInfo:
    sof: int | None  # frame marker (0xC0..0xCF), None when none was found before the scan
    precision: int
    components: int
    exif_blocks: int
    xmp_orientation: bool

    def why_not_kept(self) -> str | None:
        """None when DALI decodes these bytes as PIL does; else why they are re-encoded."""
        if self.sof not in _DALI_SOF:
            return f"{_SOF_NAMES.get(self.sof, 'unknown')} JPEG, which DALI does not decode"
        if self.precision != 8:
            return f"{self.precision}-bit JPEG"
        if self.components not in (1, 3):
            return f"{self.components}-component JPEG"
        if self.exif_blocks > 1:
            return f"{self.exif_blocks} EXIF blocks (DALI uses the last, PIL the first)"
        if self.xmp_orientation:
            return "orientation in XMP (DALI ignores it)"
        return None


def jpeg_info(data: bytes) -> JpegInfo:
    """Walk the JPEG marker segments up to the first scan (headers only, no decoding)."""
    sof, precision, components, exif, xmp = None, 0, 0, 0, False
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        payload = data[i + 4 : i + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and sof is None:
            sof = marker
            if len(payload) >= 6:
                precision, components = payload[0], payload[5]
        elif marker == 0xE1:
            if payload.startswith(b"Exif\x00\x00"):
                exif += 1
            elif payload.startswith(_XMP_HEADER) and b"Orientation" in payload:
                xmp = True
        elif marker in (0xDA, 0xD9):  # start of scan / end of image: headers are over
            break
        i += 2 + length
    return JpegInfo(sof, precision, components, exif, xmp)


@contextlib.contextmanager
def _no_bomb_check():
    """PIL's own decompression-bomb check off while the header is parsed: it would warn at
    89.5 MPixel and fail at 179; the one limit is ``ImageParams.max_pixels``, checked on the
    header's size before any pixel is decoded."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, params: ImageParams = ImageParams()) -> DecodedImage:
    """Validate and decode ``data``. Raises :class:`RejectedImage` with a precise reason."""
    if len(data) == 0:
        raise RejectedImage("empty_file", "zero-byte file")
    try:
        with _no_bomb_check():
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a corrupt header
        raise RejectedImage("corrupt", f"cannot read image header: {e}") from None
    if img.format not in _FORMATS:
        raise RejectedImage(
            "unsupported_format", f"format {img.format} is not one of {sorted(_FORMATS)}"
        )
    width, height = img.size
    if width * height > params.max_pixels:
        raise RejectedImage(
            "too_large",
            f"{width}x{height} exceeds the limit of {params.max_pixels} pixels (--max-pixels)",
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
            "too_small",
            f"{width}x{height}: shorter side below {params.min_side} px (--min-image-side)",
        )
    keep = (
        img.format in ("JPEG", "MPO")
        and img.mode in _KEEP_JPEG_MODES
        and jpeg_info(data).why_not_kept() is None
    )
    rgb_img = _to_rgb(oriented, params.alpha_background)
    if keep:
        jpeg = data
    else:
        buf = io.BytesIO()
        rgb_img.save(buf, "JPEG", quality=params.transcode_quality)
        jpeg = buf.getvalue()
    rgb = np.asarray(rgb_img, dtype=np.uint8)
    return DecodedImage(rgb=rgb, jpeg=jpeg, transcoded=not keep)
