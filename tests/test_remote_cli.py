"""The command line on shard folders in object storage (moto's S3 server on 127.0.0.1):
``shards build SRC s3://...`` uploads, ``shards verify|inspect``, ``pretrain --data`` and
``eval knn --train/--val`` read the URL through the local shard cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from shards import remote
from tests.conftest import encode
from tests.s3_server import s3_server_fixture  # noqa: F401 - the module's server

pytest.importorskip("s3fs")
pytest.importorskip("nvidia.dali")


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(remote.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(remote.CACHE_BYTES_ENV, raising=False)


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def classes(root):
    """Two classes of four flat images each (dark and light), in ImageNet's folder layout."""
    for label, base in (("dark", 30), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(4):
            img = np.full((64, 80, 3), base + 6 * i, np.uint8)
            (root / label / f"{label}{i}.jpg").write_bytes(encode(img, quality=95))
    return root


@pytest.mark.slow
def test_build_to_s3_then_verify_pretrain_and_eval_from_it(s3_server, tmp_path):
    url = s3_server.url("cli/labelled")
    src = classes(tmp_path / "images")
    staging = tmp_path / "staging"
    out = run(
        "shards", "build", str(src), url, "--layout", "imagenet", "--shard-size", "4",
        "--workers", "1", "--no-progress", "--staging", str(staging),
    )  # fmt: skip
    assert f"uploading to {url}" in out and "manifest.json last" in out
    keys = {k for _, k, _ in s3_server.requests if "cli/labelled" in k}
    assert any(k.endswith("manifest.json") for k in keys)
    local = json.loads((staging / "manifest.json").read_text())
    assert len(local["shards"]) == 2
    # a second build finds the staging folder finished and every file uploaded already
    again = run(
        "shards", "build", str(src), url, "--layout", "imagenet", "--shard-size", "4",
        "--workers", "1", "--no-progress", "--staging", str(staging),
    )  # fmt: skip
    assert "0 file(s) uploaded" in again

    assert f"{url}: OK" in run("shards", "verify", url)
    assert "8 samples" in run("shards", "inspect", url).replace(":", "")

    run_dir = tmp_path / "run"
    run(
        "pretrain", "--method", "byol", "--data", url, "--out", str(run_dir), "--steps", "2",
        "--loader-workers", "0", "--device", "cpu", "data.batch_size=4", "data.size=32",
        "model.backbone=resnet18", "model.projector=[64,32]", "model.predictor=[64,32]",
        "run.log_every=1",
    )  # fmt: skip
    losses = [json.loads(x)["loss"] for x in open(run_dir / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 2 and all(np.isfinite(losses))

    out = run("eval", "knn", str(run_dir), "--train", url, "--val", url, "--device", "cpu")
    assert "top-1" in out
    report = json.loads(next((run_dir / "eval").glob("knn-*.json")).read_text())
    assert report["top1"] == 100.0  # the queries are the bank: each finds itself


def test_storage_options_and_refused_targets(s3_server, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["shards", "verify", "s3://key:secret@bucket/x"])
    assert bad.exit_code != 0 and "secret" not in bad.output and "refused" in bad.output
    ro = runner.invoke(main, ["shards", "build", "@sample", "https://example.org/shards"])
    assert ro.exit_code != 0 and "read-only" in ro.output
    size = runner.invoke(main, ["shards", "verify", "--cache-size", "lots", str(tmp_path)])
    assert size.exit_code == 2 and "is not a size" in size.output
    missing = runner.invoke(main, ["shards", "verify", s3_server.url("nothing/here")])
    assert missing.exit_code != 0 and "nothing/here" in missing.output


def test_parse_size():
    from cli.common import parse_size

    assert parse_size("200G") == 200 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("1000") == 1000


def test_bench_pipeline_on_a_url_times_it_next_to_local_disk(s3_server, tmp_path):
    from shards.remote import upload_shards
    from tests.test_pipeline_shards import photo_shards

    url = s3_server.url("cli/bench")
    upload_shards(photo_shards(), url)
    report_path = tmp_path / "bench.json"
    out = run(
        "bench", "pipeline", "--data", url, "--method", "mos", "--device", "cpu",
        "--batch-size", "4", "--seconds", "0.3", "--rounds", "2", "--no-baseline",
        "--cache-dir", str(tmp_path / "cache-cli"), "--json", str(report_path),
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert set(report["images_per_s"]) == {"ours", "ours, local disk", "decode+crop"}
    assert all(v > 0 for v in report["images_per_s"].values())
    r = report["remote"]
    assert r["url"] == url and r["warm_vs_local_disk"] > 0
    assert len(r["cold_rounds"]) == 2 and r["cold_images_per_s"] > 0
    # every cold round started from an empty cache: it fetched shards over the network
    assert all(x["bytes"] > 0 for x in r["cold_rounds"])
    assert r["bandwidth"]["mb_per_s"] > 0 and r["network_bound_images_per_s"] > 0
    assert "| ours, cold cache |" in out and "warm cache / local disk" in out
    # the scratch caches are gone, the shards' own cache was not used
    assert not any((tmp_path / "cache-cli").glob("bench-*"))


def test_cache_size_from_the_environment_takes_units(monkeypatch):
    monkeypatch.setenv(remote.CACHE_BYTES_ENV, "1.5G")
    assert remote._default_max_bytes() == int(1.5 * (1 << 30))
    monkeypatch.setenv(remote.CACHE_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=r"SSL_CLI_SHARD_CACHE_BYTES='lots': 'lots' is not a size"):
        remote._default_max_bytes()


def test_a_build_to_a_bucket_it_cannot_write_stops_before_searching(s3_server, tmp_path):
    src = classes(tmp_path / "images")
    staging = tmp_path / "staging"
    result = CliRunner().invoke(
        main,
        [
            "shards",
            "build",
            str(src),
            "s3://no-such-bucket/shards",
            "--staging",
            str(staging),
            "--no-progress",
        ],  # fmt: skip
    )
    assert result.exit_code == 1
    assert "s3://no-such-bucket/shards: cannot write there" in result.output
    assert "Nothing was built." in result.output
    assert not list(staging.glob("shard-*.tar"))  # no search ran


def test_the_default_staging_copy_is_removed_after_a_whole_upload(s3_server, tmp_path):
    src = classes(tmp_path / "images")
    url = s3_server.url("cli/nostaging")
    out = run("shards", "build", str(src), url, "--shard-size", "4", "--workers", "1",
              "--no-progress")  # fmt: skip
    staging = remote.default_cache_root() / "staging"
    assert "removed the staging copy" in out and not any(staging.glob("*/shard-*.tar"))
    assert f"{url}: OK" in run("shards", "verify", url)
