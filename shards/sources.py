"""Enumerate the inputs of a build: a folder, COCO, ImageNet, WebDataset tars, or ``@sample``.

Every source becomes an ordered list of :class:`SourceItem` with a unique sample key (no dots,
no slashes: DALI splits the extension at the first dot), so shard contents depend only on the
inputs, never on the worker count or the file system's listing order.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS

LAYOUTS = ("auto", "folder", "coco", "imagenet", "wds", "cifar")
SPLITS = ("train", "test")
SAMPLE_SOURCE = "@sample"
MAX_KEY_LENGTH = 80

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


@dataclass(frozen=True)
class SourceItem:
    key: str
    source: str  # what a person recognises: a path, or "archive.tar:member"
    path: str  # file to read
    offset: int = 0  # byte range inside ``path`` (tar members); size -1 = whole file
    size: int = -1
    label: int | None = None
    data: bytes | None = None  # the encoded image itself, for sources held in memory (CIFAR)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
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
    ignored: int = 0  # files that are not image inputs (other extensions, tar members)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.key}\t{it.source}\t{it.label}\n".encode())
        return h.hexdigest()


def _sanitize(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "img"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 9]}_{zlib.crc32(name.encode()):08x}"
    return key


def _assign_keys(names: list[str]) -> list[str]:
    """Sanitised, unique keys for ``names`` (relative paths without extension), order kept."""
    keys = [_sanitize(n) for n in names]
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    out = []
    for name, k in zip(names, keys):
        if seen[k] > 1:  # a collision after sanitising: disambiguate by the full name
            k = f"{k[: MAX_KEY_LENGTH - 9]}_{zlib.crc32(name.encode()):08x}"
        out.append(k)
    if len(set(out)) != len(out):
        raise SourceError("could not derive unique sample keys from the input names")
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    return files


def _folder(root: Path, layout: str = "folder") -> Source:
    files = _walk_files(root)
    images = [f for f in files if _is_image(f.name)]
    rel = [str(f.relative_to(root).with_suffix("")) for f in images]
    keys = _assign_keys(rel)
    items = [SourceItem(key=k, source=str(f), path=str(f)) for k, f in zip(keys, images)]
    return Source(layout=layout, items=items, ignored=len(files) - len(images))


def _imagenet(root: Path) -> Source:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: ImageNet layout expects one sub-folder per class, found none")
    items: list[SourceItem] = []
    names: list[str] = []
    files_total = 0
    images: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        files = _walk_files(root / cls)
        files_total += len(files)
        for f in files:
            if _is_image(f.name):
                images.append((f, label))
                names.append(str(f.relative_to(root).with_suffix("")))
    keys = _assign_keys(names)
    items = [
        SourceItem(key=k, source=str(f), path=str(f), label=lab)
        for k, (f, lab) in zip(keys, images)
    ]
    return Source(layout="imagenet", items=items, classes=classes, ignored=files_total - len(items))


def _split_wds_name(name: str) -> tuple[str, str]:
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _wds(paths: list[Path]) -> Source:
    entries: list[tuple[str, Path, tarfile.TarInfo, int | None]] = []
    ignored = 0
    for tar_path in paths:
        try:
            tf = tarfile.open(tar_path, "r:")
        except (tarfile.TarError, OSError) as e:
            raise SourceError(
                f"{tar_path}: not a readable (uncompressed) tar archive: {e}"
            ) from None
        with tf:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_wds_name(member.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = member
            for key in order:
                comps = groups[key]
                image = next(
                    (comps[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in comps), None
                )
                if image is None:
                    ignored += len(comps)
                    continue
                label = None
                if "cls" in comps:
                    raw = tf.extractfile(comps["cls"]).read()
                    try:
                        label = int(raw.decode("ascii").strip())
                    except ValueError:
                        raise SourceError(
                            f"{tar_path}:{comps['cls'].name}: label is not an integer: {raw[:20]!r}"
                        ) from None
                ignored += len(comps) - 1 - ("cls" in comps)
                entries.append((key, tar_path, image, label))
    names = [f"{p.stem}/{key}" if len(paths) > 1 else key for key, p, _, _ in entries]
    keys = _assign_keys(names)
    items = [
        SourceItem(
            key=k,
            source=f"{p}:{m.name}",
            path=str(p),
            offset=m.offset_data,
            size=m.size,
            label=label,
        )
        for k, (_, p, m, label) in zip(keys, entries)
    ]
    return Source(layout="wds", items=items, ignored=ignored)


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


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SourceError(f"{path}: not a readable CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a CIFAR python batch (a {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar(root: Path, split: str, jpeg_quality: int) -> Source:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) python batches.

    Images become JPEG at ``jpeg_quality`` (32x32 RGB), labels the fine label for CIFAR-100.
    """
    import io

    import numpy as np
    from PIL import Image

    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; choose one of {SPLITS}")
    if (root / "batches.meta").exists():
        name, label_key, names_key = "cifar10", "labels", "label_names"
        meta = _load_cifar_pickle(root / "batches.meta")
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    elif (root / "meta").exists():
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
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    items: list[SourceItem] = []
    for f in files:
        batch = _load_cifar_pickle(f)
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = list(batch[label_key])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise SourceError(
                f"{f}: unexpected CIFAR batch shape {data.shape} / {len(labels)} labels"
            )
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> HWC
        for i, (img, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=jpeg_quality)
            index = len(items)
            items.append(
                SourceItem(
                    key=f"{name}_{split}_{index:06d}",
                    source=f"{f}[{i}]",
                    path=str(f),
                    label=int(label),
                    data=buf.getvalue(),
                )
            )
    return Source(layout="cifar", items=items, classes=classes)


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
    """Enumerate ``src`` with ``layout`` (``auto`` detects tars, CIFAR and COCO; ImageNet is
    explicit). ``split`` and ``jpeg_quality`` apply to CIFAR only."""
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if src == SAMPLE_SOURCE:
        files = sample_files()
        items = [SourceItem(key=k, source=str(p), path=str(p)) for k, p in files]
        return Source(layout="sample", items=items)
    root = Path(src)
    if not root.exists():
        raise SourceError(f"source {src!r} does not exist")
    if root.is_file():
        if not (layout in ("auto", "wds") and root.name.endswith(".tar")):
            raise SourceError(f"source {src!r} is a file; expected a folder or a .tar archive")
        return _wds([root])
    if layout in ("auto", "wds"):
        tars = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(".tar"))
        if tars and (layout == "wds" or not any(_is_image(f.name) for f in _walk_files(root))):
            return _wds(tars)
        if layout == "wds":
            raise SourceError(f"{src}: no .tar archives found")
    if layout == "imagenet":
        return _imagenet(root)
    if layout == "cifar" or (
        layout == "auto" and ((root / "batches.meta").exists() or (root / "meta").exists())
    ):
        return _cifar(root, split, jpeg_quality)
    if layout in ("auto", "coco") and (root / "train2017").is_dir():
        return _folder(root / "train2017", layout="coco")
    if layout == "coco" and root.name != "train2017":
        raise SourceError(
            f"{src}: COCO layout expects a train2017/ folder inside it (or given directly)"
        )
    return _folder(root, layout="coco" if layout == "coco" else "folder")
