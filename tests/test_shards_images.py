import io

import numpy as np
import pytest
from PIL import Image

from shards.images import ImageParams, RejectedImage, decode_image
from tests.conftest import encode, exif_rotated_jpeg, photo, png16


def _reason(data, params=ImageParams()):
    with pytest.raises(RejectedImage) as e:
        decode_image(data, params)
    return e.value.reason, e.value.detail


def test_rgb_jpeg_keeps_original_bytes():
    data = encode(photo())
    img = decode_image(data)
    assert img.jpeg is data and not img.transcoded
    assert img.rgb.shape == (180, 240, 3) and img.rgb.dtype == np.uint8


def test_grayscale_jpeg_kept_and_expanded_to_rgb():
    data = encode(photo(), "JPEG", mode="L")
    img = decode_image(data)
    assert img.jpeg is data
    assert img.rgb.shape == (180, 240, 3)
    assert (img.rgb[..., 0] == img.rgb[..., 1]).all()


def test_exif_rotation_swaps_dimensions_like_the_decoder():
    data = exif_rotated_jpeg(photo("coffee", (240, 180)), orientation=6)
    img = decode_image(data)
    assert img.jpeg is data  # DALI applies the orientation itself
    assert img.rgb.shape == (240, 180, 3)


def test_cmyk_jpeg_is_transcoded_to_rgb():
    src = photo("coffee")
    img = decode_image(encode(src, "JPEG", mode="CMYK"))
    assert img.transcoded
    out = Image.open(io.BytesIO(img.jpeg))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (240, 180)
    assert np.abs(img.rgb.astype(int) - src.astype(int)).mean() < 12


def test_png_alpha_composited_over_white():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 50:, 3] = 255  # left half fully transparent
    img = decode_image(encode(rgba, "PNG"))
    assert img.transcoded
    assert (img.rgb[:, :50] == 255).all()
    assert (img.rgb[:, 50:, 0] == 200).all() and (img.rgb[:, 50:, 1] == 0).all()


def test_16bit_png_scaled_not_clipped():
    arr = np.zeros((80, 80), np.uint16)
    arr[:, :40] = 65535
    arr[:, 40:] = 32896  # 128 * 257
    img = decode_image(png16(arr))
    assert (img.rgb[:, :40] == 255).all()
    assert (img.rgb[:, 40:] == 128).all()


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_file"),
        (b"plain text, not an image\n" * 20, "not_an_image"),
        (encode(photo(), "GIF"), "unsupported_format"),
        (encode(photo(size=(50, 300))), "too_small"),
    ],
)
def test_bad_inputs(data, reason):
    assert _reason(data)[0] == reason


def test_truncated_jpeg_is_corrupt():
    data = encode(photo())
    for cut in (len(data) - 2, len(data) // 2, 700):
        reason, detail = _reason(data[:cut])
        assert reason == "corrupt" and "truncated" in detail


def test_pixel_limit():
    reason, detail = _reason(encode(photo()), ImageParams(max_pixels=10_000))
    assert reason == "too_large" and "240x180" in detail


def test_min_side_uses_oriented_size():
    # 300x70 stored, rotated by EXIF to 70x300: shorter side 70 >= 64, kept
    img = decode_image(exif_rotated_jpeg(photo(size=(300, 70))))
    assert img.rgb.shape == (300, 70, 3)


@pytest.mark.parametrize("size", [(6000, 4000), (4000, 64), (64, 3000), (2000, 70)])
def test_very_large_and_extreme_aspect_images_are_processed(tmp_path, size):
    from shards.process import BuildParams, Sample, process_item
    from shards.sources import SourceItem

    w, h = size
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(arr))
    result = process_item(SourceItem(key="big", source=str(path), path=str(path)), BuildParams())
    assert isinstance(result, Sample)
    assert (result.width, result.height) == (w, h)
    b = result.boxes
    assert b.shape[1] == 4 and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
