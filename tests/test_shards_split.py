"""``ssl-cli shards split``: two shard folders that share nothing, each a complete, verified
folder whose samples are the source's bytes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main as cli
from shards.build import build_shards
from shards.process import BuildParams
from shards.proposals import SearchParams
from shards.split import SplitError, split_rows, split_shards
from shards.verify import verify_shards
from tests.conftest import photo
from tests.test_annotations import _coco

PARAMS = BuildParams(search=SearchParams(max_side=96), shard_size=4)
NAMES = ["astronaut", "coffee", "chelsea", "rocket"]


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard of a folder, in member order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """13 photographs in 4 class folders, built in shards of 4."""
    tmp = tmp_path_factory.mktemp("split")
    for i in range(13):
        folder = tmp / "src" / NAMES[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(NAMES[i % 4], (80 + i, 72))).save(folder / f"im{i:02d}.png")
    out = tmp / "shards"
    build_shards(
        str(tmp / "src"), out, PARAMS, layout="imagenet", progress=False, log=lambda _: None
    )
    return out


def test_the_sides_share_nothing_and_keep_every_sample_byte_for_byte(tmp_path, labelled):
    got = split_shards(labelled, tmp_path / "tr", tmp_path / "va", 0.25, seed=3, log=print)
    source = _members(labelled)
    train, val = _members(tmp_path / "tr"), _members(tmp_path / "va")
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(source)
    for key, members in {**train, **val}.items():
        assert members == source[key]
        assert list(members) == list(source[key])  # member order too
    # the val side is exactly the rows split_rows picks (the rule eval --val-fraction uses)
    keys = pq.read_table(labelled / "proposals.parquet").column("key").to_pylist()
    train_rows, val_rows = split_rows(len(keys), 0.25, seed=3)
    assert len(val_rows) == round(0.25 * 13) == 3
    assert list(val) == [keys[i] for i in val_rows]
    assert list(train) == [keys[i] for i in train_rows]
    for side, out in (("train", tmp_path / "tr"), ("val", tmp_path / "va")):
        assert verify_shards(out) == []
        m = got[side]
        assert m["build"]["subset"]["side"] == side
        assert m["build"]["subset"]["val_fraction"] == 0.25
        assert m["counts"]["samples"] == len(_members(out))
        assert m["classes"] == json.loads((labelled / "manifest.json").read_text())["classes"]
        rows = pq.read_table(out / "proposals.parquet").to_pydict()
        src = pq.read_table(labelled / "proposals.parquet").to_pydict()
        for i, key in enumerate(rows["key"]):
            j = src["key"].index(key)
            assert rows["label"][i] == src["label"][j] and rows["boxes"][i] == src["boxes"][j]
    assert [s["samples"] for s in got["train"]["shards"]] == [4, 4, 2]  # the source's size
    assert not list(tmp_path.glob("*.split-tmp"))


def test_rerun_keeps_a_finished_side_and_finishes_a_killed_one(tmp_path, labelled, capsys):
    tr, va = tmp_path / "tr", tmp_path / "va"
    split_shards(labelled, tr, va, 0.25)
    inode = (tr / "shard-000000.tar").stat().st_ino
    # a split killed while writing the val side: its temporary folder, no val folder
    os.rename(va, va.with_name("va.split-tmp"))
    (va.with_name("va.split-tmp") / "manifest.json").unlink()
    capsys.readouterr()
    split_shards(labelled, tr, va, 0.25)
    out = capsys.readouterr().out
    assert f"{tr}: already this split's train side" in out
    assert (tr / "shard-000000.tar").stat().st_ino == inode
    assert verify_shards(va) == [] and not va.with_name("va.split-tmp").exists()
    # another fraction into the same folders is refused, nothing is overwritten
    with pytest.raises(SplitError, match=r"tr exists and is not this split's train side"):
        split_shards(labelled, tr, va, 0.5)
    assert (tr / "shard-000000.tar").stat().st_ino == inode


def test_a_changed_source_shard_is_named(tmp_path, labelled):
    src = tmp_path / "src"
    src.mkdir()
    for f in labelled.iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    data = bytearray((src / "shard-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (src / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(SplitError, match=r"shard-000001.tar: sha256 differs from the manifest"):
        split_shards(src, tmp_path / "tr", tmp_path / "va", 0.25)
    assert not (tmp_path / "tr").exists() and not (tmp_path / "va").exists()


def test_ground_truth_goes_with_its_samples(tmp_path):
    ann, doc = _coco(tmp_path, n=6)
    out = tmp_path / "shards"
    build_shards(
        str(tmp_path / "img"), out, PARAMS, annotations=ann, progress=False, log=lambda _: None
    )
    got = split_shards(out, tmp_path / "tr", tmp_path / "va", 0.5, seed=1)
    source = json.loads((out / "manifest.json").read_text())["annotations"]
    for side in ("train", "val"):
        folder = tmp_path / ("tr" if side == "train" else "va")
        assert verify_shards(folder) == []  # checks every row's truth against the COCO file
        assert all("gt" in m for m in _members(folder).values())
    objects = [got[s]["annotations"]["counts"]["objects"] for s in ("train", "val")]
    assert sum(objects) == source["counts"]["objects"]
    assert got["val"]["annotations"]["sha256"] == source["sha256"]


def test_cli_split_and_its_errors(tmp_path, labelled):
    runner = CliRunner()
    tr, va = tmp_path / "tr", tmp_path / "va"
    r = runner.invoke(
        cli, ["shards", "split", str(labelled), str(tr), str(va), "--val-fraction", "0.2"]
    )
    assert r.exit_code == 0, r.output
    assert f"{va}: val, 3 samples in 1 shards" in r.output  # round(0.2 * 13) = 3
    r = runner.invoke(cli, ["shards", "verify", str(va)])
    assert r.exit_code == 0 and "OK" in r.output
    r = runner.invoke(cli, ["shards", "inspect", str(va)])
    assert r.exit_code == 0 and "the val side of" in r.output
    for fraction, why in (("1.5", "must be in (0, 1)"), ("0.01", "leaves an empty side")):
        r = runner.invoke(
            cli,
            [
                "shards",
                "split",
                str(labelled),
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--val-fraction",
                fraction,
            ],
        )
        assert r.exit_code == 2 and why in r.output
    r = runner.invoke(
        cli, ["shards", "split", str(labelled), str(tr), str(tr), "--val-fraction", "0.2"]
    )
    assert r.exit_code == 2 and "the same folder" in r.output
    r = runner.invoke(
        cli, ["shards", "split", str(tmp_path / "nope"), str(tr), str(va), "--val-fraction", "0.2"]
    )
    assert r.exit_code == 1 and "nope" in r.output


def test_split_rows_is_a_fixed_permutation():
    a = split_rows(100, 0.1, seed=0)
    b = split_rows(100, 0.1, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1])
    assert not np.array_equal(split_rows(100, 0.1, seed=1)[1], a[1])
