"""Shard folders in object storage, against a real S3 protocol server (moto's server mode):
upload, verify, the loader through the shard cache (same batches as from local disk), damaged
and missing remote shards, eviction, one download per file for processes sharing a cache, a
killed upload resuming, the upload watcher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.loader import ViewLoader
from pipeline.source import ShardError, ShardIndex, check_shards
from shards import remote
from shards.remote import RemoteShardError, ShardCache, ShardUploader, upload_shards
from shards.verify import inspect_shards, load_manifest, verify_shards
from tests.conftest import encode
from tests.s3_server import s3_server_fixture  # noqa: F401 - the module's server
from tests.test_pipeline_loader import SMALL_MOS
from tests.test_pipeline_shards import _build, _tmpdir, constant_shards, photo_shards

warnings.filterwarnings("ignore", message=".*external source.*not used.*")
REPO = Path(__file__).resolve().parents[1]
_uploaded: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    """Every test gets its own default cache root (never the user's cache)."""
    monkeypatch.setenv(remote.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(remote.CACHE_BYTES_ENV, raising=False)


def many_shards() -> Path:
    """9 flat greys in 5 shards of 2 (the last of 1): a folder with more shards than a batch."""
    if "local:many" not in _uploaded:
        src = _tmpdir("ssl-remote-") / "images"
        src.mkdir()
        for v in range(9):
            (src / f"g{v}.jpg").write_bytes(
                encode(np.full((64, 80, 3), 20 + 25 * v, np.uint8), quality=95)
            )
        _uploaded["local:many"] = str(_build(src, shard_size=2))
    return Path(_uploaded["local:many"])


def uploaded(server, local: Path, prefix: str) -> str:
    url = server.url(prefix)
    if _uploaded.get(prefix) != url:
        upload_shards(local, url)
        _uploaded[prefix] = url
    return url


def copy_of(server, local: Path, prefix: str) -> str:
    """A fresh upload of ``local`` under ``prefix`` (for tests that damage it)."""
    url = server.url(prefix)
    upload_shards(local, url)
    return url


def batches(source, epochs=2, batch_size=4, **kw) -> list[dict]:
    with ViewLoader(source, SMALL_MOS, batch_size=batch_size, seed=0, **kw) as loader:
        return [b for _ in range(epochs) for b in loader]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# ------------------------------------------------------------------------- upload, verify


def test_upload_verify_inspect(s3_server):
    local = photo_shards()
    url = s3_server.url("photos")
    order: list[tuple[str, bool]] = []
    result = upload_shards(local, url, on_file=lambda name, up: order.append((name, up)))
    _uploaded["photos"] = url
    manifest = load_manifest(local)
    names = {s["name"] for s in manifest["shards"]} | {s["index"] for s in manifest["shards"]}
    assert names <= set(result["uploaded"])
    assert order[-1] == ("manifest.json", True)  # the manifest last
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="photos/shard-000000.tar")
    assert head["Metadata"]["sha256"] == manifest["shards"][0]["sha256"]
    # again: everything is there already
    again = upload_shards(local, url)
    assert again["uploaded"] == [] and "manifest.json" in again["skipped"]

    assert verify_shards(url) == []
    assert load_manifest(url) == manifest
    text = inspect_shards(url)
    assert text.splitlines()[0] == url and "12 samples" in text
    stats = check_shards(url)
    assert stats["shards"] == 3


def test_url_with_credentials_is_refused(tmp_path):
    with pytest.raises(RemoteShardError, match="credentials in the URL are refused") as e:
        ShardCache("s3://AKIAXXX:secret@bucket/prefix", root=tmp_path)
    assert "secret" not in str(e.value)
    assert remote.redact_url("https://u:p@host/x?X-Amz-Signature=abc") == "https://***@host/x?***"
    with pytest.raises(RemoteShardError, match="read-only"):
        upload_shards(tmp_path, "https://example.org/shards")


def test_local_folders_do_not_import_storage_libraries():
    code = f"""
        import sys
        from pipeline.source import ShardIndex, check_shards
        from shards.verify import verify_shards
        index = ShardIndex({str(constant_shards())!r})
        index.read_jpeg(0)
        check_shards({str(constant_shards())!r})
        assert not verify_shards({str(constant_shards())!r})
        bad = [m for m in ("s3fs", "botocore", "aiobotocore", "gcsfs") if m in sys.modules]
        assert not bad, bad
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, check=True)


def test_large_file_uploads_in_parts(s3_server, tmp_path):
    (tmp_path / "big.bin").write_bytes(np.random.default_rng(0).bytes(11 << 20))
    up = ShardUploader(tmp_path, s3_server.url("multipart"), block_size=5 << 20)
    assert up.upload_file("big.bin")
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="multipart/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 1 MiB
    assert head["ContentLength"] == 11 << 20
    assert not ShardUploader(tmp_path, s3_server.url("multipart")).upload_file("big.bin")


# ------------------------------------------------------------------------------- loading


def test_loader_from_url_gives_the_batches_of_local_disk(s3_server):
    local = photo_shards()
    url = uploaded(s3_server, local, "photos")
    expected = batches(local)
    got = batches(url)
    assert_same(expected, got)
    # the view source in worker processes (each has its own prefetcher, one shared cache)
    assert_same(expected, batches(url, workers=2))
    # resume mid-epoch from the URL: the same batches as the uninterrupted run
    with ViewLoader(url, SMALL_MOS, batch_size=4, seed=0) as loader:
        loader.load_state_dict({"epoch": 1, "batch": 1})
        assert_same(expected[len(loader) + 1 :], list(loader))
    # ranks: rank 1 of 2 from the URL reads what rank 1 reads locally
    assert_same(
        batches(local, batch_size=2, rank=1, world_size=2),
        batches(url, batch_size=2, rank=1, world_size=2),
    )


def test_second_open_downloads_nothing(s3_server, tmp_path):
    url = uploaded(s3_server, photo_shards(), "photos")
    cache = ShardCache(url, root=tmp_path / "c")
    index = ShardIndex(cache)
    for sid in range(len(index.tars)):
        index.read_jpeg(int(np.flatnonzero(index.shard == sid)[0]))
    index.close()
    first = len(cache.downloads())
    assert first == 3 + 3 + 2  # tars, indexes, proposals.parquet and rejects.jsonl
    index = ShardIndex(ShardCache(url, root=tmp_path / "c"))
    for row in range(len(index)):
        index.read_jpeg(row)
    index.close()
    assert len(cache.downloads()) == first


def test_damaged_remote_shard_is_an_error_naming_it(s3_server):
    local = constant_shards()
    url = copy_of(s3_server, local, "damaged")
    tar = local / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, one byte off
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key="damaged/shard-000001.tar", Body=bytes(data)
    )
    with pytest.raises(ShardError, match=r"s3://ssl-shards/damaged/shard-000001\.tar: .*sha256"):
        batches(url, batch_size=2)
    problems = verify_shards(url)
    assert problems[0].startswith(f"{url}/shard-000001.tar: ") and "sha256" in problems[0]
    assert all("has no sample in any shard" in p for p in problems[1:]), problems  # its rows


def test_missing_remote_shard_is_an_error_naming_it(s3_server):
    url = copy_of(s3_server, constant_shards(), "missing")
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="missing/shard-000002.tar")
    where = r"s3://ssl-shards/missing/shard-000002\.tar"
    with pytest.raises(ShardError, match=rf"{where}: shard missing"):
        check_shards(url)
    with pytest.raises(ShardError, match=rf"{where}: missing"):
        batches(url, batch_size=2)
    assert any(p.startswith(f"{url}/shard-000002.tar: missing") for p in verify_shards(url))
    with pytest.raises(ShardError, match=r"s3://ssl-shards/nothing-here/manifest\.json not found"):
        ShardIndex(s3_server.url("nothing-here"))


def test_small_cache_evicts_and_gives_the_same_batches(s3_server, monkeypatch):
    import pipeline.source

    local = many_shards()
    url = uploaded(s3_server, local, "many")
    manifest = load_manifest(local)
    largest = max(s["bytes"] for s in manifest["shards"])
    monkeypatch.setenv(remote.CACHE_BYTES_ENV, str(2 * largest))  # 2 of the 5 tars
    monkeypatch.setattr(pipeline.source, "PIN_BATCHES", 0)  # pin only the batch read now
    monkeypatch.setitem(remote._DEFAULTS, "prefetch", 0)
    expected = batches(local, batch_size=2)
    got = batches(url, batch_size=2)
    assert_same(expected, got)
    cache = remote.cache_for(url)
    tars = [d for d in cache.downloads() if d["name"].endswith(".tar")]
    assert len(tars) > len(manifest["shards"])  # evicted, fetched again
    assert len(list(cache.root.glob("shard-*.tar"))) <= 2


def test_prefetch_downloads_ahead_of_the_reader(s3_server, tmp_path):
    url = uploaded(s3_server, many_shards(), "many")
    index = ShardIndex(ShardCache(url, root=tmp_path / "c"))
    index.advise(upcoming=[3, 4, 0], current=[1])
    fetcher = index._fetcher()
    deadline = time.time() + 30
    while time.time() < deadline and not all(
        (index.root / index.names[i]).exists() for i in (1, 3, 4, 0)
    ):
        time.sleep(0.05)
    assert all((index.root / index.names[i]).exists() for i in (1, 3, 4, 0))
    assert not (index.root / index.names[2]).exists()  # not in the plan
    assert index.tar_path(3) == index.root / index.names[3] and fetcher.waits == 0
    index.close()


def test_processes_sharing_a_cache_download_each_file_once(s3_server, tmp_path):
    url = uploaded(s3_server, many_shards(), "many")
    root = tmp_path / "shared"
    code = f"""
        import sys, time
        from pipeline.source import ShardIndex
        from shards.remote import ShardCache
        start = float(sys.argv[1])
        time.sleep(max(0.0, start - time.time()))
        index = ShardIndex(ShardCache({url!r}, root={str(root)!r}))
        for row in range(len(index)):
            index.read_jpeg(row)
        index.close()
    """
    before = {n: s3_server.gets(f"many/shard-00000{n}.tar") for n in range(5)}
    start = str(time.time() + 8)  # both past their imports, then at once
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), start], cwd=REPO)
        for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    downloads = ShardCache(url, root=root).downloads()
    names = [d["name"] for d in downloads]
    assert sorted(names) == sorted(set(names))  # every file once
    assert {n for n in names if n.endswith(".tar")} == {f"shard-00000{n}.tar" for n in range(5)}
    assert {n: s3_server.gets(f"many/shard-00000{n}.tar") - before[n] for n in range(5)} == {
        n: 1 for n in range(5)
    }


# ------------------------------------------------------------------------------- uploads


def test_killed_upload_resumes_and_skips_what_is_there(s3_server, tmp_path):
    local = many_shards()
    url = s3_server.url("resumed")
    done: list[str] = []

    def killed_after_four(name: str, uploaded: bool) -> None:
        done.append(name)
        if len(done) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload_shards(local, url, on_file=killed_after_four)
    with pytest.raises(ShardError, match="manifest.json not found"):
        ShardIndex(url)  # a reader never sees the manifest of an unfinished upload
    # one of the uploaded files replaced by other bytes: uploaded again
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"resumed/{done[3]}", Body=b"x")
    order: list[tuple[str, bool]] = []
    result = upload_shards(local, url, on_file=lambda n, up: order.append((n, up)))
    assert result["skipped"] == done[:3]
    assert done[3] in result["uploaded"] and order[-1] == ("manifest.json", True)
    assert verify_shards(url) == []


def test_a_changed_folder_replaces_the_remote_manifest_last(s3_server, tmp_path):
    url = s3_server.url("replaced")
    upload_shards(constant_shards(), url)
    seen: list[bool] = []

    def manifest_there(name: str, uploaded: bool) -> None:
        keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="replaced/")
        seen.append(any(o["Key"].endswith("manifest.json") for o in keys.get("Contents", [])))

    upload_shards(many_shards(), url, on_file=manifest_there)
    assert not any(seen[:-1]) and seen[-1]  # the old manifest went first, the new one last
    assert verify_shards(url) == []


def test_watcher_uploads_shards_while_a_build_writes_them(s3_server, tmp_path):
    local = many_shards()
    staging = tmp_path / "staging"
    staging.mkdir()
    url = s3_server.url("watched")
    uploader = ShardUploader(staging, url).start(poll=0.05)
    manifest = load_manifest(local)
    for s in manifest["shards"]:  # as a build does: index first, then the tar
        shutil.copy(local / s["index"], staging / s["index"])
        shutil.copy(local / s["name"], staging / s["name"])
    deadline = time.time() + 30
    while time.time() < deadline and len(uploader.uploaded) < 2 * len(manifest["shards"]):
        time.sleep(0.05)
    assert len(uploader.uploaded) == 2 * len(manifest["shards"])
    keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="watched/")
    assert not any(o["Key"].endswith("manifest.json") for o in keys["Contents"])
    for name in ("proposals.parquet", "rejects.jsonl", "ignored.jsonl", "manifest.json"):
        shutil.copy(local / name, staging / name)
    result = uploader.finish()
    assert result["uploaded"][-1] == "manifest.json"
    assert not any(n.startswith("shard-") for n in result["uploaded"][-4:])  # not twice
    assert verify_shards(url) == []
    assert json.loads((staging / "manifest.json").read_text()) == manifest


def test_a_build_uploads_each_shard_as_it_is_done(s3_server, tmp_path):
    from shards.build import build_shards
    from shards.process import BuildParams
    from shards.proposals import SearchParams

    src = tmp_path / "images"
    src.mkdir()
    for v in range(5):
        (src / f"g{v}.jpg").write_bytes(
            encode(np.full((64, 80, 3), 30 + 40 * v, np.uint8), quality=95)
        )
    url = s3_server.url("during")
    upload_shards(constant_shards(), url)  # an earlier, other build at the same URL

    def remote_names() -> set[str]:
        keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="during/")
        return {o["Key"].rsplit("/", 1)[1] for o in keys.get("Contents", [])}

    seen: list[tuple[str, bool, set[str]]] = []  # after each shard's hook: what the URL had
    uploader = ShardUploader(tmp_path / "staging", url)

    def on_shard(tar: Path, entry: dict) -> None:
        assert (tar.with_suffix(".idx")).is_file() and entry["name"] == tar.name
        uploader.shard_finished(tar, entry["sha256"])
        sha = remote._remote_sha256(uploader.fs, f"{uploader.base}/{tar.name}")
        seen.append((tar.name, sha == entry["sha256"], remote_names()))

    params = BuildParams(search=SearchParams(max_side=160), shard_size=2)
    build_shards(
        str(src), tmp_path / "staging", params, workers=1, progress=False,
        log=lambda *_: None, on_shard=on_shard,
    )  # fmt: skip
    assert [name for name, _, _ in seen] == [f"shard-00000{i}.tar" for i in range(3)]
    for name, this_build, there in seen:  # each was up before the next was built
        assert this_build and name.replace(".tar", ".idx") in there
        assert "manifest.json" not in there  # the old one went first, the new one comes last
    result = uploader.finish()
    assert result["uploaded"][-1] == "manifest.json"
    assert len(set(result["uploaded"])) == len(result["uploaded"]), result  # none twice
    assert verify_shards(url) == []


def test_a_failed_queued_upload_is_raised_by_the_next_call(s3_server):
    local = many_shards()
    uploader = ShardUploader(local, s3_server.url("failing"))
    uploader.queue_shard(local / "shard-000099.tar")  # not there: its upload fails
    with pytest.raises(RemoteShardError, match=r"shard-000099\.idx: not found"):
        uploader.close()  # waits for the queue
    uploader.queue_shard(local / "shard-000098.tar")
    deadline = time.time() + 30
    with pytest.raises(RemoteShardError, match="shard-000098"):  # the build's next shard stops
        while time.time() < deadline:
            uploader.queue_shard(local / "shard-000000.tar")
            time.sleep(0.02)
    uploader.close()  # the error was raised once, and only once
    uploader.queue_shard(local / "shard-000000.tar")
    uploader.close()
    assert "shard-000000.tar" in uploader.uploaded  # the uploader goes on after an error


# ------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_pretraining_from_url_gives_the_losses_of_local_disk(s3_server, tmp_path, monkeypatch):
    import pipeline.loader
    from tests.test_train_loop import quiet
    from tests.test_train_shards import real
    from train.data import build_loader
    from train.distributed import init_distributed
    from train.loop import pretrain

    local = photo_shards()
    url = uploaded(s3_server, local, "photos")
    whole = pretrain(real("mos", tmp_path / "local", local), log=quiet)
    opened = []
    local_loader = pipeline.loader.ViewLoader

    def on_url(shards_dir, **kw):  # the trainer's loader, opened on the URL of the same shards
        opened.append(local_loader(url, **kw))
        return opened[-1]

    monkeypatch.setattr(pipeline.loader, "ViewLoader", on_url)
    cfg = real("mos", tmp_path / "url", local)
    loader = build_loader(cfg, init_distributed("cpu"))
    assert loader.index.url == url
    remote_run = pretrain(cfg, loader=loader, log=quiet)
    loader.close()
    a = [m["loss"] for m in whole["metrics"]]
    b = [m["loss"] for m in remote_run["metrics"]]
    assert len(a) == len(b) > 0 and a == b


@pytest.mark.slow
def test_killed_run_on_a_url_resumes_to_the_losses_of_local_disk(s3_server, tmp_path):
    from tests.test_train_loop import quiet
    from tests.test_train_shards import Crash, KilledAfter, real
    from train.data import build_loader
    from train.distributed import init_distributed
    from train.loop import pretrain

    local = photo_shards()
    url = uploaded(s3_server, local, "photos")
    whole = pretrain(real("mos", tmp_path / "whole", local, ckpt_every=2), log=quiet)
    cut = real("mos", tmp_path / "cut", local, ckpt_every=2)
    cut = replace(cut, data=replace(cut.data, shards=url))  # the same shards, at their URL
    inner = build_loader(cut, init_distributed("cpu"))
    assert inner.index.url == url
    with pytest.raises(Crash):
        pretrain(cut, loader=KilledAfter(inner, 3), log=quiet)  # killed after step 3
    inner.close()
    resumed = pretrain(cut, log=quiet)  # from the step-2 checkpoint, reading the URL
    assert resumed["metrics"][0]["step"] == 3
    a = [json.loads(x)["loss"] for x in open(tmp_path / "whole" / "metrics.jsonl")]
    b = [json.loads(x)["loss"] for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert len(a) == len(b) == len(whole["metrics"]) > 3
    assert a == b  # bit for bit: the order, the views and the resume of local disk


def test_read_only_http_folder(tmp_path):
    """A shard folder served over plain HTTP (a static web server, no listing, no upload)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    local = constant_shards()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=local))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert check_shards(url)["shards"] == len(load_manifest(local)["shards"])
        assert verify_shards(url) == []
        assert_same(batches(local, batch_size=2), batches(url, batch_size=2))
        with pytest.raises(RemoteShardError, match="read-only"):
            upload_shards(local, url)
    finally:
        server.shutdown()


