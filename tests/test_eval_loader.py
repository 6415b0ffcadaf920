"""The evaluation loader (``pipeline.eval``) on CPU: every sample once in row order, labels from
``KEY.cls``, rank split, the centre-crop transform, unlabelled shards refused.

``labelled_shards(split)`` builds (once per session) small ImageNet-style shard sets that the
other ``test_eval_*`` files use too.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.eval import EvalLoader, UnlabelledShardsError, rank_rows, resize_side
from shards.build import build_shards
from shards.process import BuildParams
from shards.proposals import SearchParams
from tests.conftest import encode, photo
from tests.test_pipeline_shards import _tmpdir

warnings.filterwarnings("ignore", message=".*external source.*not used.*")

# class folder -> (photo, (width, height)); sizes of both orientations and odd margins
SPLITS = {
    "train": {
        "n01_cat": [("chelsea", (120, 90)), ("coffee", (90, 130)), ("astronaut", (101, 77))],
        "n02_space": [("rocket", (80, 120)), ("moon", (96, 96)), ("camera", (110, 85))],
        "n03_texture": [("brick", (140, 80)), ("grass", (90, 90)), ("gravel", (77, 99))],
        "n04_coins": [("coins", (130, 100))],
    },
    "val": {
        "n01_cat": [("chelsea", (100, 80)), ("coffee", (80, 100))],
        "n02_space": [("rocket", (70, 110))],
        "n03_texture": [("brick", (120, 70)), ("gravel", (90, 90))],
    },
}
PARAMS = BuildParams(search=SearchParams(max_side=128), shard_size=4)


def _build(src, out, layout: str) -> None:
    build_shards(
        str(src), out, PARAMS, layout=layout, workers=1, progress=False, log=lambda s: None
    )


@functools.cache
def labelled_shards(split: str = "train"):
    """An ImageNet-layout shard set (labels = sorted class folders), built once."""
    root = _tmpdir(f"ssl-eval-{split}-") / "train"
    for cls, items in SPLITS[split].items():
        (root / cls).mkdir(parents=True)
        for name, size in items:
            (root / cls / f"{name}.JPEG").write_bytes(encode(photo(name, size), quality=92))
    out = root.parent / "shards"
    _build(root, out, "imagenet")
    return out


@functools.cache
def unlabelled_shards():
    """A folder-layout shard set of two photographs: no labels."""
    src = _tmpdir("ssl-eval-unlabelled-") / "images"
    src.mkdir()
    for name in ("coffee", "rocket"):
        (src / f"{name}.jpg").write_bytes(encode(photo(name, (96, 96))))
    out = src.parent / "shards"
    _build(src, out, "folder")
    return out


def parquet_labels(shards) -> np.ndarray:
    return np.asarray(pq.read_table(shards / "proposals.parquet").column("label").to_pylist())


def collect(loader) -> list[dict]:
    return [dict(batch) for batch in loader]


# ---------------------------------------------------------------------------------- coverage


def test_every_sample_once_in_row_order_with_its_label():
    shards = labelled_shards("train")
    keys = pq.read_table(shards / "proposals.parquet").column("key").to_pylist()
    expected = parquet_labels(shards)
    classes = sorted(SPLITS["train"])
    # the labels are the sorted class folders, as the keys say
    assert [classes[y] for y in expected] == [k.rsplit("_", 1)[0] for k in keys]
    with EvalLoader(shards, size=32, batch_size=4, num_threads=1) as loader:
        assert loader.num_samples == 10 and len(loader) == 3 and loader.num_classes == 4
        for _ in range(2):  # iterable again, the same batches
            batches = collect(loader)
            assert [len(b["index"]) for b in batches] == [4, 4, 2]  # last batch partial, no pad
            for b in batches:
                assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 32, 32)
                assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
            rows = torch.cat([b["index"] for b in batches])
            labels = torch.cat([b["label"] for b in batches])
            assert rows.tolist() == list(range(10))
            assert labels.tolist() == expected.tolist()


def test_an_interrupted_pass_restarts_from_the_first_batch():
    with EvalLoader(labelled_shards("train"), size=32, batch_size=4, num_threads=1) as loader:
        first = next(iter(loader))
        again = collect(loader)
        assert again[0]["index"].tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(again[0]["image"], first["image"], rtol=0, atol=0)
        assert torch.cat([b["index"] for b in again]).tolist() == list(range(10))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_take_contiguous_disjoint_parts(world_size):
    shards = labelled_shards("train")
    parts = []
    for rank in range(world_size):
        with EvalLoader(
            shards, size=32, batch_size=2, rank=rank, world_size=world_size, num_threads=1
        ) as loader:
            rows = [r for b in collect(loader) for r in b["index"].tolist()]
            assert rows == rank_rows(10, rank, world_size).tolist()
            parts.append(rows)
    assert sum(parts, []) == list(range(10))  # rank order = row order, nothing twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_ranks_than_samples_leaves_some_ranks_empty():
    with EvalLoader(
        labelled_shards("val"), size=32, batch_size=2, rank=7, world_size=8, num_threads=1
    ) as loader:
        assert len(loader) == 0 and collect(loader) == []


# --------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("size", [32, 64])
def test_centre_crop_of_the_resized_image(size):
    """Shorter side resized to floor(size / 0.875) (antialiased linear, as PIL's BILINEAR),
    the centre size x size kept (offset rounded half up), ImageNet normalization."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with EvalLoader(labelled_shards("train"), size=size, batch_size=16, num_threads=1) as loader:
        (batch,) = collect(loader)
        assert batch["image"].shape == (10, 3, size, size)
        for image, row in zip(batch["image"], batch["index"].tolist()):
            src = Image.open(io.BytesIO(loader.index.read_jpeg(row).tobytes()))
            src = ImageOps.exif_transpose(src).convert("RGB")
            w, h = src.size
            side = resize_side(size)
            nw, nh = (side, round(h * side / w)) if w <= h else (round(w * side / h), side)
            resized = src.resize((nw, nh), Image.BILINEAR)
            left, top = int(np.floor((nw - size) / 2 + 0.5)), int(np.floor((nh - size) / 2 + 0.5))
            ref = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)
            got = (image * std + mean) * 255
            err = (got - torch.from_numpy(ref).permute(2, 0, 1)).abs().mean()
            assert err < 2.0, (row, float(err))  # grey levels: resampling differs slightly


