"""Atomic, reproducible WebDataset tar shards with their DALI index file.

A shard is written to a temporary name and renamed into place only when complete, index first,
so a reader (or a resumed build) never sees a partial shard. Tar headers carry no time, owner or
mode that depends on the machine: the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from .atomic import atomic_file, atomic_write_bytes

DALI_INDEX_VERSION = "v1.2"


def index_path_for(tar_path: str | os.PathLike) -> Path:
    """``shard-000000.tar`` -> ``shard-000000.idx`` (DALI's ``wds2idx`` naming)."""
    p = Path(tar_path)
    return p.with_suffix(".idx")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Write one shard: ``with ShardWriter(path) as w: w.write({"__key__": k, "jpg": b, ...})``.

    Components are written in the order of the dict (after ``__key__``). On a clean exit the tar
    and its ``.idx`` appear atomically; on an exception neither does.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.index_path = index_path_for(self.path)
        self._file = None  # the atomic_file context of the tar
        self._tar: tarfile.TarFile | None = None
        self._index_lines: list[str] = []
        self.count = 0
        self.sha256: str | None = None
        self.nbytes = 0
        self._discard = False

    def __enter__(self) -> ShardWriter:
        self._file = atomic_file(self.path)
        f = self._file.__enter__()
        self._tar = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
        self._fileobj = f
        return self

    def write(self, sample: dict[str, bytes | str]) -> None:
        key = sample["__key__"]
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")
        parts = []
        for ext, payload in sample.items():
            if ext == "__key__":
                continue
            if isinstance(payload, str):
                payload = payload.encode("utf-8")
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar = self._tar
            header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
            data_offset = tar.offset + header  # where the member's bytes start: what DALI indexes
            tar.addfile(info, io.BytesIO(payload))
            parts.append(f"{ext} {data_offset} {info.size} {name}")
        self._index_lines.append(" ".join(parts))
        self.count += 1

    def discard(self) -> None:
        """Leave no shard behind when the context exits (e.g. nothing was written)."""
        self._discard = True

    def __exit__(self, exc_type, exc, tb) -> None:
        tar, self._tar = self._tar, None
        file, self._file = self._file, None
        if exc_type is not None or self._discard:
            drop = exc if exc is not None else _Discarded()
            file.__exit__(type(drop), drop, tb)  # removes the temporary file
            return
        try:
            tar.close()  # the tar's end blocks; the file stays open for atomic_file
        except BaseException as e:
            file.__exit__(type(e), e, e.__traceback__)
            raise
        self._fileobj.flush()
        tmp = Path(self._fileobj.name)
        self.sha256 = sha256_file(tmp)
        self.nbytes = tmp.stat().st_size
        index = f"{DALI_INDEX_VERSION} {self.count}\n" + "".join(
            line + "\n" for line in self._index_lines
        )
        atomic_write_bytes(self.index_path, index.encode("ascii"))
        file.__exit__(None, None, None)  # fsync, rename onto the shard's name, fsync the folder


class _Discarded(Exception):
    """Thrown into a shard's atomic_file to drop it."""


def read_index(index_path: str | os.PathLike, names: bool = False) -> list[dict[str, tuple]]:
    """Parse a DALI webdataset index -> per sample ``{ext: (offset, size)}``, with ``names``
    ``{ext: (offset, size, member name)}``.

    Raises ``OSError`` when the file cannot be read, ``ValueError`` naming the file when it is
    not ASCII or not a well-formed ``v1.2`` index (a malformed line, a header count that differs
    from the number of lines)."""
    path = Path(index_path)
    lines = path.read_text(encoding="ascii").splitlines()
    if not lines or not lines[0].startswith(DALI_INDEX_VERSION + " "):
        raise ValueError(f"{path}: not a DALI {DALI_INDEX_VERSION} webdataset index")
    samples = []
    for line in lines[1:]:
        f = line.split()
        if len(f) % 4:
            raise ValueError(f"{path}: malformed line {line!r}")
        try:
            entry = {f[i]: (int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)}
        except ValueError as e:
            raise ValueError(f"{path}: malformed DALI index ({e})") from None
        samples.append(entry if names else {k: v[:2] for k, v in entry.items()})
    try:
        count = int(lines[0].split()[1])
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: malformed DALI index ({e})") from None
    if len(samples) != count:
        raise ValueError(f"{path}: header count {count} differs from {len(samples)} lines")
    return samples
