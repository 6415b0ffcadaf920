"""``ssl-cli shards split``: one shard folder cut into two that share no sample.

A kNN or linear probe needs a bank and queries that share nothing, and a folder of the user's own
images is often one set. The split is drawn by the rule ``eval --val-fraction`` uses
(:func:`split_rows`): ``round(val_fraction * N)`` rows of ``proposals.parquet``, chosen by a fixed
permutation of the row order (``numpy.random.default_rng(seed)``), are the val side, the rest the
train side; the same folder, fraction and seed give the same two sets.

Each side is a complete shard folder of the same format (tar shards with their DALI indexes,
``proposals.parquet``, ``manifest.json``, ``classes.json`` when labelled): every sample keeps its
members byte for byte, in the source's order. The manifest records the source, the sha256 of its
manifest, the fraction, the seed and the side (``build.subset``); ``counts.transcoded`` is
``null`` because a build does not record it per sample. Each side is written in a temporary
folder beside it and renamed into place when complete, so a killed split leaves no half-written
side, and a rerun finishes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from .build import FORMAT, library_versions, proposals_schema, shard_name, write_parquet_atomic
from .manifest import read_manifest_file
from .recall import proposal_recall
from .writer import ShardWriter, sha256_file

SIDES = ("train", "val")


class SplitError(ValueError):
    """The split cannot be made from this folder or into that one (the message names it)."""


class SplitOptionError(SplitError):
    """An option of the split is wrong (the message names it)."""


def split_rows(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and val sides, each sorted: ``round(val_fraction * n)`` rows of
    a fixed permutation (``seed``) are val. Raises ``ValueError`` when a side would be empty."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"--val-fraction {val_fraction} of {n} samples leaves an empty side")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _tmp_for(out: Path) -> Path:
    return out.with_name(out.name + ".split-tmp")


def _subset_record(src: Path, manifest_sha: str, fraction: float, seed: int, side: str) -> dict:
    return {
        "of": str(src.resolve()),
        "manifest_sha256": manifest_sha,
        "val_fraction": fraction,
        "seed": seed,
        "side": side,
        "rule": "round(val_fraction * N) rows of numpy default_rng(seed).permutation(N) are val",
    }


def _done(out: Path, subset: dict) -> bool:
    """``out`` holds this very side already (a rerun after a finished or killed split)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("build", {}).get("subset") == subset


def _check_out(src: Path, out: Path, subset: dict) -> bool:
    """True when ``out`` is already this side; raise when it is anything else that exists."""
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise SplitOptionError(f"{out}: the output may not be the source folder or inside it")
    if not out.exists():
        return False
    if _done(out, subset):
        return True
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise SplitError(
        f"{out} exists and is not this split's {subset['side']} side; choose a new folder "
        "or remove it"
    )


def _annotation_section(source_section: dict, table: pa.Table) -> dict:
    """The source's ``annotations`` section with the counts and recall of this side's rows."""
    rows = table.select(["image_id", "boxes", "gt_boxes", "gt_labels", "gt_crowd", "gt_areas"])
    rows = rows.to_pydict()
    crowd = [np.asarray(c, dtype=bool) for c in rows["gt_crowd"]]
    labels = [np.asarray(x, dtype=np.int64) for x in rows["gt_labels"]]
    annotated = [i for i, v in enumerate(rows["image_id"]) if v is not None]
    section = dict(source_section)
    section["counts"] = {
        "annotated_images": len(annotated),
        "images_without_entry": len(rows["image_id"]) - len(annotated),
        "objects": int(sum((~c).sum() for c in crowd)),
        "crowd": int(sum(c.sum() for c in crowd)),
        "classes": len({int(x) for lab, c in zip(labels, crowd) for x in lab[~c]}),
    }
    section["recall"] = proposal_recall(
        [np.asarray(rows["boxes"][i], np.int32).reshape(-1, 4) for i in annotated],
        [np.asarray(rows["gt_boxes"][i], np.int32).reshape(-1, 4) for i in annotated],
        [crowd[i] for i in annotated],
        [np.asarray(rows["gt_areas"][i], np.float32) for i in annotated],
    )
    return section


def _samples(src: Path, manifest: dict):
    """Every sample of the source as ``(key, {ext: bytes})`` in shard order; each shard is
    checked against the manifest's sha256 before its samples are used."""
    for shard in manifest["shards"]:
        path = src / shard["name"]
        if not path.is_file():
            raise SplitError(f"{path}: missing (listed in {src / 'manifest.json'})")
        if sha256_file(path) != shard["sha256"]:
            raise SplitError(
                f"{path}: sha256 differs from the manifest; run `ssl-cli shards verify {src}`"
            )
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        yield from members.items()


def _write_shards(
    src: Path, manifest: dict, keys: list[str], folder: Path, shard_size: int
) -> tuple[list[dict], list[str]]:
    """The samples ``keys`` of ``src``, in their order there, as shards of ``shard_size`` in
    ``folder``; returns the shards' manifest entries and each key's shard name."""
    keep = {key: pos for pos, key in enumerate(keys)}
    shard_of: list[str] = [""] * len(keys)
    shards: list[dict] = []
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        name = shard_name(len(shards))
        with ShardWriter(folder / name) as writer:
            for pos, sample in pending:
                writer.write(sample)
                shard_of[pos] = name
        shards.append(_entry(writer))
        pending.clear()

    for key, members in _samples(src, manifest):
        pos = keep.get(key)
        if pos is not None:
            pending.append((pos, {"__key__": key, **members}))
            if len(pending) == shard_size:
                flush()
    if pending:
        flush()
    missing = [k for k, pos in keep.items() if not shard_of[pos]]
    if missing:
        raise SplitError(
            f"{src}: {len(missing)} rows of proposals.parquet have no sample in any shard "
            f"(first: {missing[:3]}); run `ssl-cli shards verify {src}`"
        )
    return shards, shard_of


