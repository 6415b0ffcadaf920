"""Shard folders in object storage: ``s3://``, ``gs://`` and ``https://`` (read-only) URLs.

A shard folder at a URL is read through a local :class:`ShardCache` (one folder per URL, the
same layout as a local shard folder): ``manifest.json`` is read from the URL every time the
folder is opened; ``proposals.parquet``, the other small files and the DALI ``.idx`` files are
fetched once and kept; the tar shards are fetched whole when they are first needed, written to a
temporary name, checked against the manifest's size and sha256 and renamed into place. A tar
that differs from the manifest, or that the URL does not have, is an error naming its URL.

Beyond ``max_bytes`` the least recently used tars are evicted, except those *pinned* (read now
or soon by a reader on this node). Processes of one node share a cache: every file has a lock
file (``fcntl.flock``); a download holds it exclusively, so a file is fetched once however many
processes want it, and a pin holds it shared, so no process evicts a file another one reads.
:class:`Prefetcher` keeps the next files of a reader's plan downloaded ahead of it.

:func:`upload_shards` copies a finished local shard folder to a URL (multipart for large files,
the sha256 of every object in its metadata, files already there skipped, ``manifest.json``
last); :class:`ShardUploader` does the same while a build is still writing shards.

Credentials come from the storage library's standard chain (environment, profile, instance
role); an S3-compatible endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL``. A URL with
credentials in it (``s3://KEY:SECRET@bucket``) is refused, so none ends up in a log, a run
record or a manifest. The storage libraries are imported only for a URL: local shard folders
never need them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .atomic import atomic_write_bytes, atomic_write_json
from .manifest import read_manifest_file
from .writer import sha256_file

__all__ = [
    "INSTALL_HINT",
    "Prefetcher",
    "RemoteShardError",
    "ShardCache",
    "ShardUploader",
    "cache_for",
    "configure",
    "default_cache_root",
    "is_url",
    "redact_url",
    "upload_shards",
]

SCHEMES = ("s3", "gs", "gcs", "http", "https")
READ_ONLY = ("http", "https")
INSTALL_HINT = "install with pip install -e '.[s3]'"
CACHE_DIR_ENV = "SSL_CLI_SHARD_CACHE"  # root of the shard caches
CACHE_BYTES_ENV = "SSL_CLI_SHARD_CACHE_BYTES"  # their size limit: 200G, 512M, bytes
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
BLOCK_SIZE = 64 << 20  # multipart part size of uploads
_SMALL_FILES = ("proposals", "rejects", "ignored", "classes")  # keys of manifest["files"]
_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
_SHARD_FILE = re.compile(r"^shard-\d{6}\.(tar|idx)$")  # a shard's tar or its DALI index
UPLOAD_RECORD = ".ssl-cli-upload.json"  # the local folder's record of what it uploaded where
_STATE = ".ssl-cli-cache"  # cache bookkeeping, inside every cache folder


class RemoteShardError(ValueError):
    """A file of a shard folder at a URL is missing there, differs from its manifest, or
    cannot be read or written; the message names its URL."""


# ------------------------------------------------------------------------------------- URLs


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL of a storage this module reads (a ``str`` with a scheme of
    :data:`SCHEMES`); local paths (``str`` or ``Path``) are not."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in SCHEMES


def check_url(url: str) -> str:
    """``url`` without trailing ``/``; refuses credentials in it and an unknown scheme."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise RemoteShardError(
            f"{redact_url(url)}: unsupported URL scheme {parts.scheme!r} "
            f"(supported: {', '.join(s + '://' for s in SCHEMES)})"
        )
    if "@" in parts.netloc:
        raise RemoteShardError(
            f"{redact_url(url)}: credentials in the URL are refused (they would end up in logs "
            "and run records); give them through the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) or a profile"
        )
    if not parts.netloc:
        raise RemoteShardError(f"{url}: no bucket or host in the URL")
    return url.rstrip("/")