def test_resize_side():
    assert resize_side(224) == 256 and resize_side(32) == 36 and resize_side(96) == 109
    with pytest.raises(ValueError, match="crop_pct"):
        resize_side(224, 1.5)


# ------------------------------------------------------------------------------------ errors


def test_unlabelled_shards_are_a_clear_error():
    out = unlabelled_shards()
    with pytest.raises(UnlabelledShardsError, match=rf"{out}: 2 of 2 samples have no label"):
        EvalLoader(out, size=32, batch_size=2)


def test_bad_arguments():
    shards = labelled_shards("val")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        EvalLoader(shards, batch_size=0)
    with pytest.raises(ValueError, match="rank must be in"):
        EvalLoader(shards, size=32, rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            EvalLoader(shards, device="cuda")


@pytest.mark.gpu
def test_gpu_decoding_matches_the_cpu_path():
    shards = labelled_shards("train")
    with EvalLoader(shards, size=64, batch_size=4, device="cuda") as gpu:
        got = collect(gpu)
    with EvalLoader(shards, size=64, batch_size=4, device="cpu", num_threads=1) as cpu:
        ref = collect(cpu)
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
    for g, c in zip(got, ref):
        assert g["image"].is_cuda and g["label"].is_cuda
        assert torch.equal(g["label"].cpu(), c["label"])
        # nvJPEG and libjpeg-turbo differ by a few levels at most
        assert (g["image"].cpu() - c["image"]).abs().mean() < 0.05
