"""Shards the pipeline tests read (built once per session), and DALI's own reader on them.

``photo_shards()``: 12 real photographs of assorted sizes and aspect ratios, with selective-search
proposals. ``constant_shards()``: 9 flat grey images of distinct values (no proposals), so that
a stitched cell tells which sample it came from.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shards.build import build_shards
from shards.process import BuildParams
from shards.proposals import SearchParams
from tests.conftest import encode, photo

PHOTOS = [
    ("astronaut", (160, 160)),
    ("coffee", (180, 120)),
    ("chelsea", (150, 100)),
    ("camera", (128, 128)),
    ("rocket", (96, 144)),
    ("coins", (140, 110)),
    ("moon", (100, 100)),
    ("brick", (200, 90)),
    ("grass", (120, 120)),
    ("gravel", (90, 160)),
    ("text", (224, 86)),
    ("immunohistochemistry", (130, 130)),
]
GREYS = [20 + 25 * i for i in range(9)]  # 20, 45, ..., 220


def _tmpdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def _build(src: Path, shard_size: int) -> Path:
    out = src.parent / "shards"
    params = BuildParams(search=SearchParams(max_side=160), shard_size=shard_size)
    build_shards(str(src), out, params, workers=1, progress=False, log=lambda *_: None)
    return out


@functools.cache
def photo_shards() -> Path:
    src = _tmpdir("ssl-photos-") / "images"
    src.mkdir()
    for name, size in PHOTOS:
        (src / f"{name}.jpg").write_bytes(encode(photo(name, size), quality=92))
    return _build(src, shard_size=4)


@functools.cache
def constant_shards() -> Path:
    src = _tmpdir("ssl-greys-") / "images"
    src.mkdir()
    for v in GREYS:
        (src / f"grey{v:03d}.jpg").write_bytes(
            encode(np.full((80, 96, 3), v, np.uint8), quality=95)
        )
    return _build(src, shard_size=4)


def grey_of_row(shards: Path) -> np.ndarray:
    """Row of proposals.parquet -> the grey value of that sample."""
    keys = pq.read_table(shards / "proposals.parquet", columns=["key"]).column("key").to_pylist()
    return np.array([int(k[len("grey") :]) for k in keys])


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("num_shards", [1, 2])
def test_dali_webdataset_reader_reads_the_shards(num_shards):
    """The shard contract: fn.readers.webdataset reads KEY.jpg and the raw int32 KEY.boxes."""
    from pipeline.graph import webdataset_pipeline

    shards = photo_shards()
    table = pq.read_table(shards / "proposals.parquet")
    expect = {
        (int(w), int(h), tuple(np.asarray(b, np.int32).reshape(-1)))
        for w, h, b in zip(
            table.column("width").to_pylist(),
            table.column("height").to_pylist(),
            table.column("boxes").to_pylist(),
        )
    }
    seen = []
    for shard_id in range(num_shards):
        pipe = webdataset_pipeline(shards, batch_size=5, shard_id=shard_id, num_shards=num_shards)
        size = pipe.reader_meta("Reader")["epoch_size_padded"] // num_shards
        for _ in range(-(-size // 5)):
            jpeg, boxes, shape, crop = pipe.run()
            for i in range(len(jpeg)):
                h, w, c = np.asarray(shape[i]).tolist()
                assert c == 3 and np.asarray(crop[i]).shape == (224, 224, 3)
                seen.append((w, h, tuple(np.asarray(boxes[i]).tolist())))
        del pipe
    # every sample read (the padded last batch repeats one), with its boxes and size
    assert set(seen) == expect
    assert len(seen) >= len(expect)
