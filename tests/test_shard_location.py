"""A shard folder's location is decided once (shards.location) and passed down unchanged."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipeline.source import ShardIndex, check_shards
from shards import remote
from shards.location import ShardLocation, locate
from shards.remote import RemoteShardError, ShardCache
from shards.verify import load_manifest, verify_shards
from tests.s3_server import s3_server_fixture  # noqa: F401 - the module's server
from tests.test_pipeline_shards import photo_shards
from tests.test_remote_shards import uploaded
from train.config import ConfigError
from train.data import shard_location


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    """The default cache root of this test (a CLI test in the same process may have set
    another through ``configure``)."""
    monkeypatch.setitem(remote._DEFAULTS, "cache_dir", None)
    monkeypatch.setenv(remote.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(remote.CACHE_BYTES_ENV, raising=False)


def test_a_local_folder_is_a_path(tmp_path):
    for given in (str(tmp_path), tmp_path):
        location = locate(given)
        assert (location.path, location.url, location.is_remote) == (tmp_path, None, False)
        assert str(location) == str(tmp_path) and location.name == tmp_path.name
    assert not locate(tmp_path).missing_folder()
    assert locate(tmp_path / "absent").missing_folder()
    (tmp_path / "file").write_text("x")
    assert locate(tmp_path / "file").missing_folder()  # a file is not a shard folder
    with pytest.raises(ValueError, match="read in place"):
        locate(tmp_path).cache  # noqa: B018 - the property raises


def test_a_url_is_checked_once_and_keeps_one_cache(tmp_path):
    location = locate("s3://bucket/data/scenes_val/")
    assert (location.url, location.path, location.name) == (
        "s3://bucket/data/scenes_val",
        None,
        "scenes_val",
    )
    assert not location.missing_folder()  # a URL is checked when its manifest is read
    assert location.cache is location.cache  # made once, shared by every reader
    assert location.cache.root.is_relative_to(tmp_path / "cache")
    assert locate(location) is location
    with pytest.raises(RemoteShardError, match="credentials in the URL are refused"):
        locate("s3://key:secret@bucket/data")
    assert "secret" not in locate("https://host/data?token=secret").display
    with pytest.raises(TypeError, match="not int"):
        locate(3)


def test_a_cache_is_the_location_of_its_url(tmp_path):
    cache = ShardCache("s3://bucket/data", root=tmp_path / "c")
    location = locate(cache)
    assert location.url == "s3://bucket/data" and location.cache is cache


def test_same_folder_and_equality(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert locate("a").same_folder(locate(tmp_path / "a"))
    assert not locate("a").same_folder(locate("s3://bucket/a"))
    assert locate("s3://bucket/a/").same_folder(locate("s3://bucket/a"))
    assert locate("s3://bucket/a") == locate("s3://bucket/a/")
    assert len({locate("s3://bucket/a"), locate("s3://bucket/a/"), locate("a")}) == 2
    with pytest.raises(ValueError, match="exactly one"):
        ShardLocation(path="a", url="s3://bucket/a")


def test_a_location_survives_pickling(tmp_path):
    """Worker processes of the view source receive it pickled."""
    for location in (locate(tmp_path), locate("gs://bucket/x")):
        again = pickle.loads(pickle.dumps(location))
        assert again == location and again.display == location.display


def test_local_manifest_through_the_location():
    local = photo_shards()
    location = locate(local)
    assert location.read_manifest() == load_manifest(local) == load_manifest(location)


def test_one_location_serves_every_reader_of_a_url(s3_server):
    local = photo_shards()
    location = locate(uploaded(s3_server, local, "location-photos"))
    assert location.read_manifest()["shards"] == load_manifest(local)["shards"]
    assert check_shards(location, sha256=False)["shards"] == len(load_manifest(local)["shards"])
    assert verify_shards(location) == []
    index, local_index = ShardIndex(location), ShardIndex(local)
    try:
        assert index.location is location and index.url == location.url
        assert bytes(index.read_jpeg(0)) == bytes(local_index.read_jpeg(0))
    finally:
        index.close()
        local_index.close()
    downloaded = {d["name"] for d in location.cache.downloads()}  # into the location's cache
    assert downloaded >= {s["name"] for s in load_manifest(local)["shards"]}


def test_the_config_names_the_key_of_a_bad_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.shards: .*absent is not a directory"):
        shard_location(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^eval.val: no shard directory given$"):
        shard_location("", "eval.val")
    with pytest.raises(ConfigError, match=r"^eval.train: .*credentials in the URL are refused"):
        shard_location("s3://k:s@bucket/x", "eval.train")
    assert shard_location(str(tmp_path)).path == Path(tmp_path)
