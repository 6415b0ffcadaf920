"""``shards.read_boxes`` / ``shards.boxes_decoder``: a shard set read with plain webdataset."""

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset.autodecode import DecodingError

import shards
from shards.build import build_shards
from shards.process import BuildParams
from shards.proposals import SearchParams
from tests.conftest import encode, photo

PHOTOS = [("astronaut", (160, 160)), ("coffee", (180, 120)), ("chelsea", (150, 100))]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("boxes") / "images"
    src.mkdir()
    for name, size in PHOTOS:
        (src / f"{name}.jpg").write_bytes(encode(photo(name, size), quality=92))
    # flat and 200 x 64: its one proposal (the whole image) fails the aspect filter, 0 boxes
    (src / "flat.jpg").write_bytes(encode(np.full((64, 200, 3), 128, np.uint8), quality=95))
    out = src.parent / "shards"
    params = BuildParams(search=SearchParams(max_side=128), shard_size=2)
    build_shards(str(src), out, params, workers=1, progress=False, log=lambda *_: None)
    return out


def _rows(shard_dir):
    table = pq.read_table(shard_dir / "proposals.parquet").to_pylist()
    return {r["key"]: r for r in table}


def test_webdataset_with_the_decoder_gives_the_parquet_boxes(shard_dir):
    rows = _rows(shard_dir)
    urls = [str(p) for p in sorted(shard_dir.glob("shard-*.tar"))]
    assert len(urls) == 2
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(
        shards.boxes_decoder, "rgb"
    )
    seen = {}
    for sample in ds:
        boxes = sample["boxes"]
        assert isinstance(boxes, np.ndarray) and boxes.dtype == np.int32 and boxes.shape[1] == 4
        row = rows[sample["__key__"]]
        expected = np.asarray(row["boxes"], dtype=np.int32).reshape(-1, 4)
        np.testing.assert_array_equal(boxes, expected)
        # pixel units of the decoded image: webdataset's "rgb" decode has the parquet's size
        assert sample["jpg"].shape == (row["height"], row["width"], 3)
        if len(boxes):
            assert (boxes[:, 2] <= row["width"]).all() and (boxes[:, 3] <= row["height"]).all()
        seen[sample["__key__"]] = len(boxes)
    assert set(seen) == set(rows)
    assert seen["flat"] == 0 and sum(seen.values()) > 0


def test_decoder_leaves_other_members_to_the_next_handler():
    assert shards.boxes_decoder(".jpg", b"\xff\xd8") is None
    assert shards.boxes_decoder(".cls", b"3") is None
    box = np.array([[1, 2, 30, 40]], "<i4").tobytes()
    np.testing.assert_array_equal(shards.boxes_decoder(".boxes", box), [[1, 2, 30, 40]])
    np.testing.assert_array_equal(shards.boxes_decoder("boxes", box), [[1, 2, 30, 40]])


def test_read_boxes_layout():
    data = np.array([[0, 0, 64, 80], [10, 5, 100, 70]], "<i4").tobytes()
    boxes = shards.read_boxes(data)
    assert boxes.shape == (2, 4) and boxes.dtype == np.int32 and boxes.flags.writeable
    assert boxes.tolist() == [[0, 0, 64, 80], [10, 5, 100, 70]]
    assert shards.read_boxes(bytearray(data)).tolist() == boxes.tolist()
    assert shards.read_boxes(b"").shape == (0, 4)
    # little-endian on disk, whatever the machine's byte order
    assert shards.read_boxes(
        b"\x01\x00\x00\x00" + b"\x00" * 4 + b"\x02\x01\x00\x00" * 2
    ).tolist() == [[1, 0, 258, 258]]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00" * 17, "17 bytes is not a multiple of 16"),
        (b"\x00" * 12, "12 bytes is not a multiple of 16"),
        (np.array([[5, 5, 5, 9]], "<i4").tobytes(), r"box 0 of 1 is \[5, 5, 5, 9\]"),
        (np.array([[0, 0, 9, 9], [0, 8, 4, 3]], "<i4").tobytes(), "box 1 of 2"),
        (np.array([[-1, 0, 9, 9]], "<i4").tobytes(), "0 <= x1 < x2"),
        ("0 0 9 9", "expected bytes, got str"),
    ],
)
def test_malformed_bytes_raise(data, match):
    with pytest.raises(ValueError, match=match):
        shards.read_boxes(data, where="shard-000000.tar:photo.boxes")
    with pytest.raises(ValueError, match="shard-000000.tar:photo.boxes"):
        shards.read_boxes(data, where="shard-000000.tar:photo.boxes")


def test_malformed_member_fails_the_webdataset_read(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in [("a.jpg", encode(np.zeros((8, 8, 3), np.uint8))), ("a.boxes", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    ds = wds.WebDataset(str(path), shardshuffle=False).decode(shards.boxes_decoder, "rgb")
    with pytest.raises(DecodingError) as exc:
        next(iter(ds))
    assert exc.value.key == "a" and exc.value.url == str(path)
    assert isinstance(exc.value.__cause__, ValueError)
    assert "multiple of 16" in str(exc.value.__cause__)
