"""Hostile inputs for ``ssl-cli shards build`` / ``verify`` (issue 10), and the IDX source.

Every test writes its own inputs in ``tmp_path``; the numbers are the issue's items.
"""

import gzip
import io
import json
import os
import pickle
import signal
import struct
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import shards.build as build_mod
from cli.main import main as cli
from shards.build import BuildError, build_shards
from shards.process import BuildParams, Reject, process_item
from shards.proposals import SearchParams
from shards.sources import SourceError, open_source
from shards.verify import verify_shards
from shards.writer import ShardWriter, sha256_file
from tests.conftest import encode, photo

FAST = BuildParams(search=SearchParams(max_side=64), shard_size=4)


def _build(src, out, params=FAST, **kw):
    kw.setdefault("workers", 1)
    return build_shards(str(src), out, params, progress=False, log=lambda s: None, **kw)


def _rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def _rows(out: Path) -> dict:
    return pq.read_table(out / "proposals.parquet").to_pydict()


def _img(name="astronaut", size=(96, 72)) -> bytes:
    return encode(photo(name, size))


def _folder(tmp_path, files: dict[str, bytes], name="src") -> Path:
    root = tmp_path / name
    root.mkdir()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks forever)."""

    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ 1, 2, 3: the output folder


def test_1_out_equal_to_inside_or_holding_src_is_refused(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    _tar(w / "a.tar", [("x.jpg", _img())])
    before = (w / "a.tar").read_bytes()
    for src, out, what in [
        (w, w, "is SRC"),
        (w, w / "shards", "inside SRC"),
        (w / "a.tar", w, "inside OUT"),
    ]:
        with pytest.raises(BuildError, match=what):
            _build(src, out)
    assert (w / "a.tar").read_bytes() == before and sorted(os.listdir(w)) == ["a.tar"]


def test_2_foreign_out_refused_and_only_our_files_deleted(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img()})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.tmp").write_text("mine")
    (foreign / "shard-000000.tar").write_text("also mine")
    with pytest.raises(BuildError, match="not empty .*holds no ssl-cli build"):
        _build(src, foreign)
    assert (foreign / "notes.tmp").read_text() == "mine"
    assert (foreign / "shard-000000.tar").read_text() == "also mine"

    out = tmp_path / "out"
    _build(src, out)
    assert (out / ".ssl-cli" / "build.json").is_file()
    (out / "user.tmp").write_text("keep")  # not of our naming: never deleted
    (out / ".shard-000007.tar.tmp-4194305-1").write_text("ours, left by a kill (dead pid)")
    (out / ".notes.txt.tmp-4194305-1").write_text("of our naming, not our file: kept")
    (out / ".ssl-cli" / "parts" / "shard-000000.tar.parquet").write_text("stale")
    assert _build(src, out).up_to_date
    assert (out / "user.tmp").read_text() == "keep"
    assert not (out / ".shard-000007.tar.tmp-4194305-1").exists()
    assert (out / ".notes.txt.tmp-4194305-1").exists()
    assert not list((out / ".ssl-cli" / "parts").glob("*.parquet"))


def test_3_second_build_fails_at_once_naming_the_holder(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img()})
    out = tmp_path / "out"
    with build_mod._locked(out):  # another build holds OUT (a second open file: flock conflicts)
        with pytest.raises(BuildError, match=f"another build \\(PID {os.getpid()}\\)"):
            _build(src, out)
    assert not (out / "manifest.json").exists()
    assert _build(src, out).manifest["counts"]["samples"] == 1


# ------------------------------------------------------------------------ 4, 13: unique keys


def test_4_duplicate_key_in_a_tar_is_a_reject_naming_both(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    _tar(
        src / "a.tar",
        [
            ("x.jpg", _img()),
            ("y.jpg", _img("coffee")),
            ("x.JPG", _img("chelsea")),
            ("y.jpg", _img()),
        ],
    )
    out = tmp_path / "out"
    m = _build(src, out).manifest
    assert m["counts"] == m["counts"] | {"inputs": 4, "samples": 2, "rejects": 2}
    dups = [r for r in _rejects(out) if r["reason"] == "duplicate_key"]
    assert len(dups) == 2
    assert dups[0]["source"].endswith("a.tar:x.JPG") and "a.tar:x.jpg" in dups[0]["detail"]
    assert dups[1]["source"].endswith("a.tar:y.jpg") and "a.tar:y.jpg" in dups[1]["detail"]
    assert sorted(_rows(out)["key"]) == ["x", "y"]
    assert verify_shards(out) == []


def test_13_same_stem_other_extension_gets_unique_keys(tmp_path):
    ch = photo("chelsea", (96, 72))
    src = _folder(tmp_path, {"photo.webp": encode(ch, "WEBP"), "photo.bmp": encode(ch, "BMP")})
    out = tmp_path / "out"
    _build(src, out)
    assert sorted(_rows(out)["key"]) == ["photo_bmp", "photo_webp"]


# ----------------------------------------------------------------------- 5: crashed workers


class _CrashOnce:
    """An engine like the local one, in-process, whose worker 'dies' on one key while armed."""

    def __init__(self, key):
        self.key = key

    def map(self, fn, items, params):
        for item in items:
            if item.key == self.key:
                yield Reject(item.key, item.source, "worker_crashed", "killed from outside")
            else:
                yield fn(item, params)


def test_5_crashes_exit_non_zero_and_retry_rejects_redoes_them(tmp_path, monkeypatch):
    src = _folder(tmp_path, {"a.jpg": _img(), "b.jpg": _img("coffee"), "c.jpg": _img("rocket")})
    out = tmp_path / "out"
    monkeypatch.setattr(build_mod, "make_engine", lambda *a, **k: _CrashOnce("b"))
    first = _build(src, out)
    assert first.manifest["rejects_by_reason"] == {"worker_crashed": 1}
    assert any("--retry-rejects" in p for p in first.problems)
    again = _build(src, out)  # a rerun without the flag: still says so, does not hide it
    assert again.up_to_date and again.problems == first.problems
    monkeypatch.setattr(build_mod, "make_engine", lambda *a, **k: _CrashOnce(None))
    retried = _build(src, out, retry_rejects=True)
    assert retried.problems == [] and retried.manifest["counts"]["samples"] == 3
    assert sorted(_rows(out)["key"]) == ["a", "b", "c"]
    assert verify_shards(out) == []


def crash_first_time(item, params):
    """Kills its worker process the first time it sees key ``b`` (a marker file remembers)."""
    marker = Path(item.path).with_name("crashed-once")
    if item.key == "b" and not marker.exists():
        marker.write_text("x")
        os._exit(9)
    return process_item(item, params)


def test_5_local_engine_retries_a_crashed_image_alone(tmp_path):
    from shards.engines import LocalEngine

    src = _folder(tmp_path, {"a.jpg": _img(), "b.jpg": _img("coffee")})
    items = open_source(str(src)).items
    results = list(LocalEngine(workers=1).map(crash_first_time, items, FAST))
    assert [type(r).__name__ for r in results] == ["Sample", "Sample"]


# ----------------------------------------------------------------- 7, 8: decode as DALI does


def _app1(data: bytes, payload: bytes) -> bytes:
    return data[:2] + struct.pack(">HH", 0xFFE1, len(payload) + 2) + payload + data[2:]


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()  # starts with b"Exif\0\0"


def _xmp(orientation: int) -> bytes:
    return (
        b"http://ns.adobe.com/xap/1.0/\x00"
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22'
        b'-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % orientation
    )


def lossless_jpeg(gray: np.ndarray) -> bytes:
    """A lossless (SOF3, predictor 1) 8-bit greyscale JPEG, ITU T.81 annex H."""
    h, w = gray.shape
    seg = lambda m, p: struct.pack(">HH", m, len(p) + 2) + p  # noqa: E731
    bits = [0] * 16
    bits[4] = 17  # 17 codes of 5 bits: difference categories 0..16
    out = b"\xff\xd8" + seg(0xFFC3, struct.pack(">BHHB", 8, h, w, 1) + bytes([1, 0x11, 0]))
    out += seg(0xFFC4, bytes([0]) + bytes(bits) + bytes(range(17)))
    out += seg(0xFFDA, bytes([1, 1, 0, 1, 0, 0]))
    acc, n, data = 0, 0, bytearray()

    def put(v, k):
        nonlocal acc, n
        acc, n = (acc << k) | v, n + k
        while n >= 8:
            n -= 8
            b = (acc >> n) & 0xFF
            data.extend([b, 0] if b == 0xFF else [b])
        acc &= (1 << n) - 1

    g = gray.astype(int)
    for y in range(h):
        for x in range(w):
            pred = 128 if x == 0 and y == 0 else g[y, x - 1] if (y == 0 or x > 0) else g[y - 1, x]
            d = int(g[y, x] - pred)
            s = abs(d).bit_length()
            put(s, 5)
            if s:
                put(d if d > 0 else d + (1 << s) - 1, s)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)
    return out + bytes(data) + b"\xff\xd9"


def _dali_sizes(out: Path) -> dict[str, tuple[int, int]]:
    from shards.dali_decode import DaliDecoder

    jpegs = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    jpegs[m.name[:-4]] = tf.extractfile(m).read()
    return dict(zip(jpegs, DaliDecoder().sizes(list(jpegs.values()))))


def test_7_8_stored_jpegs_decode_with_dali_to_the_recorded_size(tmp_path):
    pytest.importorskip("nvidia.dali")
    base = encode(photo("coffee", (120, 80)))
    gray = np.asarray(Image.fromarray(photo("camera", (100, 70))).convert("L"))
    src = _folder(
        tmp_path,
        {
            "exif6.jpg": _app1(base, _exif(6)),  # one EXIF block: kept, DALI rotates it
            "xmp6.jpg": _app1(base, _xmp(6)),  # PIL rotates, DALI would not
            "exif1_then6.jpg": _app1(_app1(base, _exif(6)), _exif(1)),  # PIL first, DALI last
            "exif6_then1.jpg": _app1(_app1(base, _exif(1)), _exif(6)),
            "lossless.jpg": lossless_jpeg(gray),  # DALI cannot decode SOF3
        },
    )
    out = tmp_path / "out"
    m = _build(src, out, BuildParams(search=SearchParams(max_side=64), shard_size=8)).manifest
    assert m["counts"]["samples"] == 5 and m["counts"]["transcoded"] == 4
    rows = _rows(out)
    recorded = {k: (w, h) for k, w, h in zip(rows["key"], rows["width"], rows["height"])}
    assert _dali_sizes(out) == recorded
    assert recorded["xmp6"] == (80, 120) and recorded["exif1_then6"] == (120, 80)  # as PIL shows
    assert recorded["exif6_then1"] == (80, 120) and recorded["lossless"] == (100, 70)
    assert verify_shards(out, decode=True) == []


def _rewrite_sample(out: Path, key: str, **components) -> None:
    """Replace components of one sample in its shard, keeping the manifest's checksums right."""
    tar = next(out.glob("shard-*.tar"))
    with tarfile.open(tar) as tf:
        samples: dict[str, dict] = {}
        for mem in tf:
            k, ext = mem.name.split(".", 1)
            samples.setdefault(k, {"__key__": k})[ext] = tf.extractfile(mem).read()
    samples[key].update(components)
    with ShardWriter(tar) as w:
        for s in samples.values():
            w.write(s)
    manifest = json.loads((out / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] == tar.name:
            s["sha256"], s["bytes"] = sha256_file(tar), tar.stat().st_size
            s["index_sha256"] = sha256_file(tar.with_suffix(".idx"))
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_7_verify_decode_decodes_as_dali_does(tmp_path):
    pytest.importorskip("nvidia.dali")
    src = _folder(tmp_path, {"a.jpg": encode(photo("coffee", (120, 80)))})
    out = tmp_path / "out"
    _build(src, out)
    # what an older build stored: XMP-only orientation, size recorded as PIL shows it (120x80)
    sideways = encode(photo("coffee", (80, 120)))
    _rewrite_sample(out, "a", jpg=_app1(sideways, _xmp(6)))
    assert verify_shards(out) == []  # checksums fine: only decoding tells
    problems = verify_shards(out, decode=True)
    assert problems == ["shard-000000.tar:a: decodes to 80x120 (DALI), recorded 120x80"]
    _rewrite_sample(out, "a", jpg=lossless_jpeg(np.zeros((80, 120), np.uint8)))
    assert "does not decode: DALI" in verify_shards(out, decode=True)[0]


# --------------------------------------------------------------------------- 11: pixel limit


def test_11_one_pixel_limit_max_pixels(tmp_path, monkeypatch):
    from shards.images import ImageParams, RejectedImage, decode_image

    data = _img()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit no longer counts
    assert decode_image(data).rgb.shape == (72, 96, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # and is left as it was
    with pytest.raises(RejectedImage, match="96x72 exceeds the limit of 6911 pixels"):
        decode_image(data, ImageParams(max_pixels=6911))
    monkeypatch.undo()
    src = _folder(tmp_path, {"a.jpg": data})
    r = CliRunner().invoke(
        cli,
        ["shards", "build", str(src), str(tmp_path / "o"), "--max-pixels", "100", "--workers", "1"],
    )
    assert r.exit_code == 1 and "over --max-pixels 100" in r.output
    assert _rejects(tmp_path / "o")[0]["reason"] == "too_large"


# ------------------------------------------------------------------ 12, 22: what has changed


def test_12_changed_input_is_detected_and_named(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img(), "b.jpg": _img("coffee")})
    out = tmp_path / "out"
    _build(src, out)
    (src / "b.jpg").write_bytes(_img("rocket"))
    with pytest.raises(BuildError, match=r"1 input\(s\) changed: .*b\.jpg \(size \d+ -> \d+ bytes"):
        _build(src, out)
    (src / "b.jpg").write_bytes(_img("coffee"))  # same bytes as built, newer mtime
    os.utime(src / "b.jpg", ns=(1, 1))
    with pytest.raises(BuildError, match=r"b\.jpg \(modified\)"):
        _build(src, out)


def test_22_trailing_slash_is_the_same_source_and_differences_are_named(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img()})
    out = tmp_path / "out"
    _build(src, out)
    assert _build(f"{src}/", out).up_to_date
    assert _build(f"{src}/./", out).up_to_date
    other = BuildParams(search=SearchParams(max_side=96), shard_size=4)
    with pytest.raises(BuildError, match=r"parameters\.search\.max_side: 64 then, 96 now"):
        _build(src, out, other)


