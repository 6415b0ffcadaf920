"""Files that appear whole or not at all: the one way every layer writes a file.

:func:`atomic_file` writes to a hidden temporary file beside the target (``.NAME.tmp-PID-TID``:
the writing process and thread, so concurrent writers never share one), flushes and fsyncs it,
gives it the mode a plain ``open()`` would (the umask's), renames it over the target
(``os.replace``: atomic on POSIX) and fsyncs the folder, so the rename survives a power loss. A
kill at any moment leaves the old file or the new one, never half of one, and at worst a
temporary file that :func:`stale_temporaries` finds: its writer is dead. An exception inside the
block removes the temporary file and leaves the target as it was.

``fsync=False`` skips both fsyncs (the rename stays atomic, durability waits for the system):
for many small files whose writer makes them durable together at the end (``shards scenes``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "fsync_dir",
    "is_temporary",
    "stale_temporaries",
    "temporary_path",
]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<tid>\d+)$")


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary file :func:`atomic_file` writes before it renames onto ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")


def is_temporary(name: str) -> tuple[str, int] | None:
    """``(target name, writer's pid)`` when ``name`` is a temporary file of :func:`atomic_file`."""
    m = _TEMPORARY.match(name)
    return (m["name"], int(m["pid"])) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OverflowError:
        return False
    return True


def stale_temporaries(folder: str | os.PathLike, target: re.Pattern | None = None) -> list[Path]:
    """The temporary files in ``folder`` whose writer is no longer running (and whose target
    name matches ``target``, when given): what a killed write left, safe to remove."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for p in sorted(folder.iterdir()):
        found = is_temporary(p.name)
        if found is None or not p.is_file():
            continue
        name, pid = found
        if (target is None or target.match(name)) and not _alive(pid):
            stale.append(p)
    return stale


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` durable (a rename into it, a new file). A file
    system that cannot fsync a folder is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears whole when the block
    ends, or not at all when it raises (see the module's docstring). ``f.name`` is the
    temporary file's path, for writers that need one (hashing what was written)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a new file: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        tmp.chmod(0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_file(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, fsync: bool = True) -> None:
    """``data`` as indented JSON and a final newline."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", fsync=fsync)