def test_damaged_remote_index_is_an_error_naming_it(s3_server):
    local = constant_shards()
    manifest = load_manifest(local)
    assert all(s["index_sha256"] for s in manifest["shards"])  # the manifest has each index's
    url = copy_of(s3_server, local, "damaged-index")
    idx = bytearray((local / "shard-000001.idx").read_bytes())
    idx[-2] = ord("9") if idx[-2] != ord("9") else ord("8")  # one digit of an offset off
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key="damaged-index/shard-000001.idx", Body=bytes(idx)
    )
    with pytest.raises(ShardError, match=r"damaged-index/shard-000001\.idx: .*sha256"):
        ShardIndex(url)


# ------------------------------------------------------------------ the store, not the cache


def _rewrite_keeping_metadata(server, key: str, data: bytes) -> None:
    """Replace an object's bytes, its recorded sha256 metadata copied over unchanged."""
    client = server.client()
    meta = client.head_object(Bucket=server.bucket, Key=key)["Metadata"]
    client.put_object(Bucket=server.bucket, Key=key, Body=data, Metadata=meta)


def test_verify_with_a_warm_cache_checks_the_store(s3_server):
    local = constant_shards()
    url = copy_of(s3_server, local, "warm")
    assert verify_shards(url) == []  # every tar now in the cache
    data = bytearray((local / "shard-000001.tar").read_bytes())
    data[700] ^= 0xFF  # same size, one byte off, the old digest kept in its metadata
    _rewrite_keeping_metadata(s3_server, "warm/shard-000001.tar", bytes(data))
    problems = verify_shards(url)
    assert problems and problems[0].startswith(f"{url}/shard-000001.tar: ")
    assert "the object in the store is wrong, not the cache" in problems[0]


