"""Enumerate the inputs of a build: a folder, COCO, ImageNet, WebDataset tars, CIFAR, IDX, ``@sample``.

Every source becomes an ordered list of :class:`SourceItem` with a unique sample key (no dots,
no slashes: DALI splits the extension at the first dot), so shard contents depend only on the
inputs, never on the worker count or the file system's listing order. An input that is known to
be unusable while listing (a FIFO, a file name that is not UTF-8, a duplicate key, a bad label,
a truncated archive member) is still an item, carrying its reject, so that every input ends in
the shards or in ``rejects.jsonl``. Entries that are not inputs (other extensions, directory
symlinks, tar links and devices) are listed in :attr:`Source.ignored` with a reason.

Symlink policy: a symlink to a regular file is followed wherever it points (symlink farms are a
common way to assemble a data set); links that leave SRC are counted in the manifest. A symlink
to anything else (a device, a FIFO, a directory) is rejected without being opened; directory
symlinks are not descended (no loops) and are listed as ignored.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, RejectedImage

LAYOUTS = ("auto", "folder", "coco", "imagenet", "wds", "cifar", "idx")
SPLITS = ("train", "test")
SAMPLE_SOURCE = "@sample"
MAX_KEY_LENGTH = 80
INT32_MAX = 2**31 - 1

# Real photographs shipped inside scikit-image and scikit-learn (no network needed).
_SAMPLE_FILES = {
    "skimage": [
        "astronaut.png",
        "brick.png",
        "camera.png",
        "chelsea.png",
        "coffee.png",
        "coins.png",
        "grass.png",
        "gravel.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "moon.png",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "page.png",
        "retina.jpg",
        "rocket.jpg",
        "text.png",
    ],
    "sklearn": ["china.jpg", "flower.jpg"],
}


class SourceError(ValueError):
    """The source cannot be read as asked (missing directory, empty, unknown layout)."""


def printable(path: str) -> str:
    """A path as text that UTF-8 JSON and Parquet can hold (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes: the name is not UTF-8
        return False
    return True


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class SourceItem:
    key: str
    source: str  # what a person recognises: a path, or "archive.tar:member"
    path: str  # file to read
    offset: int = 0  # byte range inside ``path`` (tar members); size -1 = whole file
    size: int = -1
    label: int | None = None
    data: bytes | None = None  # the encoded image itself, for sources held in memory (CIFAR)
    stamp: str = ""  # size:mtime_ns of the file read (its container for archives, batches)
    reject: tuple[str, str] | None = None  # (reason, detail) known while listing

    def read(self, max_bytes: int = 1 << 62) -> bytes:
        """The input's bytes. Only regular files are opened for reading (a FIFO or a device is
        refused from ``fstat`` without a read), and at most ``max_bytes`` are read."""
        if self.data is not None:
            return self.data
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RejectedImage("not_a_regular_file", f"{_kind(st.st_mode)}, not read")
            size = st.st_size if self.size < 0 else self.size
            if size > max_bytes:
                raise RejectedImage("too_large", f"{size} bytes, over --max-file-bytes {max_bytes}")
            if self.size < 0:
                # at most max_bytes + 1, in pieces no larger than the file said it was (read()
                # allocates its size up front: read(2**62) fails whatever the file holds)
                data = f.read(min(max_bytes, st.st_size) + 1)
                while len(data) <= max_bytes and (
                    more := f.read(min(max_bytes + 1 - len(data), 1 << 20))
                ):
                    data += more  # the file grew since fstat
                if len(data) > max_bytes:
                    raise RejectedImage("too_large", f"over --max-file-bytes {max_bytes}")
                return data
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"archive member ends early: read {len(data)} of {self.size} bytes")
        return data


@dataclass
class Source:
    layout: str
    items: list[SourceItem]
    classes: list[str] | None = None  # label -> class name, for labelled layouts
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason): not inputs
    symlinks: int = 0  # inputs reached through a symlink to a regular file
    symlinks_outside: int = 0  # ... whose target lies outside SRC
    warnings: list[str] = field(default_factory=list)
    root: str | None = None  # the folder file inputs are named relative to (file layouts only)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(self.entry_line(it).encode("utf-8", "backslashreplace"))
        return h.hexdigest()

    @staticmethod
    def entry(it: SourceItem) -> dict:
        """What identifies one input: key, where it came from, its size and mtime, its label."""
        return {"key": it.key, "source": printable(it.source), "stamp": it.stamp, "label": it.label}

    @classmethod
    def entry_line(cls, it: SourceItem) -> str:
        return json.dumps(cls.entry(it), sort_keys=True, ensure_ascii=False) + "\n"


