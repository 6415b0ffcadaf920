"""``ssl-cli shards build``: inputs -> tar shards + DALI indexes, proposals.parquet, manifest, rejects.

Inputs are cut into fixed chunks of ``shard_size`` inputs; chunk ``c`` becomes
``shard-{c:06d}.tar`` (absent when every input of the chunk was rejected). Per chunk the build
commits, in this order, the tar (with its index), the chunk's Parquet rows and rejects under
``.ssl-cli/parts/``, and last the chunk summary, which marks it done. A build killed at any
moment and started again redoes at most the chunks in flight; the final files
(``proposals.parquet``, ``rejects.jsonl``, ``ignored.jsonl``, ``manifest.json``) are written once
every chunk is done, the manifest last.

OUT belongs to the build: it must be empty, new, or an earlier ssl-cli build. The work state
lives in ``OUT/.ssl-cli/`` (``lock``: an exclusive ``fcntl.flock`` held for the whole build,
naming its PID; ``build.json``: the inputs and parameters; ``inputs.jsonl.gz``: one line per
input with its size and mtime, to say what changed; ``parts/``: per-chunk summaries and rejects,
kept so that ``--retry-rejects`` can redo single chunks). Only files of our own naming are ever
deleted or overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from . import sysinfo
from .annotations import AnnotationError, Annotations, ImageTruth, load_annotations
from .atomic import atomic_write_bytes, stale_temporaries
from .dicts import flatten
from .engines import make_engine
from .process import BuildParams, Reject, Sample, process_item
from .proposals import load_cv2
from .recall import proposal_recall
from .sources import SAMPLE_SOURCE, Source, SourceError, SourceItem, open_source, printable
from .writer import ShardWriter, sha256_file

FORMAT = "ssl-cli-shards/1"
WORK = ".ssl-cli"
# Rejects that a second attempt may turn into samples (--retry-rejects).
TRANSIENT_REASONS = ("worker_crashed", "unreadable")
# Every file name the build writes into OUT (written through shards.atomic).
_OUR_FILES = re.compile(
    r"^(shard-\d{6}\.(tar|idx)|proposals\.parquet|rejects\.jsonl|ignored\.jsonl|classes\.json"
    r"|manifest\.json)$"
)
# Progress when stderr is not a terminal (a log file, CI): a plain line every LOG_EVERY_S seconds
# or every LOG_EVERY_PERCENT of the inputs, whichever comes first.
LOG_EVERY_S = 30.0
LOG_EVERY_PERCENT = 10
_OUR_PARTS = re.compile(r"^(build\.json|shard-\d{6}\.tar\.(json|parquet|rejects\.jsonl))$")
PROPOSALS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("boxes", pa.list_(pa.list_(pa.int32(), 4)), nullable=False),
        pa.field("num_raw_boxes", pa.int32(), nullable=False),
    ]
)
# Added by a build with --annotations (COCO detection JSON); see shards.annotations.
GT_FIELDS = [
    pa.field("image_id", pa.int64(), nullable=True),
    pa.field("gt_boxes", pa.list_(pa.list_(pa.int32(), 4)), nullable=False),
    pa.field("gt_labels", pa.list_(pa.int32()), nullable=False),
    pa.field("gt_crowd", pa.list_(pa.bool_()), nullable=False),
    pa.field("gt_areas", pa.list_(pa.float32()), nullable=False),
]
ANNOTATED_SCHEMA = pa.schema(list(PROPOSALS_SCHEMA) + GT_FIELDS)
# Layouts whose inputs are files with names an annotation file can give.
ANNOTATED_LAYOUTS = ("folder", "coco", "imagenet")


class BuildError(RuntimeError):
    """The build cannot proceed (conflicting output folder, no inputs, ...)."""


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.tar"


def library_versions() -> dict[str, str]:
    """What a manifest records about the build's software (``unknown``: not installed)."""
    load_cv2()  # the module whose version counts is the one the build runs
    import PIL  # noqa: F401 - loaded, so its own __version__ is read
    import webdataset  # noqa: F401

    found = sysinfo.library_versions(
        "ssl-cli", "opencv", "numpy", "pillow", "pyarrow", "webdataset"
    )
    return {k: v or "unknown" for k, v in found.items()}


def proposals_schema(annotated: bool) -> pa.Schema:
    return ANNOTATED_SCHEMA if annotated else PROPOSALS_SCHEMA


