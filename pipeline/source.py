"""The view source: samples straight from the tars, epoch order, per-sample plans.

:class:`ShardIndex` maps every row of ``proposals.parquet`` to its bytes in the tar shards
through the DALI ``.idx`` files (memory-mapped; nothing is decoded in Python).
:class:`EpochPlan` owns the order of an epoch, the split over ranks and the remainder rule.
:class:`ViewSource` is the per-sample callable of DALI's parallel ``fn.external_source``: for a
sample position it returns the JPEG bytes, the row and the :class:`~pipeline.views.SamplePlan`
arrays (crop windows and photometric parameters of every frame) that the DALI graph consumes.

Remainder rule: with ``N`` samples and a global batch ``G = world_size * batch_size``, an
epoch has ``L = N // G`` batches on every rank. Epoch ``e`` orders its samples as: the
``R = N - L * G`` samples deferred by epoch ``e - 1`` first, then the other samples in the
seeded permutation of epoch ``e``; the first ``L * G`` are used, the last ``R`` are deferred to
the start of epoch ``e + 1``. So no sample is dropped or repeated inside an epoch, every epoch
has the same number of batches, and a sample waits at most one epoch. Global batch ``t`` is
``order[t*G : (t+1)*G]``, rank ``k`` takes its ``k``-th slice of ``batch_size``: ranks are
disjoint and together cover the epoch's ``L * G`` samples.

Randomness is a pure function of the position: the sample's generator is seeded by
``(seed, epoch, row)`` and a batch's (the MOS stitching layout) by ``(seed, epoch, batch)``, so
any batch can be reproduced from ``(epoch, batch)`` alone, whatever the number of workers.

Trust: :func:`check_shards` compares every shard with the manifest before training (size
always, sha256 unless told not to, with a cache of the digests of unchanged files);
:class:`ShardIndex` refuses a missing or truncated tar or index, and :meth:`ShardIndex.read_boxes`
refuses boxes outside the image. Every such error is a :class:`ShardError` naming the file
(and the sample key).

Shard folders at a URL (``s3://bucket/prefix``, ``gs://...``, ``https://...``) are read through
a local :class:`shards.remote.ShardCache`: the manifest, ``proposals.parquet`` and every DALI
index are fetched when :class:`ShardIndex` opens the folder; a tar is fetched (and checked
against the manifest's sha256) when a sample of it is first read. :class:`ViewSource` tells the
index which shards the rank's next batches read, so that a background
:class:`shards.remote.Prefetcher` downloads them ahead of the reader and the cache keeps them
pinned while they are read. The epoch plan, the split over ranks and every sample are the same as
from the same shards on local disk.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from shards.atomic import atomic_write_json
from shards.location import ShardLocation, locate
from shards.remote import Prefetcher, RemoteShardError, ShardCache, default_prefetch
from shards.verify import load_manifest
from shards.writer import read_index, sha256_file

if TYPE_CHECKING:
    from .views import SamplePlan, ViewSet

__all__ = [
    "SmallDataError",
    "EpochPlan",
    "ShardError",
    "ShardIndex",
    "ViewSource",
    "batch_rng",
    "check_shards",
    "sample_rng",
]

_TAR_BLOCK = 512  # a tar member's header block precedes its data
# Shards read from a URL: the batches after the current one whose shards stay pinned in the
# cache (the pipeline's prefetched batches), and how far ahead the prefetcher looks.
PIN_BATCHES = 2
LOOKAHEAD_BATCHES = 64


class SmallDataError(ValueError):
    """The shards hold fewer samples than one global batch (no full batch to train on)."""

    def __init__(self, samples: int, global_batch: int, batch_size: int, world_size: int):
        self.samples, self.global_batch = samples, global_batch
        super().__init__(
            f"{samples} samples do not fill one global batch of {global_batch} "
            f"(batch_size {batch_size} x world_size {world_size})"
        )


class ShardError(ValueError):
    """A shard file is missing, truncated or differs from the manifest, or a sample in it is
    unusable; the message names the file (and the sample key)."""


# Stream tags of the seeded generators (distinct so that no two streams coincide).
_SHUFFLE, _SAMPLE, _BATCH = 0x5EED0, 0x5EED1, 0x5EED2


def sample_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    """The generator of one sample's random decisions in one epoch."""
    return np.random.default_rng([_SAMPLE, seed, epoch, row])


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's shared decisions (MOS layouts), the same on every rank."""
    return np.random.default_rng([_BATCH, seed, epoch, batch])