def _sanitize(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "img"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 9]}_{_crc(name):08x}"
    return key


def _crc(name: str) -> int:
    return zlib.crc32(name.encode("utf-8", "surrogateescape"))


def _assign_keys(names: list[tuple[str, str]]) -> list[str]:
    """Unique keys for ``names`` = (relative path without extension, extension), order kept.

    The key is the sanitised path; names that collide get the extension as a suffix
    (``photo.webp`` + ``photo.bmp`` -> ``photo_webp``, ``photo_bmp``), then a checksum of the
    whole name, then (only for identical names) a running number.
    """

    def unique(cands: list[str]) -> list[bool]:
        count: dict[str, int] = {}
        for c in cands:
            count[c] = count.get(c, 0) + 1
        return [count[c] == 1 for c in cands]

    keys = [_sanitize(stem) for stem, _ in names]
    ok = unique(keys)
    if not all(ok):
        keys = [
            k if good or not ext else _sanitize(f"{stem}_{ext}")
            for k, good, (stem, ext) in zip(keys, ok, names)
        ]
        ok = unique(keys)
    if not all(ok):
        keys = [
            k if good else f"{k[: MAX_KEY_LENGTH - 9]}_{_crc(stem + '.' + ext):08x}"
            for k, good, (stem, ext) in zip(keys, ok, names)
        ]
    seen: set[str] = set()
    out = []
    for k in keys:
        base, n = k, 1
        while k in seen:
            k = f"{base[: MAX_KEY_LENGTH - 8]}_{n}"
            n += 1
        seen.add(k)
        out.append(k)
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _split_ext(rel: str) -> tuple[str, str]:
    stem, dot, ext = rel.rpartition(".")
    return (stem, ext) if dot and "/" not in ext else (rel, "")


