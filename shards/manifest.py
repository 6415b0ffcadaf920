"""A local shard folder's ``manifest.json``, read and checked (the URL form is in
:func:`shards.verify.load_manifest`, which reads through :mod:`shards.remote`)."""

from __future__ import annotations

import json
from pathlib import Path

from .build import FORMAT, WORK

__all__ = ["ShardsNotFound", "read_manifest_file"]


class ShardsNotFound(FileNotFoundError):
    pass


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _holds_images(folder: Path, limit: int = 2000) -> bool:
    """Whether ``folder`` (or a sub-folder) holds an image file, looking at ``limit`` entries."""
    if not folder.is_dir():
        return False
    for i, path in enumerate(folder.rglob("*")):
        if i >= limit:
            return False
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            return True
    return False


def read_manifest_file(out: str | Path) -> dict:
    """The checked ``manifest.json`` of the local shard folder ``out``."""
    path = Path(out) / "manifest.json"
    if not path.exists():
        if (Path(out) / WORK / "build.json").exists():
            hint = " (an unfinished build: run the same build command again)"
        elif _holds_images(Path(out)):
            hint = (
                f" ({out} holds images, not shards: build the shards first, "
                f"`ssl-cli shards build {out} SHARDS`, then pass SHARDS)"
            )
        else:
            hint = ""
        raise ShardsNotFound(f"{path} not found: not a finished shard folder{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable manifest (broken JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a manifest (a JSON {type(manifest).__name__})")
    for key in ("build", "counts", "shards", "files"):
        if key not in manifest:
            raise ValueError(f"{path}: not a complete manifest (no {key!r})")
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: unsupported format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return manifest