def _side_manifest(manifest: dict, side: pa.Table, shards: list[dict], subset: dict) -> dict:
    """The manifest of one side: the source's build record with ``subset``, this side's counts,
    shards and (with annotations) ground-truth counts and recall."""
    counts = [len(b) for b in side.column("boxes").to_pylist()]
    classes = manifest.get("classes")
    labelled = side.column("label").null_count == 0 and len(side) > 0
    out = {
        "format": FORMAT,
        "build": {**manifest["build"], "inputs": len(side), "subset": subset},
        "counts": {
            "inputs": len(side),
            "samples": len(side),
            "rejects": 0,
            "boxes": sum(counts),
            "zero_box_samples": sum(n == 0 for n in counts),
            "transcoded": None,
            "labelled": int(labelled),
            "ignored_files": 0,
            "symlinks_followed": 0,
            "symlinks_outside_src": 0,
        },
        "rejects_by_reason": {},
        "ignored_by_reason": {},
        "warnings": [],
        "shards": shards,
        "classes": classes,
        "files": {
            "proposals": "proposals.parquet",
            "rejects": "rejects.jsonl",
            "ignored": "ignored.jsonl",
            "classes": "classes.json" if classes is not None else None,
        },
        "boxes_format": manifest["boxes_format"],
        "versions": library_versions(),
    }
    if "annotations" in manifest:
        out["annotations"] = _annotation_section(manifest["annotations"], side)
    return out


def _write_side(
    src: Path,
    manifest: dict,
    table: pa.Table,
    rows: np.ndarray,
    out: Path,
    subset: dict,
    shard_size: int,
) -> dict:
    """One side, assembled in a temporary folder beside ``out`` and renamed to ``out`` whole."""
    tmp = _tmp_for(out)
    if tmp.exists():
        shutil.rmtree(tmp)  # what a killed split left
    tmp.mkdir(parents=True)
    side = table.take(pa.array(rows))
    shards, shard_of = _write_shards(src, manifest, side.column("key").to_pylist(), tmp, shard_size)
    side = side.set_column(
        side.schema.get_field_index("shard"), "shard", pa.array(shard_of, pa.string())
    )
    write_parquet_atomic(
        side.cast(proposals_schema("annotations" in manifest)), tmp / "proposals.parquet"
    )
    atomic_write_bytes(tmp / "rejects.jsonl", b"")
    atomic_write_bytes(tmp / "ignored.jsonl", b"")
    if manifest.get("classes") is not None:
        atomic_write_json(tmp / "classes.json", manifest["classes"])
    side_manifest = _side_manifest(manifest, side, shards, subset)
    atomic_write_json(tmp / "manifest.json", side_manifest)
    if out.exists():
        out.rmdir()  # checked empty by _check_out
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return side_manifest


def _entry(writer: ShardWriter) -> dict:
    index = writer.index_path
    return {
        "bytes": writer.nbytes,
        "index": index.name,
        "index_sha256": sha256_file(index),
        "name": writer.path.name,
        "samples": writer.count,
        "sha256": writer.sha256,
    }


def split_shards(
    src: str | Path,
    train_out: str | Path,
    val_out: str | Path,
    val_fraction: float,
    seed: int = 0,
    shard_size: int | None = None,
    log=print,
) -> dict[str, dict]:
    """Write the train and val sides of the shard folder ``src`` (see the module's docstring);
    returns each side's manifest. A side already written by the same split is left as is."""
    src, outs = Path(src), {"train": Path(train_out), "val": Path(val_out)}
    if outs["train"].resolve() == outs["val"].resolve():
        raise SplitOptionError(f"the train and val outputs are the same folder: {outs['train']}")
    manifest = read_manifest_file(src)
    manifest_sha = hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest()
    table = pq.read_table(src / manifest["files"]["proposals"])
    try:
        sides = dict(zip(SIDES, split_rows(len(table), val_fraction, seed)))
    except ValueError as e:
        raise SplitOptionError(f"{src}: {e}") from None
    if shard_size is None:
        shard_size = int(manifest["build"].get("parameters", {}).get("shard_size", 1000))
    if shard_size < 1:
        raise SplitOptionError(f"--shard-size must be >= 1, got {shard_size}")
    result = {}
    for side, out in outs.items():
        subset = _subset_record(src, manifest_sha, val_fraction, seed, side)
        if _check_out(src, out, subset):
            log(f"{out}: already this split's {side} side, left as is")
            result[side] = json.loads((out / "manifest.json").read_text())
            continue
        result[side] = _write_side(src, manifest, table, sides[side], out, subset, shard_size)
        c = result[side]["counts"]
        log(f"{out}: {side}, {c['samples']} samples in {len(result[side]['shards'])} shards")
    return result