def _parse_index(path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """A DALI ``v1.2`` webdataset index (:func:`shards.writer.read_index`) -> per sample
    ``{ext: (offset, size, member name)}``; every error is a :class:`ShardError`."""
    try:
        return read_index(path, names=True)
    except FileNotFoundError:
        raise ShardError(f"{path}: DALI index missing; rebuild the shards") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable DALI index ({e})") from None
    except ValueError as e:
        raise ShardError(str(e)) from None


def check_shards(
    shards_dir: str | Path,
    sha256: bool = True,
    cache: str | Path | None = None,
    write_cache: bool = True,
) -> dict:
    """Check every shard of ``shards_dir`` against its ``manifest.json`` before training.

    Always: the tar and its DALI index exist and the tar has the manifest's size (a truncated
    or replaced file). With ``sha256``: the tar's SHA-256 equals the manifest's (a flipped
    byte). ``cache``: a JSON file (the run directory's ``shards-checked.json``) of the digests
    already verified, keyed by the tar's resolved path with its size, mtime, ctime and inode; a
    tar whose four values are unchanged is not hashed again (``write_cache``: record the
    digests computed now). Raises :class:`ShardError` naming the first bad file; returns
    ``{"shards", "hashed", "cached", "bytes_hashed"}``.
    """
    location = locate(shards_dir)
    if location.is_remote:
        return _check_remote(location.cache, sha256, cache, write_cache)
    manifest = load_manifest(location.path)
    return _check_local(location.path, manifest, manifest["shards"], sha256, cache, write_cache)


def _check_local(
    root: Path,
    manifest: dict,
    shards: list[dict],
    sha256: bool,
    cache: str | Path | None,
    write_cache: bool,
    where: str | Path | None = None,
) -> dict:
    """:func:`check_shards` of ``shards`` (entries of the manifest) in the folder ``root``."""
    known: dict = {}
    cache = Path(cache) if cache is not None else None
    if sha256 and cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text()).get("files", {})
        except (ValueError, AttributeError, OSError):
            known = {}  # an unreadable cache only costs the hashing
    stats = {"shards": len(manifest["shards"]), "hashed": 0, "cached": 0, "bytes_hashed": 0}
    fresh: dict = {}
    where = where or root / "manifest.json"
    for s in shards:
        tar, idx = root / s["name"], root / s["index"]
        if not tar.is_file():
            raise ShardError(f"{tar}: shard missing (listed in {where})")
        if not idx.is_file():
            raise ShardError(f"{idx}: DALI index of {tar.name} missing; rebuild the shards")
        st = tar.stat()
        if st.st_size != s["bytes"]:
            raise ShardError(
                f"{tar}: {st.st_size} bytes, {where} says {s['bytes']} (truncated or replaced); "
                "rebuild the shards or check them with ssl-cli shards verify"
            )
        if not sha256:
            continue
        stamp = {
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino,
            "sha256": s["sha256"],
        }
        key = str(tar.resolve())
        if known.get(key) == stamp:
            stats["cached"] += 1
            fresh[key] = stamp
            continue
        digest = sha256_file(tar)
        stats["hashed"] += 1
        stats["bytes_hashed"] += st.st_size
        if digest != s["sha256"]:
            raise ShardError(
                f"{tar}: sha256 {digest[:16]}... differs from {where} ({s['sha256'][:16]}...): "
                "the file changed since the build; rebuild the shards (ssl-cli shards verify "
                "names every mismatch), or train anyway with --no-verify-shards"
            )
        fresh[key] = stamp
    if sha256 and cache is not None and write_cache and stats["hashed"]:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"files": {**known, **fresh}})
    return stats