def _list_column(arrays: list[np.ndarray], width: int, value_type: pa.DataType) -> pa.Array:
    """One list cell per array: ``[n, width]`` rows (fixed-size lists) or ``[n]`` values."""
    counts = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    dtype = value_type.to_pandas_dtype()
    flat = (
        np.concatenate([np.asarray(a).reshape(-1) for a in arrays]).astype(dtype)
        if arrays
        else np.zeros(0, dtype)
    )
    values = pa.array(flat, value_type)
    if width > 1:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(offsets, values)


def proposals_table(samples: list[Sample], shard: str, annotated: bool = False) -> pa.Table:
    """Rows of ``proposals.parquet`` for the samples of one shard (with the ground-truth
    columns in a build with annotations)."""
    schema = proposals_schema(annotated)
    columns = [
        pa.array([s.key for s in samples], pa.string()),
        pa.array([shard] * len(samples), pa.string()),
        pa.array([s.width for s in samples], pa.int32()),
        pa.array([s.height for s in samples], pa.int32()),
        pa.array([s.label for s in samples], pa.int32()),
        _list_column([s.boxes for s in samples], 4, pa.int32()),
        pa.array([s.num_raw_boxes for s in samples], pa.int32()),
    ]
    if annotated:
        gts = [np.zeros((0, 6), np.int32) if s.gt is None else s.gt for s in samples]
        areas = [np.zeros(0, np.float32) if s.gt_areas is None else s.gt_areas for s in samples]
        columns += [
            pa.array([s.image_id for s in samples], pa.int64()),
            _list_column([g[:, :4] for g in gts], 4, pa.int32()),
            _list_column([g[:, 4] for g in gts], 1, pa.int32()),
            _list_column([g[:, 5].astype(bool) for g in gts], 1, pa.bool_()),
            _list_column(areas, 1, pa.float32()),
        ]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema)], schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def _reject_line(r: Reject) -> str:
    return json.dumps(
        {"key": r.key, "source": r.source, "reason": r.reason, "detail": r.detail},
        ensure_ascii=False,
    )


def _chunk_done(parts: Path, out: Path, chunk: int) -> dict | None:
    summary = parts / f"{shard_name(chunk)}.json"
    if not summary.exists():
        return None
    info = _read_json(summary)
    if info["samples"] and not (out / shard_name(chunk)).exists():
        return None
    return info


def _finish_chunk(
    out: Path,
    parts: Path,
    chunk: int,
    samples: list[Sample],
    rejects: list[Reject],
    writer,
    annotated: bool = False,
) -> dict:
    name = shard_name(chunk)
    write_parquet_atomic(proposals_table(samples, name, annotated), parts / f"{name}.parquet")
    atomic_write_bytes(
        parts / f"{name}.rejects.jsonl", "".join(_reject_line(r) + "\n" for r in rejects).encode()
    )
    info = {
        "chunk": chunk,
        "samples": len(samples),
        "rejects": len(rejects),
        "boxes": int(sum(len(s.boxes) for s in samples)),
        "zero_box_samples": sum(1 for s in samples if len(s.boxes) == 0),
        "transcoded": sum(1 for s in samples if s.transcoded),
        "reasons": dict(Counter(r.reason for r in rejects)),
        "shard": None,
    }
    if samples:
        info["shard"] = {
            "name": name,
            "index": writer.index_path.name,
            "samples": writer.count,
            "bytes": writer.nbytes,
            "sha256": writer.sha256,
            "index_sha256": sha256_file(writer.index_path),
        }
    atomic_write_bytes(parts / f"{name}.json", json.dumps(info, sort_keys=True).encode())
    return info


