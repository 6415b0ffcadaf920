import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main as cli
from shards.build import PROPOSALS_SCHEMA, BuildError, build_shards
from shards.engines import LocalEngine
from shards.process import BuildParams, Reject, Sample
from shards.proposals import SearchParams
from shards.sources import open_source
from shards.verify import verify_shards
from shards.writer import read_index
from tests.conftest import encode, make_mixed_folder, photo

FAST = BuildParams(search=SearchParams(max_side=128), shard_size=4)


def _build(src, out, params=FAST, **kw):
    kw.setdefault("workers", 2)
    return build_shards(str(src), out, params, progress=False, log=lambda s: None, **kw)


def _tar_samples(path):
    samples = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _all_files(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of the mixed folder, shared by the read-back tests."""
    tmp = tmp_path_factory.mktemp("built")
    root, expected = make_mixed_folder(tmp)
    out = tmp / "out"
    result = _build(root, out)
    return root, expected, out, result


def test_every_input_is_a_sample_or_a_reject(built):
    root, expected, out, result = built
    m = result.manifest
    kept = {k for k, v in expected.items() if v is None}
    assert m["counts"]["inputs"] == len(expected)
    assert m["counts"]["samples"] == len(kept)
    assert m["counts"]["samples"] + m["counts"]["rejects"] == m["counts"]["inputs"]
    assert m["counts"]["ignored_files"] == 1  # README.txt
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    got = {Path(r["source"]).relative_to(root).as_posix(): r["reason"] for r in rejects}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert all(r["detail"] for r in rejects)
    assert verify_shards(out, decode=True) == []


def test_parquet_schema_and_rows(built):
    _, expected, out, _ = built
    table = pq.read_table(out / "proposals.parquet")
    assert table.schema.remove_metadata() == PROPOSALS_SCHEMA
    assert table.schema.field("boxes").type == pa.list_(pa.list_(pa.int32(), 4))
    rows = table.to_pydict()
    i = rows["key"].index("rotated")
    assert (rows["width"][i], rows["height"][i]) == (180, 240)  # EXIF orientation applied
    j = rows["key"].index("flat_strip")
    assert rows["boxes"][j] == [] and rows["num_raw_boxes"][j] >= 1  # kept with zero boxes
    assert all(label is None for label in rows["label"])
    for boxes, w, h in zip(rows["boxes"], rows["width"], rows["height"]):
        b = np.array(boxes, dtype=np.int64).reshape(-1, 4)
        assert ((b[:, 2] - b[:, 0]) >= 64).all() and ((b[:, 3] - b[:, 1]) >= 64).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()


def test_round_trip_through_webdataset(built):
    import webdataset as wds

    root, _, out, result = built
    table = pq.read_table(out / "proposals.parquet").to_pydict()
    by_key = {k: i for i, k in enumerate(table["key"])}
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    seen = []
    for sample in wds.WebDataset(shards, shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        boxes = np.frombuffer(sample["boxes"], dtype="<i4").reshape(-1, 4)
        assert boxes.tolist() == table["boxes"][by_key[key]]
    assert seen == table["key"]
    # JPEG inputs in RGB/grayscale keep their original bytes
    tar_samples = {}
    for s in shards:
        tar_samples.update(_tar_samples(s))
    assert tar_samples["astronaut"]["jpg"] == (root / "astronaut.jpg").read_bytes()
    assert tar_samples["gray"]["jpg"] == (root / "gray.jpg").read_bytes()
    assert tar_samples["rotated"]["jpg"] == (root / "rotated.jpg").read_bytes()
    assert tar_samples["cmyk"]["jpg"] != (root / "cmyk.jpg").read_bytes()


def test_round_trip_through_dali_reader(built):
    from nvidia.dali import fn, pipeline_def, types

    _, _, out, _ = built
    table = pq.read_table(out / "proposals.parquet").to_pydict()
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    n = len(table["key"])

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def read():
        jpg, boxes = fn.readers.webdataset(
            paths=shards,
            index_paths=[s[:-4] + ".idx" for s in shards],
            ext=["jpg", "boxes"],
            dtypes=[types.UINT8, types.INT32],
            random_shuffle=False,
            name="Reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), boxes, jpg

    pipe = read()
    pipe.build()
    images, boxes, raw = pipe.run()
    tar_samples = {}
    for s in shards:
        tar_samples.update(_tar_samples(s))
    for i, key in enumerate(table["key"]):
        img = np.array(images[i])
        assert img.shape == (table["height"][i], table["width"][i], 3), key
        assert np.array(boxes[i]).reshape(-1, 4).tolist() == table["boxes"][i]
        assert np.array(raw[i]).tobytes() == tar_samples[key]["jpg"]


def test_index_matches_tar_offsets(built):
    _, _, out, _ = built
    for tar_path in out.glob("shard-*.tar"):
        data = tar_path.read_bytes()
        samples = _tar_samples(tar_path)
        for entry in read_index(tar_path.with_suffix(".idx")):
            for ext, (offset, size) in entry.items():
                assert any(data[offset : offset + size] == s.get(ext) for s in samples.values())


def test_deterministic_across_worker_counts(tmp_path, built):
    root, _, out, _ = built
    other = tmp_path / "other"
    _build(root, other, workers=1)
    assert _all_files(other) == _all_files(out)


def test_rerun_is_a_no_op_and_other_parameters_are_refused(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        (root / f"{i}.jpg").write_bytes(encode(photo(name)))
    out = tmp_path / "out"
    first = _build(root, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _build(root, out)
    assert again.up_to_date and again.processed == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert again.manifest == first.manifest
    with pytest.raises(BuildError, match="other inputs or parameters"):
        _build(root, out, BuildParams(search=SearchParams(max_side=96), shard_size=4))


def test_all_rejected_chunk_leaves_no_shard(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.jpg").write_bytes(b"junk")
    (root / "c.jpg").write_bytes(encode(photo()))
    out = tmp_path / "out"
    result = _build(root, out, BuildParams(search=SearchParams(max_side=128), shard_size=2))
    assert [s["name"] for s in result.manifest["shards"]] == ["shard-000001.tar"]
    assert not (out / "shard-000000.tar").exists()
    assert verify_shards(out) == []


def test_worker_crash_becomes_a_reject(mixed_folder):
    from tests.crash_helpers import crash_on_key

    root, _ = mixed_folder
    source = open_source(str(root))
    results = list(LocalEngine(workers=2).map(crash_on_key, source.items, FAST))
    assert [r.key for r in results] == [i.key for i in source.items]
    crashed = [r for r in results if isinstance(r, Reject) and r.reason == "worker_crashed"]
    assert [r.key for r in crashed] == ["sub_coffee"]
    assert sum(isinstance(r, Sample) for r in results) == 9


def test_imagenet_layout_labels(tmp_path):
    root = tmp_path / "train"
    for cls, names in {"n01_cat": ["chelsea", "coffee"], "n02_rocket": ["rocket"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            (root / cls / f"{name}.JPEG").write_bytes(encode(photo(name)))
    out = tmp_path / "out"
    result = _build(root, out, layout="imagenet")
    assert result.manifest["classes"] == ["n01_cat", "n02_rocket"]
    assert json.loads((out / "classes.json").read_text()) == ["n01_cat", "n02_rocket"]
    rows = pq.read_table(out / "proposals.parquet").to_pydict()
    assert dict(zip(rows["key"], rows["label"])) == {
        "n01_cat_chelsea": 0,
        "n01_cat_coffee": 0,
        "n02_rocket_rocket": 1,
    }
    samples = _tar_samples(out / "shard-000000.tar")
    assert samples["n02_rocket_rocket"]["cls"] == b"1"
    assert verify_shards(out) == []

    # the labelled shards are themselves a source: re-shard them, labels kept, no image lost
    again = tmp_path / "again"
    result2 = _build(out, again, BuildParams(search=SearchParams(max_side=128), shard_size=2))
    assert result2.manifest["build"]["layout"] == "wds"
    rows2 = pq.read_table(again / "proposals.parquet").to_pydict()
    assert sorted(rows2["label"]) == [0, 0, 1]
    assert verify_shards(again) == []


def test_coco_layout_keys(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "train2017" / "000000000139.jpg").write_bytes(encode(photo("coffee")))
    (root / "annotations").mkdir()
    result = _build(root, tmp_path / "out", layout="auto")
    assert result.manifest["build"]["layout"] == "coco"
    assert pq.read_table(tmp_path / "out" / "proposals.parquet").column("key").to_pylist() == [
        "000000000139"
    ]


def test_verify_names_what_is_wrong(tmp_path, built):
    _, _, out, _ = built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tar = sorted(broken.glob("shard-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload
    tar.write_bytes(bytes(data))
    table = pq.read_table(broken / "proposals.parquet")
    pq.write_table(table.slice(1), broken / "proposals.parquet")
    problems = verify_shards(broken)
    assert any("sha256" in p and tar.name in p for p in problems)
    assert any("no row in proposals.parquet" in p for p in problems)
    assert any("rows, manifest says" in p for p in problems)


def _wait_for(path_glob: Path, pattern: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(path_glob.glob(pattern)):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page"]
    for i, name in enumerate(names):
        (root / f"{i:02d}_{name}.png").write_bytes(encode(photo(name), "PNG"))
    reference = tmp_path / "reference"
    params = BuildParams(search=SearchParams(max_side=160), shard_size=2)
    _build(root, reference, params)

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "shards",
        "build",
        str(root),
        str(out),
        "--max-side",
        "160",
        "--shard-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert _wait_for(out / ".ssl-cli" / "parts", "shard-000001.tar.json", timeout=120), (
            "build made no progress"
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its worker processes, mid-shard
        proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    first_two = {"shard-000000.tar", "shard-000001.tar"}
    assert first_two <= set(done_before)

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    # completed shards were not rewritten, and the result equals an uninterrupted build
    for name in first_two:
        assert (out / name).stat().st_ino == done_before[name]
    assert _all_files(out) == _all_files(reference)
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.tmp-*"))
    assert verify_shards(out) == []


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_matches_process_pool(tmp_path, built):
    pytest.importorskip("ray")
    root, _, out, _ = built
    ray_out = tmp_path / "ray"
    _build(root, ray_out, engine="ray")
    assert _all_files(ray_out) == _all_files(out)


def test_cli_build_verify_inspect(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.jpg").write_bytes(encode(photo("astronaut")))
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "shards",
            "build",
            str(root),
            str(out),
            "--max-side",
            "128",
            "--workers",
            "1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1 samples in 1 shards, 1 rejected" in r.output
    r = runner.invoke(cli, ["shards", "verify", str(out)])
    assert r.exit_code == 0 and "OK" in r.output
    r = runner.invoke(cli, ["shards", "inspect", str(out)])
    assert r.exit_code == 0
    assert "1 samples, 1 rejected" in r.output and "not_an_image: 1" in r.output
    (out / "shard-000000.idx").write_text("v1.2 5\n")
    r = runner.invoke(cli, ["shards", "verify", str(out)])
    assert r.exit_code == 1 and "shard-000000.idx" in r.output


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["shards", "build", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(
        cli, ["shards", "build", str(tmp_path), str(tmp_path / "o"), "--mode", "slow"]
    )
    assert r.exit_code == 2 and "'slow' is not one of" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(cli, ["shards", "build", str(tmp_path / "empty"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "no images found" in r.output
    r = runner.invoke(cli, ["shards", "verify", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "manifest.json not found" in r.output


def _write_cifar10(root: Path, per_batch: int = 3) -> np.ndarray:
    import pickle

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f)
    photos = [np.asarray(photo(n, (32, 32))) for n in ("astronaut", "coffee", "chelsea")]
    all_labels = []
    for b, fname in enumerate(["data_batch_1", "data_batch_2", "test_batch"]):
        imgs = np.stack([photos[(b + i) % 3] for i in range(per_batch)])
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # R plane, G plane, B plane
        labels = rng.integers(0, 10, per_batch).tolist()
        all_labels.append(labels)
        with open(root / fname, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"filenames": [b"x.png"] * per_batch}, f)
    return all_labels


def test_cifar10_pickles_round_trip_with_labels(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    labels = _write_cifar10(root)
    # two of the five training batches: not the full CIFAR file set, so asked for by name
    train = _build(root, tmp_path / "train", layout="cifar")
    test = _build(root, tmp_path / "test", layout="cifar", split="test")
    assert (
        train.manifest["build"]["layout"] == "cifar" and train.manifest["build"]["split"] == "train"
    )
    assert test.manifest["build"]["split"] == "test" and test.manifest["counts"]["samples"] == 3
    assert train.manifest["classes"][3] == "cat"
    assert train.manifest["build"]["parameters"]["image"]["transcode_quality"] == 95
    rows = pq.read_table(tmp_path / "train" / "proposals.parquet").to_pydict()
    assert rows["label"] == labels[0] + labels[1]
    assert set(zip(rows["width"], rows["height"])) == {(32, 32)}
    test_rows = pq.read_table(tmp_path / "test" / "proposals.parquet").to_pydict()
    assert test_rows["label"] == labels[2]
    samples = _tar_samples(tmp_path / "train" / "shard-000000.tar")
    first = np.asarray(Image.open(io.BytesIO(samples["cifar10_train_000000"]["jpg"])))
    assert (
        np.abs(first.astype(int) - np.asarray(photo("astronaut", (32, 32))).astype(int)).mean() < 8
    )
    assert samples["cifar10_train_000000"]["cls"] == str(labels[0][0]).encode()
    assert verify_shards(tmp_path / "train") == [] and verify_shards(tmp_path / "test") == []


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    import pickle

    from shards.sources import SourceError

    root = tmp_path / "cifar"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"hook": shutil.rmtree}, f)
    with pytest.raises(SourceError, match="unexpected object shutil.rmtree"):
        open_source(str(root), "cifar")