def _check_remote(
    store: ShardCache, sha256: bool, cache: str | Path | None, write_cache: bool
) -> dict:
    """:func:`check_shards` of a folder at a URL: every tar and index listed by the manifest
    is at the URL, each tar with the manifest's size (one listing of the folder). A tar's
    sha256 is checked when it is downloaded into the shard cache; with ``sha256`` the tars
    already in the cache are checked again like local ones (a file changed in the cache).
    ``stats["remote"]``: tars not in the cache yet."""

    try:
        manifest = store.read_manifest()
        names = [n for s in manifest["shards"] for n in (s["name"], s["index"])]
        sizes = store.sizes(names)
    except RemoteShardError as e:
        raise ShardError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - storage libraries raise their own types
        raise ShardError(f"{store.url}: cannot be listed ({e})") from None
    where = store.remote("manifest.json")
    cached = []
    for s in manifest["shards"]:
        tar, idx = store.remote(s["name"]), store.remote(s["index"])
        if s["name"] not in sizes:
            raise ShardError(f"{tar}: shard missing (listed in {where})")
        if s["index"] not in sizes:
            raise ShardError(f"{idx}: DALI index of {s['name']} missing; upload the shards again")
        if sizes[s["name"]] != s["bytes"]:
            raise ShardError(
                f"{tar}: {sizes[s['name']]} bytes, {where} says {s['bytes']} (truncated or "
                "replaced); upload the shards again or check them with ssl-cli shards verify"
            )
        if store.path(s["name"]).is_file():
            cached.append(s)
    # a cache copy that fails its check is the cache's fault, not the store's: it is dropped
    # and downloaded again (and checked against the manifest) when the loader needs it
    stats = {"shards": len(manifest["shards"]), "hashed": 0, "cached": 0, "bytes_hashed": 0}
    dropped = []
    for s in cached:
        try:
            one = _check_local(store.root, manifest, [s], sha256, cache, write_cache, where)
        except ShardError:
            store.drop(s["name"])
            dropped.append(s["name"])
            continue
        for k in ("hashed", "cached", "bytes_hashed"):
            stats[k] += one[k]
    stats["remote"] = len(manifest["shards"]) - len(cached) + len(dropped)
    stats["dropped_cache_copies"] = dropped
    return stats


