import io

import numpy as np
import pytest
from PIL import Image


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def photo(name: str = "astronaut", size: tuple[int, int] | None = (240, 180)) -> np.ndarray:
    """A real photograph shipped with scikit-image, as RGB uint8, optionally resized to (w, h)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    img = Image.fromarray(arr[..., :3])
    if size is not None:
        img = img.resize(size, Image.BILINEAR)
    return np.asarray(img)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(arr, "JPEG", exif=exif.tobytes())


def png16(arr_u16: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_u16.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path):
    return make_mixed_folder(tmp_path)


def make_mixed_folder(tmp_path):
    """A folder with good photographs in many encodings and every kind of bad input.

    Returns (root, expected): expected maps relative path -> reject reason, or None if kept.
    """
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    a = photo("astronaut")
    c = photo("coffee")
    ch = photo("chelsea")
    good_jpeg = encode(a)
    files = {
        "astronaut.jpg": (good_jpeg, None),
        "sub/coffee.png": (encode(c, "PNG"), None),
        "sub/chelsea.webp": (encode(ch, "WEBP"), None),
        "chelsea.bmp": (encode(ch, "BMP"), None),
        "gray.jpg": (encode(a, "JPEG", mode="L"), None),
        "cmyk.jpg": (encode(c, "JPEG", mode="CMYK"), None),
        "alpha.png": (encode(np.dstack([ch, np.full(ch.shape[:2], 128, np.uint8)]), "PNG"), None),
        "deep.png": (png16(a[..., 0].astype(np.uint16) * 257), None),
        "rotated.jpg": (exif_rotated_jpeg(c), None),
        "flat_strip.png": (encode(np.full((70, 300, 3), 90, np.uint8), "PNG"), None),
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "corrupt"),
        "notes.jpg": (b"this is not an image, just text\n" * 10, "not_an_image"),
        "tiny.png": (encode(a[:40, :50], "PNG"), "too_small"),
        "anim.png": (encode(a, "GIF"), "unsupported_format"),
    }
    expected = {}
    for rel, (data, reason) in files.items():
        (root / rel).write_bytes(data)
        expected[rel] = reason
    (root / "README.txt").write_text("not an input")
    return root, expected