def redact_url(url: str) -> str:
    """``url`` fit for a log: user, password and query string replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _join(url: str, name: str) -> str:
    return f"{url}/{name}"


_FS_LOCK = threading.Lock()
_FS: dict[tuple, object] = {}


def filesystem(url: str, endpoint_url: str | None = None):
    """``(fsspec filesystem, path of url inside it)``, one filesystem per process."""
    try:
        import fsspec
    except ImportError:
        raise RemoteShardError(
            f"{redact_url(url)}: reading shards from a URL needs fsspec; {INSTALL_HINT}"
        ) from None
    scheme = urlsplit(url).scheme.lower()
    endpoint = endpoint_url or _DEFAULTS["endpoint_url"] or os.environ.get(ENDPOINT_ENV) or None
    key = (os.getpid(), scheme, endpoint if scheme == "s3" else None)
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            options: dict = {}
            if scheme == "s3" and endpoint:
                options["client_kwargs"] = {"endpoint_url": endpoint}
            if scheme == "s3":
                # a fresh instance per process and endpoint (no sharing across a fork), and no
                # listings cache: an object replaced by someone else is seen as it is now
                options["skip_instance_cache"] = True
                options["use_listings_cache"] = False
            try:
                fs = fsspec.filesystem(scheme, **options)
            except ImportError as e:
                package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, "aiohttp")
                raise RemoteShardError(
                    f"{redact_url(url)}: reading {scheme}:// URLs needs {package} ({e}); "
                    f"{INSTALL_HINT}"
                ) from None
            _FS[key] = fs
    path = url if scheme in READ_ONLY else url.split("://", 1)[1]
    return fs, path


# ------------------------------------------------------------------------------- settings

_DEFAULTS: dict = {"cache_dir": None, "max_bytes": None, "endpoint_url": None, "prefetch": 4}


def configure(
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    endpoint_url: str | None = None,
    prefetch: int | None = None,
) -> None:
    """Defaults of this process for shard folders opened by URL without an explicit
    :class:`ShardCache` (what the command line's cache and endpoint options set)."""
    if cache_dir is not None:
        _DEFAULTS["cache_dir"] = str(cache_dir)
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        _DEFAULTS["max_bytes"] = int(max_bytes)
    if endpoint_url is not None:
        _DEFAULTS["endpoint_url"] = endpoint_url
    if prefetch is not None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        _DEFAULTS["prefetch"] = int(prefetch)


def default_cache_root() -> Path:
    """Where the shard caches live: ``configure(cache_dir=)``, else ``$SSL_CLI_SHARD_CACHE``,
    else ``$XDG_CACHE_HOME/ssl-cli/shards`` (``~/.cache/ssl-cli/shards``)."""
    if _DEFAULTS["cache_dir"]:
        return Path(_DEFAULTS["cache_dir"])
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssl-cli" / "shards"


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"200G"``, ``"512M"``, ``"1.5T"`` or a plain byte count -> bytes (binary units);
    ``ValueError`` for anything else."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _SIZE_UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 200G, 512M, 1000000)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a size must be >= 0")
    return int(value * _SIZE_UNITS[unit])


def _default_max_bytes() -> int | None:
    if _DEFAULTS["max_bytes"] is not None:
        return _DEFAULTS["max_bytes"]
    raw = os.environ.get(CACHE_BYTES_ENV)
    if raw:
        try:
            return parse_size(raw)
        except ValueError as e:
            raise ValueError(f"{CACHE_BYTES_ENV}={raw!r}: {e}") from None
    return None


def cache_for(url: str, root: str | os.PathLike | None = None) -> ShardCache:
    """The cache of ``url`` with this process's defaults (:func:`configure`); ``root``: in
    this folder instead of the default one."""
    return ShardCache(url, root=root, endpoint_url=_DEFAULTS["endpoint_url"])


def default_prefetch() -> int:
    return _DEFAULTS["prefetch"]


# ---------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class _Want:
    """A file of the folder and what it must be: the manifest's ``sha256`` and ``bytes`` for a
    tar, the tar's digest (``of``) for its index, the remote object's stamp for the others."""

    name: str
    sha256: str | None = None
    bytes: int | None = None
    of: str | None = None