# ----------------------------------------------------------- 14, 15, 26: names and file types


def test_14_non_utf8_file_name_rejects_that_input_only(tmp_path):
    root = _folder(tmp_path, {"good.jpg": _img()})
    bad = os.path.join(os.fsencode(root), b"caf\xe9.jpg")
    with open(bad, "wb") as f:
        f.write(_img("coffee"))
    out = tmp_path / "out"
    m = _build(root, out).manifest
    assert m["counts"]["samples"] == 1
    (r,) = _rejects(out)
    assert r["reason"] == "bad_name" and r["source"].endswith("caf\\xe9.jpg")
    assert verify_shards(out) == []


def test_15_26_only_regular_files_are_read(tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(_img("rocket"))
    good = _img()
    root = _folder(tmp_path, {"good.jpg": good, "big.jpg": good + bytes(4096)})
    os.mkfifo(root / "fifo.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.symlink(outside, root / "linked.jpg")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.jpg").write_bytes(_img())
    os.symlink(tmp_path / "more", root / "dirlink")
    out = tmp_path / "out"
    params = BuildParams(search=SearchParams(max_side=64), shard_size=8)
    params = params.__class__(
        search=params.search,
        image=params.image.__class__(max_file_bytes=len(good) + 100),
        shard_size=8,
    )
    with _deadline(120):
        m = _build(root, out, params).manifest
    reasons = {Path(r["source"]).name: (r["reason"], r["detail"]) for r in _rejects(out)}
    assert reasons["fifo.jpg"] == ("not_a_regular_file", "a FIFO, not read")
    assert reasons["zero.jpg"][0] == "not_a_regular_file" and "/dev/zero" in reasons["zero.jpg"][1]
    assert (
        reasons["dangling.jpg"][0] == "unreadable"
        and "broken symlink" in reasons["dangling.jpg"][1]
    )
    assert reasons["big.jpg"][0] == "too_large" and "--max-file-bytes" in reasons["big.jpg"][1]
    assert sorted(_rows(out)["key"]) == ["good", "linked"]
    assert m["counts"]["symlinks_followed"] == 1 and m["counts"]["symlinks_outside_src"] == 1
    assert m["ignored_by_reason"] == {"directory_symlink": 1}
    ignored = [json.loads(x) for x in (out / "ignored.jsonl").read_text().splitlines()]
    assert ignored[0]["entry"].endswith("dirlink")


def test_26_tar_links_and_devices_are_counted_as_ignored(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    with tarfile.open(src / "a.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, kind in [
            ("d", tarfile.DIRTYPE),
            ("s.jpg", tarfile.SYMTYPE),
            ("h.jpg", tarfile.LNKTYPE),
            ("c", tarfile.CHRTYPE),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "x.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
        data = _img()
        info = tarfile.TarInfo("x.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    m = _build(src, out).manifest
    assert m["counts"]["samples"] == 1 and m["counts"]["ignored_files"] == 4
    assert m["ignored_by_reason"] == {
        "tar_device": 1,
        "tar_directory": 1,
        "tar_hardlink": 1,
        "tar_symlink": 1,
    }


# ------------------------------------------------------------------------------ 16: labels


def test_16_bad_labels_are_rejected_at_read_time(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    members = []
    for key, cls in [("ok", b"3"), ("huge", b"99999999999"), ("neg", b"-7"), ("text", b"x")]:
        members += [(f"{key}.jpg", _img()), (f"{key}.cls", cls)]
    _tar(src / "a.tar", members)
    out = tmp_path / "out"
    m = _build(src, out).manifest
    assert m["counts"]["samples"] == 1 and m["rejects_by_reason"] == {"bad_label": 3}
    details = {r["key"]: r["detail"] for r in _rejects(out)}
    assert "not an int32 >= 0" in details["huge"] and "not an int32 >= 0" in details["neg"]
    assert "not an integer" in details["text"]
    assert _build(src, out).up_to_date  # a rerun does not crash either


def _cifar10(root: Path, labels: list[int], with_labels: bool = True) -> None:
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)
    data = np.zeros((len(labels), 3 * 32 * 32), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": data, b"labels": labels} if with_labels else {b"data": data}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_16_cifar_labels_beyond_the_classes_and_missing_labels(tmp_path):
    _cifar10(tmp_path / "c10", [1, 10])
    out = tmp_path / "out"
    m = _build(tmp_path / "c10", out, split="test").manifest
    assert m["build"]["layout"] == "cifar" and m["counts"]["samples"] == 1
    assert "not below the number of classes (10)" in _rejects(out)[0]["detail"]
    _cifar10(tmp_path / "nolabels", [0], with_labels=False)
    with pytest.raises(SourceError, match=r"nolabels/data_batch_1: CIFAR batch has no 'labels'"):
        open_source(str(tmp_path / "nolabels"))


# ---------------------------------------------------------------------- 17: truncated tars


def test_17_truncated_tar_keeps_what_was_read(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    tar = _tar(
        src / "a.tar", [("a.jpg", _img()), ("b.jpg", _img("coffee")), ("c.jpg", _img("rocket"))]
    )
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        last = tf.getmember("c.jpg")
    tar.write_bytes(data[: last.offset_data + 100])  # cut inside the last member
    out = tmp_path / "out"
    m = _build(src, out).manifest
    assert sorted(_rows(out)["key"]) == ["a", "b"]
    (r,) = _rejects(out)
    assert r["reason"] == "corrupt" and "truncated" in r["detail"] and r["source"].endswith("c.jpg")
    assert m["counts"]["inputs"] == 3
    tar.write_bytes(data[: last.offset + 200])  # cut inside a header: the rest is unreadable
    m2 = _build(src, tmp_path / "out2").manifest
    assert m2["counts"]["samples"] == 2 and m2["rejects_by_reason"] == {"corrupt": 1}
    assert "(rest of the archive)" in _rejects(tmp_path / "out2")[0]["source"]


# --------------------------------------------------------------------------- 18: verify


def test_18_verify_lists_every_problem(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    _tar(src / "a.tar", [(f"{k}.jpg", _img()) for k in "abc"] + [(f"{k}.cls", b"1") for k in "abc"])
    out = tmp_path / "out"
    _build(src, out)
    _rewrite_sample(out, "a", cls=b"x")
    _rewrite_sample(out, "b", cls=b"-7")
    problems = verify_shards(out)
    assert any(":a: .cls b'x': label is not an integer" in p for p in problems)
    assert any(":b: .cls b'-7': label -7 is not an int32 >= 0" in p for p in problems)


def test_18_broken_manifest_names_the_file_everywhere(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img()})
    out = tmp_path / "out"
    _build(src, out)
    (out / "manifest.json").write_text('{"format": 1} {"extra": 2}')
    runner = CliRunner()
    for args in (
        ["shards", "build", str(src), str(out), "--max-side", "64"],
        ["shards", "inspect", str(out)],
        ["shards", "verify", str(out)],
    ):
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and f"{out}/manifest.json" in r.output and "Extra data" in r.output
        assert "Traceback" not in r.output


# -------------------------------------------------------------------- 23: CIFAR detection


def test_23_a_file_named_meta_does_not_make_a_cifar_folder(tmp_path):
    src = _folder(tmp_path, {"a.jpg": _img(), "meta": b"not a pickle"})
    out = tmp_path / "out"
    m = _build(src, out).manifest
    assert m["build"]["layout"] == "folder" and m["counts"]["samples"] == 1


# --------------------------------------------------- issue 11.7: all or most inputs rejected


def test_all_inputs_too_small_exits_non_zero_with_the_fix(tmp_path):
    tiny = {f"{i}.png": encode(photo("coffee", (32, 32)), "PNG") for i in range(3)}
    src = _folder(tmp_path, tiny)
    runner = CliRunner()
    r = runner.invoke(cli, ["shards", "build", str(src), str(tmp_path / "o1"), "--workers", "1"])
    assert r.exit_code == 1
    assert "all 3 images are smaller than --min-image-side 64" in r.output
    assert "--min-image-side 8" in r.output
    for flags in (["--min-image-side", "8"], ["--min-side", "8"]):  # the old flag still works
        out = tmp_path / flags[0]
        r = runner.invoke(cli, ["shards", "build", str(src), str(out), "--workers", "1", *flags])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "manifest.json").read_text())["counts"]["samples"] == 3
    m = json.loads((tmp_path / "--min-image-side" / "manifest.json").read_text())
    assert m["build"]["parameters"]["filter"]["min_side"] == 64  # boxes: unchanged
    m = json.loads((tmp_path / "--min-side" / "manifest.json").read_text())
    assert m["build"]["parameters"]["filter"]["min_side"] == 8


# ---------------------------------------------------------------------------- issue 9: IDX


def _idx_file(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _idx_folder(root: Path, gz: bool, prefix: str = "", n=(5, 3)) -> dict:
    root.mkdir()
    rng = np.random.default_rng(0)
    made = {}
    for split, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        ext = ".gz" if gz else ""
        _idx_file(root / f"{prefix}{split}-images-idx3-ubyte{ext}", images, gz)
        _idx_file(root / f"{prefix}{split}-labels-idx1-ubyte{ext}", labels, gz)
        made[split] = (images, labels)
    return made


@pytest.mark.parametrize("gz", [True, False])
def test_idx_splits_build_with_labels(tmp_path, gz):
    made = _idx_folder(tmp_path / "fashion-mnist", gz)
    for split, part, layout in (("train", "train", "auto"), ("test", "t10k", "idx")):
        out = tmp_path / split
        m = _build(tmp_path / "fashion-mnist", out, layout=layout, split=split).manifest
        images, labels = made[part]
        assert m["build"]["layout"] == "idx" and m["build"]["split"] == split
        assert m["counts"]["samples"] == len(labels) and m["classes"][0] == "T-shirt/top"
        rows = _rows(out)
        assert rows["label"] == labels.tolist()
        assert rows["key"][0] == f"{split}_000000"
        assert set(zip(rows["width"], rows["height"])) == {(28, 28)}
        with tarfile.open(out / "shard-000000.tar") as tf:
            jpg = Image.open(io.BytesIO(tf.extractfile(f"{split}_000000.jpg").read()))
            assert jpg.mode == "RGB" and jpg.format == "JPEG"
            got = np.asarray(jpg.convert("L")).astype(int)
        assert np.abs(got - images[0].astype(int)).mean() < 25  # noise, JPEG at quality 95
        assert verify_shards(out) == []


def test_idx_errors_are_clear(tmp_path):
    _idx_folder(tmp_path / "a", gz=True, prefix="emnist-letters-")
    _idx_folder(tmp_path / "b", gz=False)
    (tmp_path / "b" / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 28, 28) + bytes(100)
    )
    with pytest.raises(SourceError, match="IDX dimensions"):
        open_source(str(tmp_path / "b"), "idx")
    src = open_source(str(tmp_path / "a"))
    assert src.layout == "idx" and src.items[0].key == "emnist-letters_train_000000"
    for p in (tmp_path / "a").iterdir():
        p.rename(p.with_name(p.name.replace("emnist-letters-", "emnist-digits-")))
    _idx_folder(tmp_path / "c", gz=True, prefix="x-")
    for p in (tmp_path / "c").iterdir():
        p.rename(tmp_path / "a" / p.name)
    with pytest.raises(SourceError, match="several IDX sets"):
        open_source(str(tmp_path / "a"), "idx")


def test_reading_an_input_without_a_byte_limit(tmp_path):
    """SourceItem.read's default limit (2**62) is never allocated: the whole file comes back."""
    from shards.sources import SourceItem

    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 5000)
    assert SourceItem(key="a", source=str(path), path=str(path)).read() == b"x" * 5000