class ShardIndex:
    """Row ``i`` of ``proposals.parquet`` -> its ``KEY.jpg`` and ``KEY.boxes`` in the tars.

    Attributes (numpy, one entry per row): ``width``, ``height`` (decoded image, EXIF applied),
    ``shard`` (position in :attr:`tars`), ``jpg`` and ``boxes`` ``[N, 2]`` int64
    ``(offset, size)``. The tars are memory-mapped lazily in each process that reads.
    """

    def __init__(self, shards_dir: str | Path | ShardLocation | ShardCache):
        self.location = locate(shards_dir)
        self.url: str | None = self.location.url  # set when it is read through a shard cache
        self._cache: ShardCache | None = None
        self._prefetcher = None
        if self.location.is_remote:
            self._cache = self.location.cache
            try:
                manifest = self._cache.open()
            except RemoteShardError as e:
                raise ShardError(str(e)) from None
            self.root = self._cache.root
        else:
            self.root = self.location.path
            manifest = load_manifest(self.root)
        self.names = [s["name"] for s in manifest["shards"]]
        table = pq.read_table(
            self.root / manifest["files"]["proposals"], columns=["key", "shard", "width", "height"]
        )
        keys = table.column("key").to_pylist()
        self.tars = [self.root / s["name"] for s in manifest["shards"]]
        where = self._index_entries(manifest)
        n = len(keys)
        if len(where) != n:
            raise ValueError(
                f"{self.root}: {len(where)} samples in the indexes but {n} rows in the Parquet"
            )
        self.shard = np.empty(n, dtype=np.int32)
        self.jpg = np.zeros((n, 2), dtype=np.int64)
        self.boxes = np.zeros((n, 2), dtype=np.int64)
        for row, key in enumerate(keys):
            try:
                sid, entry = where[key]
            except KeyError:
                raise ValueError(f"{self.root}: Parquet row {key!r} is in no index") from None
            self.shard[row] = sid
            self.jpg[row] = entry["jpg"][:2]
            if "boxes" in entry:
                self.boxes[row] = entry["boxes"][:2]
        self.width = table.column("width").to_numpy().astype(np.int32)
        self.height = table.column("height").to_numpy().astype(np.int32)
        self.keys = keys
        self._maps: dict[int, mmap.mmap] = {}

    def _index_entries(self, manifest: dict) -> dict[str, tuple[int, dict]]:
        """Sample key -> (shard number, its DALI index entry), every entry checked to lie
        inside its tar (a local tar's size on disk; a URL's from the manifest, checked when
        the tar is downloaded)."""
        where: dict[str, tuple[int, dict]] = {}
        for sid, s in enumerate(manifest["shards"]):
            tar, idx = self.tars[sid], self.root / s["index"]
            if self._cache is not None:
                tar = self.where(sid)
                tar_bytes = s["bytes"]
            else:
                try:
                    tar_bytes = tar.stat().st_size
                except FileNotFoundError:
                    raise ShardError(f"{tar}: shard missing (listed in the manifest)") from None
            for entry in _parse_index(idx):
                if "jpg" not in entry:
                    raise ShardError(f"{idx}: a sample without .jpg: {entry}")
                for off, size, name in entry.values():
                    if off < _TAR_BLOCK or size < 0 or off + size > tar_bytes:
                        raise ShardError(
                            f"{tar}: {name} at bytes {off}..{off + size} of a {tar_bytes}-byte "
                            f"file ({idx.name}): the tar is truncated or the index is not its own"
                        )
                key = entry["jpg"][2].rsplit("/", 1)[-1].split(".", 1)[0]
                where[key] = (sid, entry)
        return where

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # every process maps the tars itself
        state["keys"] = None  # not needed by the view source's workers (millions of strings)
        state["_prefetcher"] = None  # and prefetches for itself
        return state

    @property
    def remote(self) -> bool:
        """Whether the shards are read through a shard cache (a folder at a URL)."""
        return self._cache is not None

    def where(self, sid: int) -> str | Path:
        """What errors name for shard ``sid``: its URL, or its local path."""
        return self._cache.remote(self.names[sid]) if self._cache is not None else self.tars[sid]

    def _fetcher(self):
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._cache, self.names, ahead=default_prefetch())
        return self._prefetcher

    def tar_path(self, sid: int) -> Path:
        """The local path of shard ``sid``: for a folder at a URL, downloaded into the shard
        cache first when it is not there (pinned while the reader's plan needs it)."""
        if self._cache is None:
            return self.tars[sid]
        try:
            return self._fetcher().get(sid)
        except RemoteShardError as e:
            raise ShardError(str(e)) from None

    def advise(self, upcoming: np.ndarray | list[int], current: np.ndarray | list[int]) -> None:
        """The reader reads shards ``current`` now, then ``upcoming`` in this order: prefetch
        the next of them and keep them pinned in the shard cache; a no-op for a local folder.
        Shards in neither stop being mapped by this process (the cache may evict them)."""
        if self._cache is None:
            return
        current = [int(i) for i in current]
        upcoming = [int(i) for i in upcoming]
        fetcher = self._fetcher()
        fetcher.plan(upcoming, current)
        keep = set(current) | set(upcoming[: fetcher.ahead])
        for sid in [sid for sid in self._maps if sid not in keep]:
            del self._maps[sid]  # unmapped with the last view of it; never closed under a view

    def _map(self, sid: int) -> mmap.mmap:
        m = self._maps.get(sid)
        if m is None:
            with open(self.tar_path(sid), "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[sid] = m
        return m

    def _bytes(self, row: int, where: np.ndarray, dtype: str) -> np.ndarray:
        off, size = (int(v) for v in where[row])
        m = self._map(int(self.shard[row]))
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(m, dtype=dtype, count=size // itemsize, offset=off)

    def read_jpeg(self, row: int) -> np.ndarray:
        """``KEY.jpg`` of ``row``: uint8 ``[n]``, a read-only view of the mapped tar."""
        return self._bytes(row, self.jpg, "u1")

    def read_boxes(self, row: int) -> np.ndarray:
        """``KEY.boxes`` of ``row``: int32 ``[N, 4]`` xyxy proposals in rank order, checked
        against the image: ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height`` (a
        :class:`ShardError` naming the key and the shard otherwise)."""
        size = int(self.boxes[row, 1])
        if size % 16:
            raise self.sample_error(row, f".boxes is {size} bytes, not int32 [N, 4]")
        boxes = self._bytes(row, self.boxes, "<i4").reshape(-1, 4)
        if len(boxes):
            w, h = int(self.width[row]), int(self.height[row])
            x0, y0, x1, y1 = boxes.T
            bad = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h) | (x1 <= x0) | (y1 <= y0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise self.sample_error(
                    row,
                    f"{int(bad.sum())} of {len(boxes)} boxes outside the {w}x{h} image "
                    f"(box {i}: {boxes[i].tolist()}, xyxy, right/bottom exclusive)",
                )
        return boxes

    def key(self, row: int) -> str:
        """The sample key of ``row``: from the Parquet in the main process, from the tar
        member's header in the view source's workers (which do not carry the keys)."""
        if self.keys is not None:
            return self.keys[row]
        off = int(self.jpg[row, 0])
        try:
            header = bytes(self._map(int(self.shard[row]))[off - _TAR_BLOCK : off])
            name = header[:100].split(b"\0", 1)[0].decode()
        except (OSError, ValueError):
            name = ""
        return name.rsplit("/", 1)[-1].split(".", 1)[0] or f"row {row}"

    def sample_error(self, row: int, what: str) -> ShardError:
        """``ShardError("TAR: sample 'KEY': what")``."""
        return ShardError(f"{self.where(int(self.shard[row]))}: sample {self.key(row)!r}: {what}")

    def close(self) -> None:
        """Unmap the tars (a map still viewed by an array is released with the last view);
        stop prefetching and unpin the cached shards."""
        fetcher, self._prefetcher = self._prefetcher, None
        if fetcher is not None:
            fetcher.close()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self._maps.clear()


class EpochPlan:
    """Order of every epoch, its split over ranks and the remainder rule (module docstring)."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, seed: int):
        if batch_size < 1 or world_size < 1:
            raise ValueError(
                f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.batches = num_samples // self.global_batch
        self.remainder = num_samples - self.batches * self.global_batch
        if self.batches == 0:
            raise SmallDataError(num_samples, self.global_batch, batch_size, world_size)
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([_SHUFFLE, self.seed, epoch]).permutation(self.num_samples)

    def order(self, epoch: int) -> np.ndarray:
        """Rows of epoch ``epoch`` in order: the first ``batches * global_batch`` are used, the
        last ``remainder`` are deferred to the next epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.remainder == 0:
            return self.permutation(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        start, order = 0, self.permutation(0)
        if self._cache is not None and self._cache[0] < epoch:
            start, order = self._cache
        for e in range(start + 1, epoch + 1):
            deferred = order[self.num_samples - self.remainder :]
            perm = self.permutation(e)
            order = np.concatenate([deferred, perm[~np.isin(perm, deferred)]])
        self._cache = (epoch, order)
        return order

    def rows(self, epoch: int, batch: int, rank: int) -> np.ndarray:
        """Rows of ``rank``'s batch ``batch`` in epoch ``epoch``."""
        if not 0 <= batch < self.batches:
            raise IndexError(f"batch {batch} out of range [0, {self.batches})")
        start = batch * self.global_batch + rank * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]


@dataclass
class ViewSource:
    """Per-sample callable for ``fn.external_source(parallel=True, batch=False)``.

    DALI's epoch ``k`` of this source is epoch ``start_epoch + k`` of the loader; its first
    epoch starts at batch ``start_batch`` (a resumed position). Returns, in order: the JPEG
    bytes, the row ``[1]`` int64, then per bank of the view set the inputs its chain uses
    (:attr:`~pipeline.views.Bank.fields`): windows ``[F, 4]`` float32, colour ``[F, 4]``
    float32, sigma ``[F]`` float32 and window ``[F]`` int32, solarize ``[F, 1, 1, 1]`` uint8;
    then the view set's extras (sorted by name).
    """

    index: ShardIndex
    views: ViewSet
    plan: EpochPlan
    rank: int
    start_epoch: int
    start_batch: int

    def __post_init__(self) -> None:
        self.banks = self.views.banks()
        self._batch_plans: dict[tuple[int, int], Any] = {}
        self._advised: tuple[int, int] | None = None
        self._shard_seq: tuple[int, np.ndarray] | None = None

    def shard_sequence(self, epoch: int) -> np.ndarray:
        """The shard of every sample this rank reads in ``epoch``, in reading order."""
        if self._shard_seq is None or self._shard_seq[0] != epoch:
            p = self.plan
            used = p.order(epoch)[: p.batches * p.global_batch]
            rows = used.reshape(p.batches, p.world_size, p.batch_size)[:, self.rank]
            self._shard_seq = (epoch, self.index.shard[rows.reshape(-1)])
        return self._shard_seq[1]

    def advise(self, epoch: int, batch: int) -> None:
        """Tell a remote index the shards of batch ``batch`` and the next ``PIN_BATCHES``
        (read now) and those of the following batches of the epoch in order of first need
        (prefetched). Once per batch and process."""
        if not self.index.remote or self._advised == (epoch, batch):
            return
        self._advised = (epoch, batch)
        seq = self.shard_sequence(epoch)
        b = self.plan.batch_size
        split = (batch + 1 + PIN_BATCHES) * b
        current = np.unique(seq[batch * b : split])
        ahead = seq[split : split + LOOKAHEAD_BATCHES * b]
        _, first = np.unique(ahead, return_index=True)
        upcoming = ahead[np.sort(first)]
        self.index.advise(upcoming[~np.isin(upcoming, current)], current)

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        """DALI's ``(epoch_idx, iteration)`` -> the loader's ``(epoch, batch)``."""
        batch = iteration + (self.start_batch if epoch_idx == 0 else 0)
        return self.start_epoch + epoch_idx, batch

    def batch_plan(self, epoch: int, batch: int) -> Any:
        key = (epoch, batch)
        if key not in self._batch_plans:
            if len(self._batch_plans) > 8:
                self._batch_plans.clear()
            self._batch_plans[key] = self.views.plan_batch(batch_rng(self.plan.seed, epoch, batch))
        return self._batch_plans[key]

    def sample(self, epoch: int, batch: int, idx_in_batch: int) -> tuple[int, SamplePlan]:
        """Row and :class:`~pipeline.views.SamplePlan` of one sample position."""
        row = int(self.plan.rows(epoch, batch, self.rank)[idx_in_batch])
        boxes = self.index.read_boxes(row) if self.views.needs_boxes else None
        rng = sample_rng(self.plan.seed, epoch, row)
        plan = self.views.plan_sample(
            int(self.index.width[row]),
            int(self.index.height[row]),
            boxes,
            rng,
            self.batch_plan(epoch, batch),
        )
        return row, plan

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch, batch = self.position(info.epoch_idx, info.iteration)
        if batch >= self.plan.batches:
            raise StopIteration
        self.advise(epoch, batch)
        row, plan = self.sample(epoch, batch, info.idx_in_batch)
        out: list[np.ndarray] = [self.index.read_jpeg(row), np.array([row], dtype=np.int64)]
        for bank in self.banks:
            p = plan.photometric[bank.name]
            for name in bank.fields:
                if name == "windows":
                    out.append(plan.windows[bank.name])
                elif name == "solarize":
                    out.append(p.solarize.reshape(-1, 1, 1, 1))
                else:
                    out.append(getattr(p, name))
        out += [plan.extras[name] for name in sorted(plan.extras)]
        return tuple(out)

    def extras(self) -> list[str]:
        """Names of the extra outputs, in output order (from one planned sample)."""
        _, plan = self.sample(self.start_epoch, min(self.start_batch, self.plan.batches - 1), 0)
        return sorted(plan.extras)