class ShardCache:
    """The local copy of the shard folder at ``url`` (see the module docstring).

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, ``https://...``.
        root: the cache folder of this URL [default: :func:`default_cache_root` / a hash of
            the URL and endpoint].
        max_bytes: evict least recently used tars beyond this size [default:
            ``$SSL_CLI_SHARD_CACHE_BYTES``, else no limit]. Pinned tars are never evicted, so
            the cache exceeds it when what is pinned does.
        endpoint_url: an S3-compatible endpoint [default: ``$AWS_ENDPOINT_URL``].

    :attr:`root` has the layout of a local shard folder (``manifest.json``,
    ``proposals.parquet``, ``shard-NNNNNN.tar`` and ``.idx``), so what reads a local folder
    reads it; ``.ssl-cli-cache/`` in it holds the locks, what each file was checked against and
    ``downloads.jsonl``, one line per download.
    """

    def __init__(
        self,
        url: str,
        root: str | os.PathLike | None = None,
        max_bytes: int | None = None,
        endpoint_url: str | None = None,
    ):
        self.url = check_url(url)
        self.endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
        if root is None:
            ident = json.dumps([self.url, self.endpoint_url if self.url.startswith("s3") else None])
            root = default_cache_root() / hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.root = Path(root)
        self.max_bytes = _default_max_bytes() if max_bytes is None else int(max_bytes)
        self._state = self.root / _STATE
        for sub in ("locks", "meta", "tmp"):
            (self._state / sub).mkdir(parents=True, exist_ok=True)
        about = self._state / "url.txt"
        if not about.exists():
            about.write_text(redact_url(self.url) + "\n")
        self._clean_tmp()
        self._pins: dict[str, tuple[int, int]] = {}  # name -> (lock fd held shared, count)
        self._pin_lock = threading.Lock()
        self._over_limit_said = False
        self.manifest: dict | None = None

    def _clean_tmp(self) -> None:
        """Remove what downloads of processes that no longer run left behind."""
        for tmp in (self._state / "tmp").iterdir():
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
            except (ValueError, IndexError):
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass

    def sizes(self, names: Sequence[str]) -> dict[str, int]:
        """Size of each of ``names`` at the URL (absent: missing there): one listing of the
        folder, or one request per file where the storage has no listing (``https://``)."""
        fs, base = self._fs()
        wanted = set(names)
        if urlsplit(self.url).scheme.lower() not in READ_ONLY:
            try:
                entries = fs.ls(base, detail=True)
            except FileNotFoundError:
                entries = []
            found = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in entries}
            return {n: found[n] for n in wanted if n in found}

        def size(name: str) -> tuple[str, int | None]:
            try:
                return name, fs.info(f"{base}/{name}").get("size")
            except FileNotFoundError:
                return name, None

        with ThreadPoolExecutor(16) as pool:
            return {n: v for n, v in pool.map(size, sorted(wanted)) if v is not None}

    # ---- pickling: a process that receives the cache opens its own filesystem and pins
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pins"] = {}
        state["_pin_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pin_lock = threading.Lock()

    def remote(self, name: str) -> str:
        """The URL of ``name`` in the folder."""
        return _join(self.url, name)

    def _fs(self):
        return filesystem(self.url, self.endpoint_url)

    # ------------------------------------------------------------------------ the folder

    def read_manifest(self) -> dict:
        """Read ``manifest.json`` from the URL into the cache; returns it (checked like a local
        one)."""
        fs, base = self._fs()
        url = self.remote("manifest.json")
        try:
            data = fs.cat_file(f"{base}/manifest.json")
        except FileNotFoundError:
            raise RemoteShardError(
                f"{url} not found: not a finished shard folder (an upload not done yet, or the "
                "wrong URL)"
            ) from None
        except Exception as e:  # noqa: BLE001 - storage libraries raise their own types
            raise RemoteShardError(f"{url}: cannot be read ({_reason(e)})") from None
        local = self.root / "manifest.json"
        if not local.exists() or local.read_bytes() != data:
            self._atomic_write(local, data)
        try:
            manifest = read_manifest_file(self.root)
        except ValueError as e:
            raise RemoteShardError(str(e).replace(str(local), url)) from None
        self.manifest = manifest
        return manifest

    def open(self) -> dict:
        """:meth:`read_manifest`, then fetch the small files and every DALI index into the
        cache; returns the manifest."""
        manifest = self.read_manifest()
        small = [
            _Want(manifest["files"][k])
            for k in _SMALL_FILES
            if manifest["files"].get(k) and k != "ignored"
        ]
        stamps = self._stamps([w.name for w in small])
        wants = [_Want(w.name, of=stamps.get(w.name)) for w in small]
        wants += [
            _Want(s["index"], sha256=s.get("index_sha256"), of=s["sha256"])
            for s in manifest["shards"]
        ]
        with ThreadPoolExecutor(min(16, max(1, len(wants)))) as pool:
            for f in [pool.submit(self.fetch, w, pin=False) for w in wants]:
                f.result()
        return manifest

    def _stamps(self, names: Sequence[str]) -> dict[str, str | None]:
        """Remote size + ETag (or modification time) of small files: a changed one is fetched
        again. A file missing remotely maps to ``None`` (fetching it names it)."""
        fs, base = self._fs()
        out: dict[str, str | None] = {}
        for name in names:
            try:
                info = fs.info(f"{base}/{name}")
            except FileNotFoundError:
                out[name] = None
                continue
            except Exception as e:  # noqa: BLE001
                raise RemoteShardError(
                    f"{self.remote(name)}: cannot be read ({_reason(e)})"
                ) from None
            tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or ""
            out[name] = f"{info.get('size')}:{tag}"
        return out

    def small(self, name: str) -> _Want:
        """What the small file ``name`` (not a tar or index) must be: the remote object as it
        is now (its size and ETag)."""
        return _Want(name, of=self._stamps([name])[name])

    def shard(self, name: str) -> _Want:
        """What the tar ``name`` of the manifest must be."""
        if self.manifest is None:
            self.open()
        for s in self.manifest["shards"]:
            if s["name"] == name:
                return _Want(name, sha256=s["sha256"], bytes=s["bytes"])
        raise RemoteShardError(
            f"{self.remote(name)}: not a shard of {self.remote('manifest.json')}"
        )

    # ------------------------------------------------------------------------- a file

    def path(self, name: str) -> Path:
        return self.root / name

    def _lock_path(self, name: str) -> Path:
        return self._state / "locks" / f"{name}.lock"

    def _meta_path(self, name: str) -> Path:
        return self._state / "meta" / f"{name}.json"

    def _valid(self, want: _Want) -> bool:
        path = self.path(want.name)
        try:
            meta = json.loads(self._meta_path(want.name).read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        if want.sha256 is not None:
            return meta.get("sha256") == want.sha256 and want.bytes in (None, size)
        return meta.get("of") == want.of and want.of is not None and size == meta.get("bytes")

    def fetch(self, want: _Want | str, pin: bool = False) -> Path:
        """The local path of ``want`` (a tar name: checked against the manifest), downloaded
        first when the cache does not have it (by one process of the node; the others wait for
        it). ``pin``: also pin it (:meth:`unpin` releases it)."""
        if isinstance(want, str):
            want = self.shard(want)
        while True:
            if self._valid(want):
                self._touch(want.name)
                if not pin or self._pin(want):
                    return self.path(want.name)
                continue  # evicted between the check and the pin: fetch again
            with _FileLock(self._lock_path(want.name)):
                if not self._valid(want):
                    self._download(want)
            if not pin:
                return self.path(want.name)

    def _download(self, want: _Want) -> None:
        fs, base = self._fs()
        url = self.remote(want.name)
        if want.bytes is not None:
            self.evict(need=want.bytes)
        tmp = self._state / "tmp" / f"{want.name}.{os.getpid()}.{threading.get_ident()}"
        t0 = time.perf_counter()
        try:
            fs.get_file(f"{base}/{want.name}", str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            where = f"listed in {self.remote('manifest.json')}"
            raise RemoteShardError(f"{url}: missing ({where})") from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the cache's side, not the store's
                raise RemoteShardError(
                    f"the shard cache {self.root} is full ({e.strerror}) while downloading "
                    f"{url}: the store is not at fault; free space there, or give a smaller "
                    "--cache-size or another --cache-dir"
                ) from None
            raise RemoteShardError(f"{url}: download failed ({_reason(e)})") from None
        except Exception as e:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise RemoteShardError(f"{url}: download failed ({_reason(e)})") from None
        size = tmp.stat().st_size
        digest = sha256_file(tmp)
        if want.sha256 is not None and (want.bytes not in (None, size) or digest != want.sha256):
            tmp.unlink(missing_ok=True)
            says = f"{want.bytes} bytes with sha256" if want.bytes is not None else "sha256"
            raise RemoteShardError(
                f"{url}: {size} bytes with sha256 {digest[:16]}..., "
                f"{self.remote('manifest.json')} says {says} "
                f"{want.sha256[:16]}...: the remote file is damaged or from another build; "
                "upload the shards again (ssl-cli shards verify URL names every mismatch)"
            )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        self._meta_path(want.name).unlink(missing_ok=True)
        os.replace(tmp, self.path(want.name))
        stamp = want.of if want.sha256 is None else self._stamps([want.name]).get(want.name)
        meta = {"sha256": digest, "bytes": size, "of": want.of, "remote": stamp}
        self._atomic_write(self._meta_path(want.name), json.dumps(meta).encode())
        line = {
            "name": want.name,
            "bytes": size,
            "seconds": round(time.perf_counter() - t0, 3),
            "pid": os.getpid(),
            "time": time.time(),
        }
        with open(self._state / "downloads.jsonl", "a") as f:  # O_APPEND: one write per line
            f.write(json.dumps(line) + "\n")

    def drop(self, name: str) -> None:
        """Forget the cache copy of ``name`` (a copy that failed its check): it is downloaded
        again on its next use."""
        with _FileLock(self._lock_path(name)):
            self._meta_path(name).unlink(missing_ok=True)
            self.path(name).unlink(missing_ok=True)

    def check_store(self) -> list[str]:
        """The store itself against the cache: every shard's tar whose object at the URL is not
        the one the cached copy was downloaded from (its size and ETag, a HEAD request each),
        or whose cached copy no longer matches its recorded digest, is downloaded again and
        checked against the manifest; a tar never downloaded is downloaded and checked too.
        Returns one line per object that fails (the store's fault, named as such), so that a
        warm cache never vouches for a bucket changed after it was filled."""
        manifest = self.manifest or self.open()
        names = [s["name"] for s in manifest["shards"]]
        stamps = self._stamps(names)
        problems = []
        for name in names:
            meta_path = self._meta_path(name)
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            cached = self.path(name)
            fresh = (
                meta.get("remote") is not None
                and meta.get("remote") == stamps.get(name)
                and cached.is_file()
                and cached.stat().st_size == meta.get("bytes")
                and sha256_file(cached) == meta.get("sha256")
            )
            if fresh:
                continue
            meta_path.unlink(missing_ok=True)  # the cache copy is not evidence: fetch again
            try:
                self.fetch(name)
            except RemoteShardError as e:
                problems.append(f"{e} (the object in the store is wrong, not the cache)")
        return problems

    def downloads(self) -> list[dict]:
        """Every download into this cache so far (all processes), oldest first."""
        path = self._state / "downloads.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def _touch(self, name: str) -> None:
        try:
            os.utime(self.path(name))  # last use: the order of eviction
        except OSError:
            pass

    def _atomic_write(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)

    # --------------------------------------------------------------------------- pins

    def _pin(self, want: _Want) -> bool:
        """Hold ``want``'s lock shared; ``False`` when the file went away meanwhile."""
        with self._pin_lock:
            if want.name in self._pins:
                fd, n = self._pins[want.name]
                self._pins[want.name] = (fd, n + 1)
                return True
        fd = os.open(self._lock_path(want.name), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits for a download in progress (not under _pin_lock)
        if not self._valid(want):
            os.close(fd)
            return False
        with self._pin_lock:
            if want.name in self._pins:  # pinned by another thread meanwhile
                os.close(fd)
                fd, n = self._pins[want.name]
                self._pins[want.name] = (fd, n + 1)
            else:
                self._pins[want.name] = (fd, 1)
        return True

    def unpin(self, name: str) -> None:
        """Release one :meth:`fetch` ``(pin=True)`` of ``name``."""
        with self._pin_lock:
            if name not in self._pins:
                return
            fd, n = self._pins[name]
            if n > 1:
                self._pins[name] = (fd, n - 1)
            else:
                del self._pins[name]
                os.close(fd)  # releases the shared lock

    def pinned(self) -> set[str]:
        with self._pin_lock:
            return set(self._pins)

    # ------------------------------------------------------------------------- eviction

    def size(self) -> int:
        """Bytes of the tars in the cache."""
        return sum(p.stat().st_size for p in self.root.glob("shard-*.tar"))

    def evict(self, need: int = 0) -> list[str]:
        """Delete least recently used tars, pinned ones excepted, until the tars and ``need``
        more bytes fit in ``max_bytes``; returns the names deleted."""
        if self.max_bytes is None:
            return []
        evicted: list[str] = []
        with _FileLock(self._state / "evict.lock"):
            files = []
            for p in self.root.glob("shard-*.tar"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, p.name, st.st_size))
            total = sum(size for _, _, size in files)
            for _, name, size in sorted(files):
                if total + need <= self.max_bytes:
                    break
                if name in self.pinned():
                    continue
                fd = os.open(self._lock_path(name), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EACCES):
                            continue  # pinned by another process, or being downloaded
                        raise
                    self._meta_path(name).unlink(missing_ok=True)
                    self.path(name).unlink(missing_ok=True)
                    total -= size
                    evicted.append(name)
                finally:
                    os.close(fd)
        if total + need > self.max_bytes and not self._over_limit_said:
            self._over_limit_said = True  # once per cache object: said, not repeated per tar
            warnings.warn(
                f"the shard cache {self.root} needs {(total + need) / 2**20:,.1f} MiB, over its "
                f"limit of {self.max_bytes / 2**20:,.1f} MiB (--cache-size): the tars in it are "
                "in use by the readers (the shards of the batches in flight) and cannot be "
                "evicted; raise --cache-size to at least a few shards per reader",
                RuntimeWarning,
                stacklevel=2,
            )
        return evicted


class _FileLock:
    """An exclusive ``flock`` on ``path`` (created), released on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


# ------------------------------------------------------------------------------- prefetch


class Prefetcher:
    """Keeps the next files of a reader's plan in the cache ahead of the reader.

    ``names``: the tars the reader may ask for, by position. :meth:`plan` gives the positions
    the reader will read next, in order, and the ones it reads now; the first ``ahead`` of the
    upcoming ones are downloaded by ``threads`` background threads and pinned with the current
    ones, the files that left the window are unpinned. :meth:`get` returns the local path of
    one, waiting only when it is not there yet; a failed download is raised there, naming the
    file's URL.
    """

    def __init__(self, cache: ShardCache, names: Sequence[str], ahead: int = 4, threads: int = 2):
        self.cache, self.names, self.ahead = cache, list(names), ahead
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="shard-prefetch")
        self._jobs: dict[int, Future] = {}
        self._pinned: set[int] = set()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds :meth:`get` waited on downloads
        self.waits = 0

    def _job(self, i: int) -> Future:
        with self._lock:
            job = self._jobs.get(i)
            if job is None or (job.done() and job.exception() is not None):
                job = self._pool.submit(self.cache.fetch, self.names[i], True)
                self._jobs[i] = job
            return job

    def get(self, i: int) -> Path:
        """The local path of file ``i`` (pinned until it leaves the plan's window)."""
        job = self._job(i)
        if not job.done():
            t0 = time.perf_counter()
            path = job.result()
            self.waited += time.perf_counter() - t0
            self.waits += 1
            return path
        return job.result()

    def plan(self, upcoming: Iterable[int], current: Iterable[int] = ()) -> None:
        """The reader reads ``current`` now and then ``upcoming`` in this order."""
        keep = set(current)
        for i in upcoming:
            if len(keep) >= len(set(current)) + self.ahead:
                break
            keep.add(i)
        for i in keep:
            self._job(i)
        with self._lock:
            leaving = [i for i in self._jobs if i not in keep]
        for i in leaving:
            self._release(i)

    def _release(self, i: int) -> None:
        with self._lock:
            job = self._jobs.get(i)
            if job is None or not job.done():
                return  # still downloading: released by a later plan
            del self._jobs[i]
        if job.exception() is None:
            self.cache.unpin(self.names[i])

    def close(self) -> None:
        """Stop prefetching and unpin everything."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            jobs, self._jobs = self._jobs, {}
        for i, job in jobs.items():
            if job.done() and not job.cancelled() and job.exception() is None:
                self.cache.unpin(self.names[i])


# --------------------------------------------------------------------------------- upload


def _writable(url: str, endpoint_url: str | None):
    url = check_url(url)
    if urlsplit(url).scheme.lower() in READ_ONLY:
        raise RemoteShardError(
            f"{redact_url(url)}: https:// URLs are read-only; upload to s3:// or gs://"
        )
    fs, base = filesystem(url, endpoint_url)
    return url, fs, base


def _remote_sha256(fs, path: str) -> str | None:
    """The sha256 recorded in the object's metadata at upload (``None``: none recorded)."""
    try:
        if hasattr(fs, "metadata"):  # s3fs: the object's user metadata
            meta = fs.metadata(path)
        else:  # gcsfs: in the object's info
            meta = fs.info(path).get("metadata") or {}
    except FileNotFoundError:
        return None
    return (meta or {}).get("sha256")


def _remote_stamp(fs, path: str) -> str | None:
    """Size and ETag (S3), MD5 / CRC32C (GCS) or modification time of an object: changes
    whenever its bytes do, whatever its metadata says. ``None``: no such object."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    tag = next(
        (
            info[k]
            for k in ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime")
            if info.get(k)
        ),
        "",
    )
    return f"{info.get('size')}:{tag}"


def _remote_digest(fs, path: str, block: int = 1 << 22) -> str:
    """The sha256 of an object's bytes, read from the store (no metadata trusted)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _put(fs, local: Path, path: str, sha256: str, block_size: int) -> None:
    scheme = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if scheme in ("s3", "s3a"):
        fs.put_file(str(local), path, chunksize=block_size, Metadata={"sha256": sha256})
    elif scheme in ("gs", "gcs"):
        fs.put_file(str(local), path, metadata={"sha256": sha256}, chunksize=block_size)
    else:
        fs.put_file(str(local), path)


class ShardUploader:
    """Copies the shard folder ``local_dir`` to ``url``, also while a build writes it.

    :meth:`upload_ready` uploads the finished shards (a tar is renamed into place after its
    index, so a tar's presence means both are complete) not uploaded yet; :meth:`finish`
    uploads what is left and ``manifest.json`` last. A build calls :meth:`shard_finished`
    after each shard (:meth:`queue_shard`: the same from a background thread, so that the
    build goes on meanwhile), or :meth:`start` polls the folder from a thread. Before the
    first shard goes up, a manifest at the URL that is not the local one is deleted.
    Every object gets its sha256 in its metadata; an object already at the URL with the local
    file's size and sha256 is skipped, so a killed upload resumes where it stopped.

    ``on_file(name, uploaded)`` is called after each file (``uploaded`` False: skipped).
    """

    def __init__(
        self,
        local_dir: str | os.PathLike,
        url: str,
        endpoint_url: str | None = None,
        block_size: int = BLOCK_SIZE,
        on_file: Callable[[str, bool], None] | None = None,
    ):
        if block_size < 5 << 20:
            raise ValueError(f"block_size must be >= 5 MiB (S3's smallest part), got {block_size}")
        self.local = Path(local_dir)
        self.url, self.fs, self.base = _writable(url, endpoint_url)
        self.block_size = block_size
        self.on_file = on_file
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self.bytes = 0
        self._done: set[str] = set()
        self._listing: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._manifest_checked = False
        self._uploaded_records: dict | None = None
        self.removed: list[str] = []

    def check_access(self) -> None:
        """Write and delete a small probe object at the URL: missing credentials, a missing
        bucket or no write permission fail here, before a build spends hours searching, with
        a message that names the URL and the likely fix."""
        probe = f"{self.base}/.ssl-cli-write-check"
        try:
            self.fs.pipe_file(probe, b"ssl-cli write check\n")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - storage libraries raise their own types
            name = type(e).__name__
            hint = (
                "no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a "
                "profile; Google: GOOGLE_APPLICATION_CREDENTIALS)"
                if "Credential" in name or "credential" in str(e).lower()
                else "check that the bucket exists and that these credentials may write to it"
            )
            raise RemoteShardError(
                f"{redact_url(self.url)}: cannot write there ({name}: {_reason(e)}); {hint}. "
                "Nothing was built."
            ) from None

    def _sizes(self) -> dict[str, int]:
        if self._listing is None:
            try:
                entries = self.fs.ls(self.base, detail=True)
            except FileNotFoundError:
                entries = []
            self._listing = {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in entries
            }
        return self._listing

    def upload_file(self, name: str, sha256: str | None = None) -> bool:
        """Upload ``name`` unless the URL has it with the same size and sha256; returns
        whether it was uploaded."""
        with self._lock:
            if name in self._done:
                return False
            local = self.local / name
            if not local.is_file():
                raise RemoteShardError(f"{local}: not found, cannot upload it to {self.url}")
            size = local.stat().st_size
            sha256 = sha256 or sha256_file(local)
            remote = f"{self.base}/{name}"
            there = self._sizes().get(name)
            if there == size and self._same_bytes(name, remote, sha256):
                self.skipped.append(name)
                self._done.add(name)
                uploaded = False
            else:
                try:
                    _put(self.fs, local, remote, sha256, self.block_size)
                except Exception as e:  # noqa: BLE001
                    raise RemoteShardError(
                        f"{_join(self.url, name)}: upload of {local} failed ({_reason(e)})"
                    ) from None
                self.uploaded.append(name)
                self.bytes += size
                self._done.add(name)
                self._sizes()[name] = size
                self._record(name, _remote_stamp(self.fs, remote), sha256)
                uploaded = True
        if self.on_file is not None:
            self.on_file(name, uploaded)
        return uploaded

    def _same_bytes(self, name: str, remote: str, sha256: str) -> bool:
        """Whether the object at ``remote`` holds the bytes of digest ``sha256``: its metadata
        says so and its stamp (size + ETag) is the one recorded when this folder uploaded it;
        without a record of it, its bytes are read back and hashed. Metadata alone is not
        trusted: an object rewritten with its metadata copied keeps the old digest."""
        if _remote_sha256(self.fs, remote) != sha256:
            return False
        stamp = _remote_stamp(self.fs, remote)
        record = self._records().get(self._key(name))
        if record is not None and record == {"stamp": stamp, "sha256": sha256}:
            return True
        if _remote_digest(self.fs, remote) != sha256:
            return False
        self._record(name, stamp, sha256)
        return True

    def _key(self, name: str) -> str:
        return f"{redact_url(self.url)}/{name}"

    def _records(self) -> dict:
        if self._uploaded_records is None:
            try:
                self._uploaded_records = json.loads((self.local / UPLOAD_RECORD).read_text())
            except (OSError, ValueError):
                self._uploaded_records = {}
        return self._uploaded_records

    def _record(self, name: str, stamp: str | None, sha256: str) -> None:
        """Remember the stamp of an object known to hold ``sha256`` (``UPLOAD_RECORD`` in the
        local folder, rewritten atomically)."""
        records = self._records()
        records[self._key(name)] = {"stamp": stamp, "sha256": sha256}
        atomic_write_json(self.local / UPLOAD_RECORD, records)

    def shard_finished(self, tar: str | os.PathLike, sha256: str | None = None) -> None:
        """A build finished the shard ``tar`` (its index is written): upload both."""
        tar = Path(tar)
        if not self._manifest_checked:
            with self._lock:
                self._drop_stale_manifest()
                self._manifest_checked = True
        self.upload_file(tar.with_suffix(".idx").name)
        self.upload_file(tar.name, sha256)

    def queue_shard(self, tar: str | os.PathLike, sha256: str | None = None) -> None:
        """:meth:`shard_finished` in a background thread (one upload at a time, in order).
        Raises the error of an earlier queued upload, so a build stops at the first failure;
        :meth:`finish` (or :meth:`close`) waits for what is queued."""
        self._raise_failed(wait=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-upload")
        self._pending.append(self._pool.submit(self.shard_finished, tar, sha256))

    def _raise_failed(self, wait: bool) -> None:
        pending, self._pending = self._pending, []
        error = None
        for future in pending:
            if wait or future.done():
                error = error or future.exception()
            else:
                self._pending.append(future)
        if error is not None:
            raise error

    def _drop_stale_manifest(self) -> None:
        """A manifest at the URL that is not the local one goes first: a reader must never see
        a manifest while the shards under it change."""
        local = self.local / "manifest.json"
        remote = f"{self.base}/manifest.json"
        if "manifest.json" not in self._sizes():
            return
        if local.is_file():
            try:
                if self.fs.cat_file(remote) == local.read_bytes():
                    return
            except FileNotFoundError:
                return
        self.fs.rm_file(remote)
        self._sizes().pop("manifest.json", None)

    def upload_ready(self) -> int:
        """Upload every finished shard not uploaded yet; returns how many files went up
        (:meth:`shard_finished` first drops a stale manifest at the URL)."""
        n = 0
        for tar in sorted(self.local.glob("shard-*.tar")):
            if _SHARD_NAME.match(tar.name) and tar.name not in self._done:
                before = len(self.uploaded)
                self.shard_finished(tar)
                n += len(self.uploaded) - before
        return n

    def finish(self) -> dict:
        """Upload everything the local manifest lists, then the manifest; returns
        ``{"url", "uploaded", "skipped", "bytes"}``."""
        self.close()
        manifest = read_manifest_file(self.local)
        self._drop_stale_manifest()
        for key in _SMALL_FILES:
            name = manifest["files"].get(key)
            if name and (self.local / name).is_file():
                self.upload_file(name)
        for s in manifest["shards"]:
            self.upload_file(s["index"])
            self.upload_file(s["name"], s["sha256"])
        self._remove_unlisted(manifest)
        self.upload_file("manifest.json")
        return {
            "url": redact_url(self.url),
            "uploaded": list(self.uploaded),
            "skipped": list(self.skipped),
            "removed": list(self.removed),
            "bytes": self.bytes,
        }

    def _remove_unlisted(self, manifest: dict) -> None:
        """Shard files at the URL that the new manifest does not list (an earlier build of the
        same URL with more shards) are deleted before the manifest goes up, so that the folder
        at the URL is exactly the build."""
        listed = {n for s in manifest["shards"] for n in (s["name"], s["index"])}
        for name in sorted(self._sizes()):
            if _SHARD_FILE.match(name) and name not in listed:
                self.fs.rm_file(f"{self.base}/{name}")
                self._sizes().pop(name, None)
                self.removed.append(name)

    # ---------------------------------------------------------------------- watcher mode

    def start(self, poll: float = 5.0) -> ShardUploader:
        """Upload finished shards from a background thread every ``poll`` seconds until
        :meth:`finish` (or :meth:`close`)."""

        def loop() -> None:
            while not self._stop.wait(poll):
                try:
                    self.upload_ready()
                except BaseException as e:  # noqa: BLE001 - reported by finish/close
                    self._error = e
                    return

        self._thread = threading.Thread(target=loop, name="shard-upload", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Wait for the queued uploads and stop the watcher thread; raises the error that
        stopped either, if any."""
        if self._pool is not None:
            try:
                self._raise_failed(wait=True)
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def upload_shards(
    local_dir: str | os.PathLike,
    url: str,
    endpoint_url: str | None = None,
    block_size: int = BLOCK_SIZE,
    on_file: Callable[[str, bool], None] | None = None,
) -> dict:
    """Upload the finished shard folder ``local_dir`` to ``url`` (:class:`ShardUploader`):
    the small files, every shard's index and tar (multipart in ``block_size`` parts, files
    already there with the same size and sha256 skipped), ``manifest.json`` last. Returns
    ``{"url", "uploaded", "skipped", "bytes"}``."""
    return ShardUploader(local_dir, url, endpoint_url, block_size, on_file).finish()
