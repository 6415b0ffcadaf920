"""Shard folders at gs:// URLs, against a local Google Cloud Storage server
(gcp-storage-emulator): upload with the sha256 in each object's metadata, resume skipping what
is there, verify, the loader through the shard cache (the batches of local disk), a damaged
remote shard."""

from __future__ import annotations

import warnings

import pytest

from pipeline.loader import ViewLoader
from pipeline.source import ShardError
from shards import remote
from shards.remote import upload_shards
from shards.verify import load_manifest, verify_shards
from tests.gcs_server import gcs_server_fixture  # noqa: F401 - the module's server
from tests.test_pipeline_loader import SMALL_MOS
from tests.test_pipeline_shards import constant_shards, photo_shards
from tests.test_remote_shards import assert_same

pytest.importorskip("nvidia.dali")
warnings.filterwarnings("ignore", message=".*external source.*not used.*")


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(remote.CACHE_BYTES_ENV, raising=False)


def batches(source, batch_size=4) -> list[dict]:
    with ViewLoader(source, SMALL_MOS, batch_size=batch_size, seed=0) as loader:
        return [b for _ in range(2) for b in loader]


def test_upload_resume_verify_and_read_from_gs(gcs_server):
    local = photo_shards()
    url = gcs_server.url("photos")
    order: list[str] = []
    result = upload_shards(local, url, on_file=lambda name, up: order.append(name))
    manifest = load_manifest(local)
    assert order[-1] == "manifest.json" and len(result["uploaded"]) == len(order)
    fs, base = remote.filesystem(url)
    first = manifest["shards"][0]
    assert remote._remote_sha256(fs, f"{base}/{first['name']}") == first["sha256"]
    again = upload_shards(local, url)  # a resumed upload: every file is there with its sha256
    assert again["uploaded"] == [] and set(again["skipped"]) == set(order)
    assert verify_shards(url) == []
    assert load_manifest(url) == manifest
    assert_same(batches(local), batches(url))


def test_damaged_gs_shard_is_an_error_naming_it(gcs_server):
    local = constant_shards()
    url = gcs_server.url("damaged")
    upload_shards(local, url)
    data = bytearray((local / "shard-000001.tar").read_bytes())
    data[700] ^= 0xFF  # same size, one byte off
    fs, base = remote.filesystem(url)
    fs.pipe_file(f"{base}/shard-000001.tar", bytes(data))
    with pytest.raises(ShardError, match=r"gs://ssl-shards/damaged/shard-000001\.tar: .*sha256"):
        batches(url, batch_size=2)
    problems = verify_shards(url)
    assert problems[0].startswith(f"{url}/shard-000001.tar: ") and "sha256" in problems[0]
