"""Where a shard folder lives, decided once: :class:`ShardLocation`.

A shard folder is a local directory or a URL (``s3://``, ``gs://``, ``https://``) whose files
are read through a local cache (:class:`shards.remote.ShardCache`). A command resolves what the
user gave into a location once, at its edge (:func:`locate`), and the readers below it take the
location: ``location.url`` says which of the two it is, ``location.path`` is the local folder,
``location.cache`` the cache of a URL (made on first use, then shared by every reader of the
location). Readers still accept a plain path or URL and locate it themselves; locating a
location returns it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from .manifest import read_manifest_file
from .remote import ShardCache, cache_for, check_url, is_url, redact_url

__all__ = ["ShardLocation", "locate"]


class ShardLocation:
    """A local shard folder (``path``) or a shard folder at a URL (``url``), never both.

    ``str(location)`` is the path or the URL as a command line would give it; ``display`` is
    the form fit for a log (a URL's query string and user redacted)."""

    __slots__ = ("url", "path", "_cache")

    def __init__(
        self,
        *,
        path: str | os.PathLike | None = None,
        url: str | None = None,
        cache: ShardCache | None = None,
    ):
        if (path is None) == (url is None):
            raise ValueError("a shard location is a local path or a URL, exactly one of them")
        self.url: str | None = check_url(url) if url is not None else None
        self.path: Path | None = Path(path) if path is not None else None
        self._cache = cache

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def cache(self) -> ShardCache:
        """The shard cache of a URL (``SSL_CLI_SHARD_CACHE`` and the configured endpoint), made
        once per location; a local folder has none."""
        if self.url is None:
            raise ValueError(f"{self.path}: a local shard folder is read in place, not cached")
        if self._cache is None:
            self._cache = cache_for(self.url)
        return self._cache

    @property
    def name(self) -> str:
        """The folder's last component (``scenes_val`` of ``s3://bucket/data/scenes_val``)."""
        if self.url is not None:
            return self.url.rstrip("/").rsplit("/", 1)[-1]
        return self.path.name or str(self.path)

    @property
    def display(self) -> str:
        return redact_url(self.url) if self.url is not None else str(self.path)

    def missing_folder(self) -> bool:
        """Whether a local folder does not exist (as a directory); a URL is checked when its
        manifest is read, never here."""
        return self.url is None and not self.path.is_dir()

    def read_manifest(self) -> dict:
        """The checked ``manifest.json`` (a URL's through its cache, fetched when it changed)."""
        if self.url is not None:
            return self.cache.read_manifest()
        return read_manifest_file(self.path)

    def same_folder(self, other: ShardLocation) -> bool:
        """Whether both name one folder: equal URLs, or local paths that resolve alike."""
        if self.url is not None or other.url is not None:
            return self.url == other.url
        return self.path.resolve() == other.path.resolve()

    def __str__(self) -> str:
        return self.url if self.url is not None else str(self.path)

    def __repr__(self) -> str:
        return f"ShardLocation({self.display!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardLocation):
            return NotImplemented
        return (self.url, self.path) == (other.url, other.path)

    def __hash__(self) -> int:
        return hash((self.url, self.path))


def locate(where: str | os.PathLike | ShardLocation | ShardCache) -> ShardLocation:
    """``where`` as a :class:`ShardLocation`: a location as it is, a shard cache as the
    location of its URL read through that very cache, a URL of a supported scheme (checked:
    no credentials in it, a bucket or host) or else a local path.

    Raises :class:`~shards.remote.RemoteShardError` for a URL that :func:`check_url` refuses."""
    if isinstance(where, ShardLocation):
        return where
    if isinstance(where, ShardCache):
        return ShardLocation(url=where.url, cache=where)
    if isinstance(where, str) and is_url(where):
        return ShardLocation(url=where)
    if not isinstance(where, (str, os.PathLike)):
        raise TypeError(f"a shard folder is a path or a URL, not {type(where).__name__}")
    return ShardLocation(path=where)