class _Walk:
    """Files under ``root`` in sorted order, each classified once (``lstat``, no open)."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.files: list[tuple[str, str]] = []  # (path, relative path) of every non-directory
        self.ignored: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    self.ignored.append((printable(full), "directory_symlink: not followed"))
                    dirnames.remove(d)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                self.files.append((full, os.path.relpath(full, root)))

    def images(self, layout: str) -> tuple[list[tuple[str, str]], list[str]]:
        """(path, rel) of image-named files; the others become ignored entries."""
        out = []
        for full, rel in self.files:
            if _is_image(rel):
                out.append((full, rel))
            else:
                self.ignored.append((printable(full), "other_extension: not an image input"))
        return out

    def item(self, full: str, rel: str, key: str, label: int | None, source: Source) -> SourceItem:
        """One input: a regular file (or a symlink to one); anything else carries its reject."""
        shown = printable(full)
        base = SourceItem(key=key, source=shown, path=full, label=label)
        if not _is_utf8(full):
            return _with(base, ("bad_name", f"file name is not valid UTF-8: {shown}"))
        try:
            lst = os.lstat(full)
        except OSError as e:
            return _with(base, ("unreadable", str(e)))
        if stat.S_ISLNK(lst.st_mode):
            target = os.path.realpath(full)
            try:
                st = os.stat(full)
            except OSError:
                return _with(base, ("unreadable", f"broken symlink to {printable(target)}"))
            if not stat.S_ISREG(st.st_mode):
                why = f"symlink to {_kind(st.st_mode)} {printable(target)}, not read"
                return _with(base, ("not_a_regular_file", why))
            source.symlinks += 1
            if os.path.commonpath([self.real_root, target]) != self.real_root:
                source.symlinks_outside += 1
        elif not stat.S_ISREG(lst.st_mode):
            return _with(base, ("not_a_regular_file", f"{_kind(lst.st_mode)}, not read"))
        else:
            st = lst
        return SourceItem(key=key, source=shown, path=full, label=label, stamp=_stamp(st))


def _with(item: SourceItem, reject: tuple[str, str]) -> SourceItem:
    return SourceItem(
        key=item.key,
        source=item.source,
        path=item.path,
        label=item.label,
        stamp=item.stamp,
        reject=reject,
    )


def _folder(root: Path, layout: str = "folder") -> Source:
    walk = _Walk(root)
    images = walk.images(layout)
    keys = _assign_keys([_split_ext(rel) for _, rel in images])
    source = Source(layout=layout, items=[], root=str(root))
    source.items = [walk.item(f, rel, k, None, source) for k, (f, rel) in zip(keys, images)]
    source.ignored = walk.ignored
    return source


def _imagenet(root: Path) -> Source:
    classes = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
    )
    if not classes:
        raise SourceError(f"{root}: ImageNet layout expects one sub-folder per class, found none")
    bad = [printable(c) for c in classes if not _is_utf8(c)]
    if bad:
        raise SourceError(f"{root}: class folder names must be UTF-8: {bad[:5]}")
    walk = _Walk(root)
    class_of = {c: i for i, c in enumerate(classes)}
    images = []
    for full, rel in walk.images("imagenet"):
        top = rel.split(os.sep, 1)[0]
        if top in class_of and os.sep in rel:
            images.append((full, rel, class_of[top]))
        else:
            walk.ignored.append((printable(full), "outside_class_folder: no label"))
    keys = _assign_keys([_split_ext(rel) for _, rel, _ in images])
    source = Source(layout="imagenet", items=[], classes=classes, root=str(root))
    source.items = [walk.item(f, rel, k, lab, source) for k, (f, rel, lab) in zip(keys, images)]
    source.ignored = walk.ignored
    return source


def _split_wds_name(name: str) -> tuple[str, str]:
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


_TAR_KINDS = (
    ("issym", "tar_symlink"),
    ("islnk", "tar_hardlink"),
    ("isdir", "tar_directory"),
    ("ischr", "tar_device"),
    ("isblk", "tar_device"),
    ("isfifo", "tar_fifo"),
)
_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def parse_label(raw: bytes, classes: list[str] | None) -> tuple[int | None, str | None]:
    """``.cls`` bytes -> (label, None), or (None, why it is not a valid label)."""
    try:
        text = raw.decode("ascii").strip()
        label = int(text)
    except (UnicodeDecodeError, ValueError):
        return None, f"label is not an integer: {raw[:20]!r}"
    return check_label(label, classes)


def check_label(label: int, classes: list[str] | None) -> tuple[int | None, str | None]:
    if not 0 <= label <= INT32_MAX:
        return None, f"label {label} is not an int32 >= 0"
    if classes is not None and label >= len(classes):
        return None, f"label {label} is not below the number of classes ({len(classes)})"
    return label, None


def _wds_classes(folder: Path) -> list[str] | None:
    """``classes.json`` beside the tars (an ssl-cli OUT folder): a list of class names."""
    path = folder / "classes.json"
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not readable as JSON: {e}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise SourceError(f"{path}: expected a JSON list of class names")
    return classes


# one input of a WebDataset source: (name for the key, ext, tar, member, label, reject)
_WdsEntry = tuple[str, str, Path, tarfile.TarInfo | None, int | None, tuple | None]


@dataclass
class _TarScan:
    """A tar's members grouped by sample key, in archive order (:func:`_scan_tar`)."""

    groups: dict[str, dict[str, tarfile.TarInfo]] = field(default_factory=dict)  # key -> ext -> m
    order: list[str] = field(default_factory=list)  # keys as first seen
    dups: dict[str, list[tuple[tarfile.TarInfo, tarfile.TarInfo]]] = field(default_factory=dict)
    tail: str | None = None  # why the rest of the archive cannot be read, if it cannot