def _duration(seconds: float | None) -> str:
    """``h:mm:ss``, as the other progress lines of ssl-cli; ``?`` for no estimate yet."""
    if seconds is None:
        return "?"
    h, rest = divmod(int(max(seconds, 0.0)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class LogProgress:
    """Progress as plain lines for a stderr that is not a terminal (no carriage returns).

    ``shards: 120/500 images (24%), 35.2 images/s, 3 rejected; 0:00:03 elapsed, ETA 0:00:10``:
    a line every ``every_s`` seconds or every ``every_percent`` of ``total``, whichever comes
    first, and one at the end. Rate and ETA are cumulative: the images done since the start of this run over
    its elapsed time (resumed images count in done/total, not in the rate).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        write: Callable[[str], None] | None = None,
        every_s: float = LOG_EVERY_S,
        every_percent: float = LOG_EVERY_PERCENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.initial, self.n = total, initial, initial
        self.rejects = 0
        self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._every_s, self._clock = every_s, clock
        self._step = max(1, int(total * every_percent / 100))
        self._start = self._last_time = clock()
        self._next_n = initial + self._step
        self._last_n = initial

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.n != self._last_n:
            self._line(self._clock())

    def set_postfix(self, rejects: int | None = None, refresh: bool = False, **_) -> None:
        if rejects is not None:
            self.rejects = rejects

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if self.n >= self._next_n or now - self._last_time >= self._every_s or self.n >= self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        done = self.n - self.initial
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (self.total - self.n) / done if done > 0 and elapsed > 0 else None
        pct = 100 * self.n / self.total if self.total else 100.0
        line = f"shards: {self.n}/{self.total} images ({pct:.0f}%), {rate:.1f} images/s"
        if self.rejects:
            line += f", {self.rejects} rejected"
        self._write(f"{line}; {_duration(elapsed)} elapsed, ETA {_duration(eta)}")
        self._last_time, self._last_n = now, self.n
        while self._next_n <= self.n:
            self._next_n += self._step


def _progress(total: int, initial: int, progress: bool):
    """A tqdm bar on a terminal, plain log lines otherwise, nothing with ``progress=False``.

    The bar's rate and ETA are cumulative too (``smoothing=0``), like the log lines'."""
    if progress and not sys.stderr.isatty():
        return LogProgress(total, initial)
    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="shards",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0,
    )


def annotate(sample: Sample, truth: ImageTruth | None) -> Sample | Reject:
    """Attach an image's ground truth to its sample; a JSON size that disagrees with the decoded
    image is a reject naming both sizes (the boxes would be in another frame)."""
    if truth is None:
        sample.gt = np.zeros((0, 6), np.int32)
        sample.gt_areas = np.zeros(0, np.float32)
        return sample
    if (truth.width, truth.height) != (sample.width, sample.height):
        hint = ""
        if (truth.width, truth.height) == (sample.height, sample.width):
            hint = (
                " (the sizes are swapped: the file's EXIF orientation turns the image, and the "
                "annotations were made on the unrotated pixels)"
            )
        return Reject(
            sample.key,
            sample.source,
            "annotation_mismatch",
            f"{sample.source}: decodes to {sample.width}x{sample.height}, but image id "
            f"{truth.image_id} ({truth.file_name}) of the annotation file is "
            f"{truth.width}x{truth.height}{hint}",
        )
    sample.gt = truth.rows()
    sample.gt_areas = truth.areas
    sample.image_id = truth.image_id
    return sample


def _run_chunks(
    out: Path,
    parts: Path,
    chunks: dict[int, list[SourceItem]],
    results: Iterator[Sample | Reject],
    bar: tqdm | LogProgress,
    on_shard: Callable[[Path, dict], None] | None = None,
    truth: dict[str, ImageTruth | None] | None = None,
) -> None:
    total_rejects = 0
    for chunk in sorted(chunks):
        samples: list[Sample] = []
        rejects: list[Reject] = []
        with ShardWriter(out / shard_name(chunk)) as writer:
            for item in chunks[chunk]:
                result = next(results)
                if result.key != item.key:  # engines keep order; this guards the contract
                    raise BuildError(f"engine returned {result.key!r} for {item.key!r}")
                if truth is not None and isinstance(result, Sample):
                    result = annotate(result, truth[item.key])
                if isinstance(result, Sample):
                    writer.write(result.components())
                    result.jpeg = b""  # written; keep only what the Parquet rows need
                    samples.append(result)
                else:
                    rejects.append(result)
                    total_rejects += 1
                    bar.set_postfix(rejects=total_rejects, refresh=False)
                bar.update(1)
            if not samples:
                writer.discard()  # every input rejected: no (empty) shard
        info = _finish_chunk(out, parts, chunk, samples, rejects, writer, truth is not None)
        if on_shard is not None and info["shard"] is not None:
            on_shard(out / info["shard"]["name"], info["shard"])


def annotation_report(proposals: pa.Table, annotations: Annotations) -> dict:
    """The manifest's ``annotations`` section: the file, its counts, the build's counts and the
    recall of the stored proposals against the ground truth (:func:`shards.recall.proposal_recall`)."""
    cols = proposals.select(["image_id", "boxes", "gt_boxes", "gt_labels", "gt_crowd", "gt_areas"])
    rows = cols.to_pydict()
    crowd = [np.asarray(c, dtype=bool) for c in rows["gt_crowd"]]
    labels = [np.asarray(x, dtype=np.int64) for x in rows["gt_labels"]]
    objects = int(sum((~c).sum() for c in crowd))
    classes = {int(x) for lab, c in zip(labels, crowd) for x in lab[~c]}
    report = annotations.summary()
    report["counts"] = {
        "annotated_images": sum(i is not None for i in rows["image_id"]),
        "images_without_entry": sum(i is None for i in rows["image_id"]),
        "objects": objects,
        "crowd": int(sum(c.sum() for c in crowd)),
        "classes": len(classes),
    }
    annotated = [i for i, v in enumerate(rows["image_id"]) if v is not None]
    report["recall"] = proposal_recall(
        [np.asarray(rows["boxes"][i], np.int32).reshape(-1, 4) for i in annotated],
        [np.asarray(rows["gt_boxes"][i], np.int32).reshape(-1, 4) for i in annotated],
        [crowd[i] for i in annotated],
        [np.asarray(rows["gt_areas"][i], np.float32) for i in annotated],
    )
    report["gt_format"] = (
        "KEY.gt: raw little-endian int32 [M, 6] x1, y1, x2, y2, category_id, iscrowd; boxes in "
        "the frame of KEY.boxes (decoded-image pixels, exclusive right/bottom edges)"
    )
    return report


def _finalize(
    out: Path,
    parts: Path,
    state: dict,
    source: Source,
    n_chunks: int,
    annotations: Annotations | None = None,
) -> dict:
    infos = [_read_json(parts / f"{shard_name(c)}.json") for c in range(n_chunks)]
    tables = [pq.read_table(parts / f"{shard_name(c)}.parquet") for c in range(n_chunks)]
    proposals = pa.concat_tables(tables).cast(proposals_schema(annotations is not None))
    write_parquet_atomic(proposals, out / "proposals.parquet")
    rejects = b"".join(
        (parts / f"{shard_name(c)}.rejects.jsonl").read_bytes() for c in range(n_chunks)
    )
    atomic_write_bytes(out / "rejects.jsonl", rejects)
    ignored = "".join(
        json.dumps({"entry": e, "reason": r}, ensure_ascii=False) + "\n" for e, r in source.ignored
    )
    atomic_write_bytes(out / "ignored.jsonl", ignored.encode())
    if source.classes is not None:
        atomic_write_bytes(out / "classes.json", json.dumps(source.classes, indent=1).encode())
    reasons: Counter = Counter()
    for info in infos:
        reasons.update(info["reasons"])
    samples = sum(i["samples"] for i in infos)
    n_rejects = sum(i["rejects"] for i in infos)
    manifest = {
        "format": FORMAT,
        "build": state,
        "counts": {
            "inputs": len(source.items),
            "samples": samples,
            "rejects": n_rejects,
            "boxes": sum(i["boxes"] for i in infos),
            "zero_box_samples": sum(i["zero_box_samples"] for i in infos),
            "transcoded": sum(i["transcoded"] for i in infos),
            "labelled": int(proposals.column("label").null_count == 0 and samples > 0),
            "ignored_files": len(source.ignored),
            "symlinks_followed": source.symlinks,
            "symlinks_outside_src": source.symlinks_outside,
        },
        "rejects_by_reason": dict(sorted(reasons.items())),
        "ignored_by_reason": dict(
            sorted(Counter(r.split(":")[0] for _, r in source.ignored).items())
        ),
        "warnings": source.warnings,
        "shards": [i["shard"] for i in infos if i["shard"] is not None],
        "classes": source.classes,
        "files": {
            "proposals": "proposals.parquet",
            "rejects": "rejects.jsonl",
            "ignored": "ignored.jsonl",
            "classes": "classes.json" if source.classes is not None else None,
        },
        "boxes_format": "KEY.boxes: raw little-endian int32 [N, 4] xyxy, decoded-image pixels, "
        "exclusive right/bottom edges, selective-search rank order",
        "versions": library_versions(),
    }
    if annotations is not None:
        manifest["annotations"] = annotation_report(proposals, annotations)
    if samples + n_rejects != len(source.items):
        raise BuildError(
            f"internal accounting error: {samples} samples + {n_rejects} rejects != {len(source.items)} inputs"
        )
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    _drop_parquet_parts(parts)
    return manifest


def _drop_parquet_parts(parts: Path) -> None:
    """After the manifest: per-chunk rows are in proposals.parquet (summaries and rejects stay)."""
    for p in parts.glob("shard-*.tar.parquet"):
        p.unlink()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BuildError(
            f"{path}: not readable as JSON ({e}); delete OUT (or use another one) to rebuild"
        ) from None


# ----------------------------------------------------------------------------- output folder


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def check_paths(src: str, out: Path) -> None:
    """Refuse an OUT that is SRC, lies inside SRC, or holds SRC (inputs overwritten or read
    back as inputs)."""
    if src == SAMPLE_SOURCE:
        return
    s, o = os.path.realpath(src), os.path.realpath(out)
    if s == o:
        raise BuildError(f"OUT {out} is SRC {src}: the build would overwrite its own inputs")
    if _inside(o, s):
        raise BuildError(f"OUT {out} lies inside SRC {src}; choose an output folder outside it")
    if _inside(s, o):
        raise BuildError(f"SRC {src} lies inside OUT {out}; choose an output folder outside it")


def _is_our_build(out: Path) -> bool:
    if (out / WORK).is_dir():
        return True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((out / "manifest.json").read_text()).get("format") == FORMAT
    return False


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"OUT {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not _is_our_build(out):
        shown = ", ".join(printable(e) for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise BuildError(
            f"OUT {out} is not empty ({shown}) and holds no ssl-cli build; "
            "choose a new or empty output folder"
        )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT for the whole build; a second build fails at once."""
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise BuildError(
                f"{out} is being written by another build (PID {holder}); "
                "wait for it to finish or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean_stale(out: Path, parts: Path, finished: bool) -> None:
    """Remove what a killed run left: our temporary files, and after a finished build the
    per-chunk rows. Nothing of another name is touched."""
    for folder, pattern in ((out, _OUR_FILES), (parts, _OUR_PARTS)):
        for p in stale_temporaries(folder, pattern):
            p.unlink()
    if finished and parts.is_dir():
        _drop_parquet_parts(parts)


# ------------------------------------------------------------------------- what has changed


def _read_inputs(path: Path) -> dict[str, dict] | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return {e["source"]: e for e in map(json.loads, f)}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _describe_stamp(old: str, new: str) -> str:
    (os_, om), (ns, nm) = old.split(":", 1), new.split(":", 1)
    parts = []
    if os_ != ns:
        parts.append(f"size {os_} -> {ns} bytes")
    if om != nm:
        parts.append("modified")
    return ", ".join(parts) or f"{old} -> {new}"


def _input_changes(work: Path, source: Source, limit: int = 5) -> list[str]:
    old = _read_inputs(work / "inputs.jsonl.gz")
    if old is None:
        return ["the inputs differ (no record of the earlier inputs to compare)"]
    new = {e["source"]: e for e in map(Source.entry, source.items)}
    changed = []
    for s, e in new.items():
        o = old.get(s)
        if o is not None and o != e:
            what = []
            if o["stamp"] != e["stamp"]:
                what.append(_describe_stamp(o["stamp"], e["stamp"]))
            if o["label"] != e["label"]:
                what.append(f"label {o['label']} -> {e['label']}")
            if o["key"] != e["key"]:
                what.append(f"key {o['key']} -> {e['key']}")
            changed.append(f"{s} ({', '.join(what)})")
    added = [s for s in new if s not in old]
    removed = [s for s in old if s not in new]
    lines = []
    for what, names in (("changed", changed), ("added", added), ("removed", removed)):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            lines.append(f"{len(names)} input(s) {what}: {'; '.join(names[:limit])}{more}")
    return lines or ["the input order differs"]


def _differences(old: dict, new: dict, work: Path, source: Source) -> str:
    a, b = flatten(old), flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        if k in ("fingerprint", "inputs"):
            continue
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k, '(absent)')!r} then, {b.get(k, '(absent)')!r} now")
    if a.get("fingerprint") != b.get("fingerprint") or a.get("inputs") != b.get("inputs"):
        lines.extend(_input_changes(work, source))
    return "; ".join(lines) or "the build state differs"


# -------------------------------------------------------------------------------- diagnosis

_FIXES = {
    "too_small": "small-image datasets: --min-image-side 8 (or at most the shorter side of the images)",
    "too_large": "raise --max-pixels (or --max-file-bytes for big files)",
    "worker_crashed": "rerun the same command with --retry-rejects (workers killed from outside, "
    "e.g. by the OOM killer: try fewer --workers)",
    "unreadable": "rerun the same command with --retry-rejects once the files can be read",
    "not_an_image": "check that SRC holds images and --layout is right",
    "unsupported_format": "convert the inputs to JPEG, PNG, WebP or BMP",
    "bad_label": "fix the labels (.cls must be an integer in [0, number of classes))",
    "annotation_mismatch": "fix width/height of those images in the annotation file (see "
    "rejects.jsonl), then rerun the same command",
}


def diagnose(manifest: dict) -> list[str]:
    """Problems that make a finished build non-zero: every input rejected, most inputs rejected
    for one reason, or transient rejects left (each with the fix)."""
    c = manifest["counts"]
    reasons = manifest.get("rejects_by_reason", {})
    params = manifest["build"]["parameters"]
    problems = []

    def detail(reason: str, n: int) -> str:
        if reason == "too_small":
            return f"smaller than --min-image-side {params['image']['min_side']}"
        if reason == "too_large":
            return f"over --max-pixels {params['image']['max_pixels']} or --max-file-bytes"
        return f"rejected as {reason}"

    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        if n == c["inputs"] or 2 * n > c["inputs"]:
            share = f"all {n}" if n == c["inputs"] else f"{n} of {c['inputs']}"
            fix = _FIXES.get(reason, "see rejects.jsonl")
            problems.append(f"{share} images are {detail(reason, n)}; {fix}")
    if c["samples"] == 0 and not problems:
        problems.append(f"all {c['inputs']} inputs were rejected; see rejects.jsonl")
    n = reasons.get("annotation_mismatch", 0)
    if n and not any(p.endswith(_FIXES["annotation_mismatch"]) for p in problems):
        problems.append(
            f"{n} image(s) disagree in size with the annotation file; "
            + _FIXES["annotation_mismatch"]
        )
    for reason in TRANSIENT_REASONS:
        n = reasons.get(reason, 0)
        if n and not any(p.endswith(_FIXES[reason]) for p in problems):
            problems.append(f"{n} input(s) {detail(reason, n)}; {_FIXES[reason]}")
    return problems


# ------------------------------------------------------------------------------------ build


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    processed: int  # inputs processed by this invocation (0 when already complete)
    up_to_date: bool
    problems: list[str] = field(default_factory=list)  # non-empty: the CLI exits non-zero


def _build_state(
    source: Source, params: BuildParams, src: str, split: str, annotations: Annotations | None
) -> dict:
    state = {
        "format": FORMAT,
        "source": src,
        "layout": source.layout,
        "split": split if source.layout in ("cifar", "idx") else None,
        "inputs": len(source.items),
        "fingerprint": source.fingerprint(),
        "parameters": params.to_dict(),
    }
    if annotations is not None:  # the file's bytes decide the shards; its path does not
        state["annotations_sha256"] = annotations.sha256
    return state


def _transient_chunks(parts: Path, n_chunks: int) -> set[int]:
    out = set()
    for c in range(n_chunks):
        path = parts / f"{shard_name(c)}.rejects.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and json.loads(line)["reason"] in TRANSIENT_REASONS:
                out.add(c)
                break
    return out


def _reopen(out: Path, parts: Path, manifest: dict, n_chunks: int) -> None:
    """Turn a finished build back into an unfinished one whose chunks are all done: the
    per-chunk rows come back from proposals.parquet, then the manifest goes."""
    table = pq.read_table(out / manifest["files"]["proposals"])
    schema = proposals_schema("annotations" in manifest)
    for c in range(n_chunks):
        name = shard_name(c)
        rows = table.filter(pc.equal(table.column("shard"), name))
        write_parquet_atomic(rows.cast(schema), parts / f"{name}.parquet")
    (out / "manifest.json").unlink()


def build_shards(
    src: str,
    out: str | Path,
    params: BuildParams = BuildParams(),
    layout: str = "auto",
    split: str = "train",
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    retry_rejects: bool = False,
    on_shard: Callable[[Path, dict], None] | None = None,
    annotations: str | Path | None = None,
    strict_annotations: bool = False,
) -> BuildResult:
    """Build (or resume, or confirm) the shards of ``src`` in ``out``.

    ``annotations``: a COCO detection JSON whose ground truth goes into the shards (``KEY.gt``,
    the ``gt_*`` columns) and against which the proposals' recall is measured; it is read and
    checked whole before any work (:mod:`shards.annotations`). Its images missing from the
    source are counted in the manifest (``strict_annotations``: an error).

    ``retry_rejects``: redo the chunks holding transient rejects (``worker_crashed``,
    ``unreadable``), also on a finished build. ``progress``: on stderr, a bar when it is a
    terminal, else a plain line every ``LOG_EVERY_S`` seconds or ``LOG_EVERY_PERCENT``.
    ``on_shard(tar, entry)``: called after each shard this run writes (its tar and index
    are complete; ``entry`` is its manifest entry: name, index, samples, bytes, sha256),
    e.g. to upload it while the next one is built.
    """
    load_cv2()  # fail before any work when the contrib module is missing
    if src != SAMPLE_SOURCE:
        src = os.path.abspath(src)  # normalised: a trailing slash or ./ is the same source
    out = Path(os.path.abspath(out))
    check_paths(src, out)
    _check_out(out)
    source = open_source(src, layout, split=split, jpeg_quality=params.image.transcode_quality)
    if source.layout in ("cifar", "idx"):
        # 32/28-px images: accept them (MOS uses no boxes; with the default filter none survive)
        params = replace(params, image=replace(params.image, min_side=1))
    if not source.items:
        if source.layout in ("cifar", "idx"):
            raise SourceError(
                f"{src}: the {source.layout.upper()} files of split {split!r} hold no images "
                "(0 records): nothing to build"
            )
        raise SourceError(f"{src}: no images found (extensions: .jpg .jpeg .png .webp .bmp)")
    truth = None
    gt = None
    if annotations is not None:
        if source.layout not in ANNOTATED_LAYOUTS:
            raise BuildError(
                f"--annotations needs a source whose images are files named in the annotation "
                f"file (layouts {', '.join(ANNOTATED_LAYOUTS)}); {src} is read as "
                f"{source.layout!r}"
            )
        gt = load_annotations(annotations)
        matched = gt.match(source.items, source.root, strict=strict_annotations)
        truth = {it.key: t for it, t in zip(source.items, matched)}
        n_entry = sum(t is not None for t in matched)
        log(
            f"annotations: {n_entry} of {len(source.items)} inputs have an entry in {annotations}"
            f"; {len(source.items) - n_entry} without (kept, no objects)"
        )
        if gt.unmatched_images:
            shown = ", ".join(repr(n) for n in gt.unmatched_images[:5])
            log(
                f"warning: {len(gt.unmatched_images)} image(s) of {annotations} with "
                f"{gt.unmatched_annotations} annotation(s) are not in the source ({shown}"
                f"{', ...' if len(gt.unmatched_images) > 5 else ''}); --strict makes this an error"
            )
        if n_entry == 0:
            raise AnnotationError(
                f"{annotations}: no image of the file is in {src} (file_name is matched to the "
                "path relative to SRC, or to the base name)"
            )
    for w in source.warnings:
        log(f"warning: {w}")
    if source.symlinks_outside:
        log(f"note: {source.symlinks_outside} input(s) are symlinks to files outside {src}")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        return _build_locked(
            src, out, source, params, split, workers, engine, ray_address, progress, log,
            retry_rejects, on_shard, gt, truth,
        )  # fmt: skip


def _finished_build(
    out: Path,
    parts: Path,
    state: dict,
    source: Source,
    n_chunks: int,
    retry_rejects: bool,
    log: Callable[[str], None],
) -> BuildResult | None:
    """A finished build in ``out``: the up-to-date result, or ``None`` after reopening it when
    ``retry_rejects`` finds chunks with transient rejects. A build of other inputs or
    parameters is a :class:`BuildError` naming what differs."""
    manifest = _read_json(out / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("build") != state:
        old = manifest.get("build", {}) if isinstance(manifest, dict) else {}
        raise BuildError(
            f"{out} already holds a finished build of other inputs or parameters: "
            f"{_differences(old, state, out / WORK, source)}. "
            "Use another output folder, or delete this one to rebuild"
        )
    _clean_stale(out, parts, finished=True)
    redo = _transient_chunks(parts, n_chunks) if retry_rejects else set()
    if not redo:
        problems = diagnose(manifest)
        log(f"{out}: up to date ({manifest['counts']['samples']} samples), nothing to do")
        return BuildResult(out, manifest, 0, up_to_date=True, problems=problems)
    _reopen(out, parts, manifest, n_chunks)
    return None


def _open_state(out: Path, parts: Path, state: dict, source: Source) -> None:
    """The work folder of an unfinished build: its ``build.json`` must be this build's (else a
    :class:`BuildError` naming what differs); a new one gets ``build.json`` and the input
    list; what a killed run left half-written is removed."""
    work = out / WORK
    parts.mkdir(parents=True, exist_ok=True)
    state_path = work / "build.json"
    if state_path.exists():
        old = _read_json(state_path)
        if old != state:
            raise BuildError(
                f"{out} holds an unfinished build of other inputs or parameters: "
                f"{_differences(old, state, work, source)}. "
                "Resume it with the same command, or use another output folder"
            )
    else:
        lines = "".join(map(Source.entry_line, source.items)).encode("utf-8", "backslashreplace")
        atomic_write_bytes(work / "inputs.jsonl.gz", gzip.compress(lines, mtime=0))
        atomic_write_bytes(state_path, json.dumps(state, sort_keys=True).encode())
    _clean_stale(out, parts, finished=False)


def _chunks_to_do(
    out: Path,
    parts: Path,
    source: Source,
    params: BuildParams,
    n_chunks: int,
    retry_rejects: bool,
    log: Callable[[str], None],
) -> dict[int, list[SourceItem]]:
    """Chunk number -> its inputs, for every chunk not complete yet (with ``retry_rejects``
    also those that hold transient rejects)."""
    if retry_rejects:
        for c in _transient_chunks(parts, n_chunks):
            (parts / f"{shard_name(c)}.json").unlink(missing_ok=True)
            log(f"retrying {shard_name(c)}: it holds transient rejects")
    todo: dict[int, list[SourceItem]] = {}
    for c in range(n_chunks):
        if _chunk_done(parts, out, c) is None:
            todo[c] = source.items[c * params.shard_size : (c + 1) * params.shard_size]
    if len(todo) < n_chunks:
        log(f"resuming: {n_chunks - len(todo)} of {n_chunks} shards already complete")
    return todo


def _build_locked(
    src, out, source, params, split, workers, engine, ray_address, progress, log, retry_rejects,
    on_shard, gt, truth,
) -> BuildResult:  # fmt: skip
    state = _build_state(source, params, src, split, gt)
    parts = out / WORK / "parts"
    n_chunks = (len(source.items) + params.shard_size - 1) // params.shard_size

    if (out / "manifest.json").exists():
        done = _finished_build(out, parts, state, source, n_chunks, retry_rejects, log)
        if done is not None:
            return done
    _open_state(out, parts, state, source)
    todo = _chunks_to_do(out, parts, source, params, n_chunks, retry_rejects, log)
    n_todo = sum(len(v) for v in todo.values())

    runner = make_engine(engine, workers=workers, address=ray_address)
    items = (item for c in sorted(todo) for item in todo[c])
    with _progress(len(source.items), len(source.items) - n_todo, progress) as bar:
        results = runner.map(process_item, items, params)
        try:
            _run_chunks(out, parts, todo, results, bar, on_shard, truth)
        finally:
            close = getattr(results, "close", None)
            if close:
                close()
    manifest = _finalize(out, parts, state, source, n_chunks, gt)
    c = manifest["counts"]
    log(
        f"{out}: {c['samples']} samples in {len(manifest['shards'])} shards, "
        f"{c['rejects']} rejected (see rejects.jsonl), {c['boxes']} boxes"
    )
    log(describe_labels(manifest, source))
    if gt is not None:
        log(describe_recall(manifest["annotations"]))
    return BuildResult(out, manifest, n_todo, up_to_date=False, problems=diagnose(manifest))


def describe_labels(manifest: dict, source) -> str:
    """The labels line of a build: the classes, or "none" with the hint ``--layout imagenet``
    when the images of a plain folder sit in two or more sub-folders (class folders, as
    ImageNet's), which the folder layout does not read as labels."""
    classes = manifest.get("classes") or []
    if manifest["counts"].get("labelled"):
        shown = ", ".join(classes[:8]) + (
            f", ... {len(classes) - 8} more" if len(classes) > 8 else ""
        )
        return f"labels: {len(classes)} classes ({shown})"
    line = "labels: none"
    if source.layout == "folder" and source.root is not None:
        folders = sorted(
            {Path(it.source).relative_to(source.root).parts[0] for it in source.items
             if len(Path(it.source).relative_to(source.root).parts) > 1}
        )  # fmt: skip
        if len(folders) >= 2:
            shown = ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else "")
            line += (
                f" (the images sit in {len(folders)} sub-folders: {shown}; to use the folder "
                "names as class labels, build with --layout imagenet)"
            )
    return line


def describe_recall(report: dict) -> str:
    """One paragraph of the manifest's ``annotations`` section for a person."""
    c, r = report["counts"], report["recall"]

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    sizes = ", ".join(
        f"{k} {f(v['AR@100'])} ({v['objects']})" for k, v in r["by_size"].items() if v["objects"]
    )
    return (
        f"ground truth: {c['annotated_images']} annotated images, {c['objects']} objects of "
        f"{c['classes']} classes ({c['crowd']} crowd regions apart), {c['images_without_entry']} "
        f"images without an entry\n"
        f"proposal recall ({r['proposals_per_image']} boxes/image): recall@0.5 "
        f"{f(r['recall@0.5'])}, recall@0.7 {f(r['recall@0.7'])}, AR@10 {f(r['AR@10'])}, "
        f"AR@100 {f(r['AR@100'])}; AR@100 by size: {sizes or 'n/a'}"
    )
