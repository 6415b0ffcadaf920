"""shards.atomic: the one way files are written, whole or not at all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shards.atomic import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    is_temporary,
    stale_temporaries,
    temporary_path,
)

REPO = Path(__file__).resolve().parents[1]


def test_a_write_replaces_the_file_with_a_plain_files_mode(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    mask = os.umask(0o027)
    try:
        atomic_write_bytes(path, b"new")
    finally:
        os.umask(mask)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640  # as open() under that umask, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_an_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_file(path, "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("midway")
    assert path.read_text() == '{\n "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_file(path, "ab"):
            pass


def test_a_killed_writer_leaves_a_temporary_that_is_found_stale(tmp_path):
    path = tmp_path / "big.bin"
    code = (
        "import os, sys\n"
        "from shards.atomic import atomic_file\n"
        f"with atomic_file({str(path)!r}) as f:\n"
        "    f.write(b'half'); f.flush(); os._exit(9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 9 and not path.exists()
    [left] = list(tmp_path.iterdir())
    assert is_temporary(left.name)[0] == "big.bin"
    assert stale_temporaries(tmp_path) == [left]
    assert stale_temporaries(tmp_path, re.compile(r"^other$")) == []
    # this process's own temporary is not stale: its writer is alive
    mine = temporary_path(tmp_path / "mine.bin")
    mine.write_bytes(b"x")
    assert stale_temporaries(tmp_path) == [left]


def test_threads_writing_one_file_never_share_a_temporary(tmp_path):
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    errors = []

    def write(data):
        try:
            for _ in range(5):
                atomic_write_bytes(path, data, fsync=False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in payloads  # one writer's bytes, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.bin"]