def _wds(paths: list[Path], classes: list[str] | None = None) -> Source:
    """WebDataset tars as inputs: one per sample key with an image member (its ``.cls`` the
    label), phase by phase: open each tar, scan its members (:func:`_scan_tar`), turn each
    sample into an entry (:func:`_wds_sample`), then give every entry a unique key."""
    source = Source(layout="wds", items=[], classes=classes)
    stamps: dict[Path, str] = {}
    entries: list[_WdsEntry] = []
    for tar_path in paths:
        prefix = f"{tar_path.stem}/" if len(paths) > 1 else ""
        try:
            st = os.stat(tar_path)
            if not stat.S_ISREG(st.st_mode):
                source.ignored.append((printable(str(tar_path)), "not_a_regular_file"))
                continue
            tf = tarfile.open(tar_path, "r:")
        except (tarfile.TarError, OSError) as e:
            raise SourceError(
                f"{tar_path}: not a readable (uncompressed) tar archive: {e}"
            ) from None
        stamps[tar_path] = _stamp(st)
        with tf:
            scan = _scan_tar(tf, tar_path, st.st_size, source)
            for key in scan.order:
                entry = _wds_sample(
                    tf, tar_path, st.st_size, prefix + key, key, scan, classes, source, entries
                )
                if entry is not None:
                    entries.append(entry)
            if scan.tail is not None:
                name = f"{prefix}{tar_path.stem}_rest"
                entries.append((name, "", tar_path, None, None, ("corrupt", scan.tail)))
                source.warnings.append(f"{tar_path}: {scan.tail}; the members before it are kept")
    keys = _assign_keys([(n, ext) for n, ext, *_ in entries])
    for k, (_, _, p, m, label, reject) in zip(keys, entries):
        source.items.append(
            SourceItem(
                key=k,
                source=f"{printable(str(p))}:{printable(m.name) if m else '(rest of the archive)'}",
                path=str(p),
                offset=m.offset_data if m else 0,
                size=m.size if m else 0,
                label=label,
                stamp=stamps[p],
                reject=reject,
            )
        )
    return source


def _scan_tar(tf: tarfile.TarFile, tar_path: Path, size: int, source: Source) -> _TarScan:
    """Every member of ``tf`` read once, grouped by sample key; a member that is not a file is
    ignored (named in ``source.ignored``), a second member of one key and extension is kept
    in ``dups``, and where the archive stops being readable is ``tail``."""
    scan = _TarScan()
    while True:
        try:
            member = tf.next()
        except (tarfile.TarError, OSError) as e:
            if tf.offset < size:  # else: the last member is cut (rejected by _wds_sample)
                scan.tail = f"unreadable from byte {tf.offset}: {e}"
            else:
                source.warnings.append(f"{tar_path}: truncated inside its last member")
            break
        if member is None:  # tarfile also ends quietly at a cut or invalid header
            with open(tar_path, "rb") as f:
                f.seek(tf.offset)
                rest = f.read(tarfile.BLOCKSIZE)
            if rest.strip(b"\0"):
                scan.tail = f"unreadable from byte {tf.offset}: not a tar header (truncated?)"
            elif not rest:
                source.warnings.append(f"{tar_path}: no end-of-archive marker; it may be truncated")
            break
        if not member.isfile():
            kind = next((r for t, r in _TAR_KINDS if getattr(member, t)()), "tar_other")
            shown = f"{printable(str(tar_path))}:{printable(member.name)}"
            source.ignored.append((shown, f"{kind}: not read"))
            continue
        key, ext = _split_wds_name(member.name)
        comps = scan.groups.setdefault(key, {})
        if not comps:
            scan.order.append(key)
        if ext.lower() in comps:
            scan.dups.setdefault(key, []).append((comps[ext.lower()], member))
            continue
        comps[ext.lower()] = member
    return scan