def test_a_rerun_upload_repairs_changed_bytes_under_intact_metadata(s3_server):
    local = constant_shards()
    url = copy_of(s3_server, local, "repaired")
    data = bytearray((local / "shard-000000.tar").read_bytes())
    data[700] ^= 0xFF
    _rewrite_keeping_metadata(s3_server, "repaired/shard-000000.tar", bytes(data))
    result = upload_shards(local, url)
    assert "shard-000000.tar" in result["uploaded"]
    assert "shard-000001.tar" in result["skipped"]
    assert verify_shards(url) == []


def test_a_rebuild_with_fewer_shards_leaves_none_of_the_old_ones(s3_server):
    url = s3_server.url("rebuilt")
    upload_shards(many_shards(), url)  # five shards
    result = upload_shards(constant_shards(), url)
    listed = {s["name"] for s in load_manifest(constant_shards())["shards"]}
    keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="rebuilt/")
    tars = {o["Key"].split("/")[-1] for o in keys["Contents"] if o["Key"].endswith(".tar")}
    assert tars == listed and result["removed"]
    assert verify_shards(url) == []


def test_a_corrupted_cache_copy_is_dropped_and_fetched_again_not_blamed_on_the_store(s3_server):
    url = copy_of(s3_server, constant_shards(), "cachecopy")
    assert verify_shards(url) == []  # the tars are in the cache
    store = remote.cache_for(url)
    copy = store.path("shard-000001.tar")
    data = bytearray(copy.read_bytes())
    data[700] ^= 0xFF
    copy.write_bytes(bytes(data))
    stats = check_shards(url, sha256=True)
    assert stats["dropped_cache_copies"] == ["shard-000001.tar"] and not copy.exists()
    assert verify_shards(url) == []  # downloaded again from the (sound) store
    assert copy.is_file()


def test_a_full_cache_disk_is_named_as_the_cache_not_the_store(s3_server, monkeypatch):
    import errno as errno_mod

    url = copy_of(s3_server, constant_shards(), "fullcache")
    store = remote.ShardCache(url)
    store.open()

    def full(rpath, lpath, **kw):  # the local write of a download, disk full
        raise OSError(errno_mod.ENOSPC, "No space left on device")

    monkeypatch.setattr(store._fs()[0], "get_file", full)  # the process's one filesystem
    with pytest.raises(
        RemoteShardError, match=r"the shard cache .* is full .*the store is not at fault"
    ):
        store.fetch("shard-000000.tar")


def test_a_cache_limit_below_what_readers_pin_is_said_once(s3_server, monkeypatch):
    url = uploaded(s3_server, many_shards(), "many")
    store = remote.ShardCache(url, max_bytes=100)  # smaller than one tar
    store.open()
    with pytest.warns(RuntimeWarning, match=r"over its limit of 0\.0 MiB \(--cache-size\)") as seen:
        store.fetch("shard-000000.tar", pin=True)
        store.fetch("shard-000001.tar", pin=True)
    assert len([w for w in seen if "--cache-size" in str(w.message)]) == 1