def _wds_sample(
    tf: tarfile.TarFile,
    tar_path: Path,
    size: int,
    name: str,
    key: str,
    scan: _TarScan,
    classes: list[str] | None,
    source: Source,
    entries: list[_WdsEntry],
) -> _WdsEntry | None:
    """The entry of sample ``key`` (``None`` without an image member: its members are ignored),
    with its label or why it is rejected (truncated member, bad or conflicting ``.cls``). A
    duplicate image member becomes a rejected entry of its own (appended to ``entries``);
    other duplicates and unused components are named in ``source.ignored``."""

    def where(m: tarfile.TarInfo) -> str:
        return f"{printable(str(tar_path))}:{printable(m.name)}"

    def truncated(m: tarfile.TarInfo) -> bool:
        return m.offset_data + m.size > size

    comps = scan.groups[key]
    image_ext = next((e for e in _WDS_IMAGE_EXTS if e in comps), None)
    for first, second in scan.dups.get(key, []):
        ext = _split_wds_name(second.name)[1]
        if ext.lower() in _WDS_IMAGE_EXTS:
            why = f"same key and extension as {where(first)} (kept); both in one tar"
            entries.append((name, ext, tar_path, second, None, ("duplicate_key", why)))
        elif ext.lower() == "cls":
            if image_ext is not None:
                comps.setdefault("__conflict__", second)
        else:
            source.ignored.append((where(second), f"duplicate_component of {where(first)}"))
    if image_ext is None:
        for m in comps.values():
            source.ignored.append((where(m), "no_image_in_sample: not an input"))
        return None
    image = comps[image_ext]
    label, reject = None, None
    if truncated(image):
        reject = ("corrupt", "the tar ends inside this member (truncated archive)")
    elif "cls" in comps:
        cls = comps["cls"]
        if truncated(cls):
            reject = ("corrupt", f"{where(cls)}: the tar ends inside it (truncated)")
        else:
            label, why = parse_label(tf.extractfile(cls).read(), classes)
            if "__conflict__" in comps:
                other = comps["__conflict__"]
                label2, _ = parse_label(tf.extractfile(other).read(), classes)
                if label2 != label:
                    why = f"two .cls members disagree: {where(cls)}, {where(other)}"
            if why:
                reject = ("bad_label", f"{where(cls)}: {why}")
                label = None
    for ext, m in comps.items():
        if ext not in (image_ext, "cls", "__conflict__"):
            source.ignored.append((where(m), "other_component: not used"))
    return (name, "", tar_path, image, label, reject)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (numpy arrays, builtins)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _regular(path: Path, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(f"{path}: {what} not readable: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file")
    return st


def _load_cifar_pickle(path: Path) -> dict:
    _regular(path, "CIFAR batch")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SourceError(f"{path}: not a readable CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a CIFAR python batch (a {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, name: str, path: Path):
    if name not in batch:
        raise SourceError(
            f"{path}: CIFAR batch has no {name!r} entry (has {sorted(map(str, batch))})"
        )
    return batch[name]


CIFAR10_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR100_FILES = ("meta", "train", "test")


def _is_cifar(root: Path) -> bool:
    """CIFAR is recognised by its whole file set only (a file called ``meta`` is not enough)."""
    return any(
        all((root / f).is_file() for f in files) for files in (CIFAR10_FILES, CIFAR100_FILES)
    )


def _encode_jpeg(rgb, quality: int) -> bytes:

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class ArrayBatch:
    """Images stored as one array in one file (a CIFAR batch, an IDX images file), undecoded:
    what :func:`cifar_batches` and :func:`idx_batches` return. Item ``i`` is ``f"{path}[{i}]"``."""

    path: Path
    stamp: str  # size:mtime_ns of the file (IDX: of the images and the labels file)
    images: object  # numpy uint8 [N, H, W] grey (IDX) or [N, H, W, 3] RGB (CIFAR)
    labels: list  # N labels as stored, not yet checked against the classes (check_label)


def cifar_batches(root: Path, split: str) -> tuple[str, list[str], list[ArrayBatch]]:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) python batches of
    ``split`` as arrays: (``cifar10`` or ``cifar100``, class names, batches). CIFAR-100's labels
    are its fine labels."""

    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; choose one of {SPLITS}")
    if (root / "batches.meta").is_file():
        name, label_key, names_key = "cifar10", "labels", "label_names"
        meta = _load_cifar_pickle(root / "batches.meta")
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    elif (root / "meta").is_file():
        name, label_key, names_key = "cifar100", "fine_labels", "fine_label_names"
        meta = _load_cifar_pickle(root / "meta")
        files = [root / split]
    else:
        raise SourceError(
            f"{root}: not a CIFAR python folder (expected batches.meta for CIFAR-10 or meta for CIFAR-100)"
        )
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        raise SourceError(f"{root}: CIFAR {split} batches missing: {missing or 'data_batch_*'}")
    meta_path = root / ("batches.meta" if name == "cifar10" else "meta")
    classes = [
        c.decode() if isinstance(c, bytes) else str(c) for c in _field(meta, names_key, meta_path)
    ]
    batches = []
    for f in files:
        stamp = _stamp(_regular(f, "CIFAR batch"))
        batch = _load_cifar_pickle(f)
        data = np.asarray(_field(batch, "data", f), dtype=np.uint8)
        labels = list(_field(batch, label_key, f))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise SourceError(
                f"{f}: unexpected CIFAR batch shape {data.shape} / {len(labels)} labels"
            )
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> HWC
        batches.append(ArrayBatch(path=f, stamp=stamp, images=images, labels=labels))
    return name, classes, batches


def _cifar(root: Path, split: str, jpeg_quality: int) -> Source:
    """CIFAR-10 or CIFAR-100 (:func:`cifar_batches`). Images become JPEG at ``jpeg_quality``
    (32x32 RGB); a label outside the class list is a ``bad_label`` reject."""
    name, classes, batches = cifar_batches(root, split)
    items: list[SourceItem] = []
    for batch in batches:
        for i, (img, raw_label) in enumerate(zip(batch.images, batch.labels)):
            try:
                label, why = check_label(int(raw_label), classes)
            except (TypeError, ValueError):
                label, why = None, f"label is not an integer: {raw_label!r}"
            index = len(items)
            items.append(
                SourceItem(
                    key=f"{name}_{split}_{index:06d}",
                    source=f"{batch.path}[{i}]",
                    path=str(batch.path),
                    label=label,
                    data=_encode_jpeg(img, jpeg_quality) if why is None else b"",
                    stamp=batch.stamp,
                    reject=None if why is None else ("bad_label", why),
                )
            )
    return Source(layout="cifar", items=items, classes=classes)


# ------------------------------------------------------------------------------------------ IDX

_IDX_NAME = re.compile(
    r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images|labels)-idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$"
)
_IDX_SPLIT = {"train": "train", "t10k": "test", "test": "test"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _idx_sets(root: Path) -> dict[str, dict[tuple[str, str], Path]]:
    """prefix -> {(split, kind): file} for the IDX files directly in ``root``."""
    sets: dict[str, dict[tuple[str, str], Path]] = {}
    for p in sorted(root.iterdir()):
        m = _IDX_NAME.match(p.name)
        if m and p.is_file():
            want = "3" if m["kind"] == "images" else "1"
            if m["ndim"] == want:
                sets.setdefault(m["prefix"], {})[(_IDX_SPLIT[m["split"]], m["kind"])] = p
    return sets


def _is_idx(root: Path) -> bool:
    """An IDX folder is recognised by a full file set: images and labels of train and test."""
    full = {(s, k) for s in SPLITS for k in ("images", "labels")}
    return any(full <= set(files) for files in _idx_sets(root).values())


def read_idx(path: Path, max_bytes: int = 1 << 32):
    """An IDX file (gzipped or not) -> numpy array (``uint8`` data only: the MNIST family)."""

    st = _regular(path, "IDX file")
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{path}: not a readable IDX file: {e}") from None
    if len(data) > max_bytes:
        raise SourceError(f"{path}: over {max_bytes} bytes ({st.st_size} on disk)")
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise SourceError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    dtype, ndim = data[2], data[3]
    if dtype != 0x08:
        raise SourceError(f"{path}: IDX element type 0x{dtype:02x}; only unsigned bytes (0x08)")
    if len(data) < 4 + 4 * ndim:
        raise SourceError(f"{path}: IDX header ends early")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(dims, dtype=np.int64)) if dims else 0
    if len(body) != expected:
        raise SourceError(
            f"{path}: IDX dimensions {dims} need {expected} bytes, the file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def idx_batches(root: Path, split: str) -> tuple[str, list[str], list[ArrayBatch]]:
    """MNIST, Fashion-MNIST, KMNIST, EMNIST: ``[PREFIX]{train,t10k|test}-{images-idx3,labels-idx1}
    -ubyte[.gz]`` of ``split`` as arrays: (the file prefix, class names, one batch of grey
    ``[N, H, W]`` images). EMNIST (a prefix naming it) stores images transposed: they are
    turned upright."""
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; choose one of {SPLITS}")
    sets = {p: f for p, f in _idx_sets(root).items() if (split, "images") in f}
    if not sets:
        raise SourceError(
            f"{root}: no IDX {split} images (expected e.g. "
            f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz])"
        )
    if len(sets) > 1:
        raise SourceError(
            f"{root}: several IDX sets ({', '.join(repr(p) for p in sets)}); "
            "put each in its own folder"
        )
    prefix, files = next(iter(sets.items()))
    images_path = files[(split, "images")]
    labels_path = files.get((split, "labels"))
    if labels_path is None:
        raise SourceError(f"{root}: {images_path.name} has no labels file beside it")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SourceError(
            f"{images_path}, {labels_path}: shapes {images.shape} and {labels.shape} do not "
            "make N images with N labels"
        )
    if "emnist" in prefix.lower():
        images = images.transpose(0, 2, 1)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    fashion = "fashion" in (prefix + root.name).lower() and n_classes <= 10
    classes = FASHION_MNIST_CLASSES if fashion else [str(i) for i in range(n_classes)]
    stamp = f"{_stamp(os.stat(images_path))}+{_stamp(os.stat(labels_path))}"
    batch = ArrayBatch(path=images_path, stamp=stamp, images=images, labels=labels.tolist())
    return prefix, classes, [batch]


def _idx(root: Path, split: str, jpeg_quality: int) -> Source:
    """The IDX family (:func:`idx_batches`). Greyscale images become RGB JPEG at
    ``jpeg_quality``; labels are kept."""

    prefix, classes, (batch,) = idx_batches(root, split)
    key_prefix = f"{_sanitize(prefix.strip('-_. '))}_" if prefix.strip("-_. ") else ""
    items = []
    for i, (img, label) in enumerate(zip(batch.images, batch.labels)):
        rgb = np.repeat(img[:, :, None], 3, axis=2)
        items.append(
            SourceItem(
                key=f"{key_prefix}{split}_{i:06d}",
                source=f"{batch.path}[{i}]",
                path=str(batch.path),
                label=int(label),
                data=_encode_jpeg(rgb, jpeg_quality),
                stamp=batch.stamp,
            )
        )
    return Source(layout="idx", items=items, classes=classes)


def sample_files() -> list[tuple[str, Path]]:
    """(key, path) of the photographs shipped with scikit-image / scikit-learn."""
    out = []
    try:
        import skimage.data
        import sklearn.datasets
    except ImportError as e:
        raise SourceError(
            f"the @sample data set reads photographs shipped with scikit-image and scikit-learn: {e}; "
            "install them (pip install scikit-image scikit-learn)"
        ) from None
    roots = {
        "skimage": Path(skimage.data.__file__).parent,
        "sklearn": Path(sklearn.datasets.__file__).parent / "images",
    }
    for pkg, names in _SAMPLE_FILES.items():
        for name in names:
            path = roots[pkg] / name
            if not path.is_file():
                raise SourceError(f"@sample: {path} is missing from the installed {pkg} package")
            out.append((f"{pkg}_{Path(name).stem}", path))
    return out


def open_source(
    src: str, layout: str = "auto", split: str = "train", jpeg_quality: int = 95
) -> Source:
    """Enumerate ``src`` with ``layout`` (``auto`` detects tars, CIFAR, IDX and COCO; ImageNet is
    explicit). ``split`` and ``jpeg_quality`` apply to CIFAR and IDX only."""
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if src == SAMPLE_SOURCE:
        files = sample_files()
        items = [
            SourceItem(key=k, source=str(p), path=str(p), stamp=_stamp(os.stat(p)))
            for k, p in files
        ]
        return Source(layout="sample", items=items)
    root = Path(src)
    if not root.exists():
        raise SourceError(f"source {src!r} does not exist")
    if not root.is_dir():
        if not (layout in ("auto", "wds") and root.name.endswith(".tar") and root.is_file()):
            raise SourceError(f"source {src!r} is a file; expected a folder or a .tar archive")
        return _wds([root])
    if layout in ("auto", "wds"):
        tars = sorted(p for p in root.iterdir() if p.name.endswith(".tar") and not p.is_dir())
        if tars and (layout == "wds" or not any(_is_image(rel) for _, rel in _Walk(root).files)):
            return _wds(tars, _wds_classes(root))
        if layout == "wds":
            raise SourceError(f"{src}: no .tar archives found")
    if layout == "imagenet":
        return _imagenet(root)
    if layout == "cifar" or (layout == "auto" and _is_cifar(root)):
        return _cifar(root, split, jpeg_quality)
    if layout == "idx" or (layout == "auto" and _is_idx(root)):
        return _idx(root, split, jpeg_quality)
    if layout in ("auto", "coco") and (root / "train2017").is_dir():
        return _folder(root / "train2017", layout="coco")
    if layout == "coco" and root.name != "train2017":
        raise SourceError(
            f"{src}: COCO layout expects a train2017/ folder inside it (or given directly)"
        )
    return _folder(root, layout="coco" if layout == "coco" else "folder")
