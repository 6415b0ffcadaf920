"""``ssl-cli shards build``: inputs -> tar shards + DALI indexes, proposals.parquet, manifest, rejects.

Inputs are cut into fixed chunks of ``shard_size`` inputs; chunk ``c`` becomes
``shard-{c:06d}.tar`` (absent when every input of the chunk was rejected). Per chunk the build
commits, in this order, the tar (with its index), the chunk's Parquet rows and rejects under
``.parts/``, and last the chunk summary, which marks it done. A build killed at any moment and
started again redoes at most the chunks in flight; the final files (``proposals.parquet``,
``rejects.jsonl``, ``manifest.json``) are written once every chunk is done, the manifest last.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .engines import make_engine
from .process import BuildParams, Reject, Sample, process_item
from .proposals import load_cv2
from .sources import Source, SourceError, SourceItem, open_source
from .writer import ShardWriter, atomic_write_bytes

FORMAT = "ssl-cli-shards/1"
PARTS = ".parts"

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


class BuildError(RuntimeError):
    """The build cannot proceed (conflicting output folder, no inputs, ...)."""


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.tar"


def library_versions() -> dict[str, str]:
    import PIL
    import webdataset

    cv2 = load_cv2()
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ssl-cli")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "ssl-cli": ours,
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyarrow": pa.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
    }


def proposals_table(samples: list[Sample], shard: str) -> pa.Table:
    """Rows of ``proposals.parquet`` for the samples of one shard."""
    counts = np.array([len(s.boxes) for s in samples], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = (
        np.concatenate([s.boxes.reshape(-1) for s in samples]).astype(np.int32)
        if samples
        else np.zeros(0, np.int32)
    )
    boxes = pa.ListArray.from_arrays(
        pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), 4)
    )
    return pa.Table.from_arrays(
        [
            pa.array([s.key for s in samples], pa.string()),
            pa.array([shard] * len(samples), pa.string()),
            pa.array([s.width for s in samples], pa.int32()),
            pa.array([s.height for s in samples], pa.int32()),
            pa.array([s.label for s in samples], pa.int32()),
            boxes.cast(PROPOSALS_SCHEMA.field("boxes").type),
            pa.array([s.num_raw_boxes for s in samples], pa.int32()),
        ],
        schema=PROPOSALS_SCHEMA,
    )


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def _reject_line(r: Reject) -> str:
    return json.dumps(
        {"key": r.key, "source": r.source, "reason": r.reason, "detail": r.detail},
        ensure_ascii=False,
    )


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    processed: int  # inputs processed by this invocation (0 when already complete)
    up_to_date: bool


def _build_state(source: Source, params: BuildParams, src: str, split: str) -> dict:
    return {
        "format": FORMAT,
        "source": src,
        "layout": source.layout,
        "split": split if source.layout == "cifar" else None,
        "inputs": len(source.items),
        "fingerprint": source.fingerprint(),
        "parameters": params.to_dict(),
    }


def _chunk_done(parts: Path, out: Path, chunk: int) -> dict | None:
    summary = parts / f"{shard_name(chunk)}.json"
    if not summary.exists():
        return None
    info = json.loads(summary.read_text())
    if info["samples"] and not (out / shard_name(chunk)).exists():
        return None
    return info


def _finish_chunk(
    out: Path, parts: Path, chunk: int, samples: list[Sample], rejects: list[Reject], writer
) -> dict:
    name = shard_name(chunk)
    write_parquet_atomic(proposals_table(samples, name), parts / f"{name}.parquet")
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
        }
    atomic_write_bytes(parts / f"{name}.json", json.dumps(info, sort_keys=True).encode())
    return info


def _run_chunks(
    out: Path,
    parts: Path,
    chunks: dict[int, list[SourceItem]],
    results: Iterator[Sample | Reject],
    bar: tqdm,
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
        _finish_chunk(out, parts, chunk, samples, rejects, writer)


def _finalize(out: Path, parts: Path, state: dict, source: Source, n_chunks: int) -> dict:
    infos = [json.loads((parts / f"{shard_name(c)}.json").read_text()) for c in range(n_chunks)]
    tables = [pq.read_table(parts / f"{shard_name(c)}.parquet") for c in range(n_chunks)]
    proposals = pa.concat_tables(tables).cast(PROPOSALS_SCHEMA)
    write_parquet_atomic(proposals, out / "proposals.parquet")
    rejects = b"".join(
        (parts / f"{shard_name(c)}.rejects.jsonl").read_bytes() for c in range(n_chunks)
    )
    atomic_write_bytes(out / "rejects.jsonl", rejects)
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
            "ignored_files": source.ignored,
        },
        "rejects_by_reason": dict(sorted(reasons.items())),
        "shards": [i["shard"] for i in infos if i["shard"] is not None],
        "classes": source.classes,
        "files": {
            "proposals": "proposals.parquet",
            "rejects": "rejects.jsonl",
            "classes": "classes.json" if source.classes is not None else None,
        },
        "boxes_format": "KEY.boxes: raw little-endian int32 [N, 4] xyxy, decoded-image pixels, "
        "exclusive right/bottom edges, selective-search rank order",
        "versions": library_versions(),
    }
    if samples + n_rejects != len(source.items):
        raise BuildError(
            f"internal accounting error: {samples} samples + {n_rejects} rejects != {len(source.items)} inputs"
        )
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(parts)
    return manifest


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
) -> BuildResult:
    """Build (or resume, or confirm) the shards of ``src`` in ``out``."""
    load_cv2()  # fail before any work when the contrib module is missing
    source = open_source(src, layout, split=split, jpeg_quality=params.image.transcode_quality)
    if source.layout == "cifar":
        # 32x32 images: accept them (MOS uses no boxes; with the default filter none survive)
        params = replace(params, image=replace(params.image, min_side=1))
    if not source.items:
        raise SourceError(f"{src}: no images found (extensions: .jpg .jpeg .png .webp .bmp)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _build_state(source, params, src, split)

    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("build") == state:
            log(f"{out}: up to date ({manifest['counts']['samples']} samples), nothing to do")
            return BuildResult(out, manifest, processed=0, up_to_date=True)
        raise BuildError(
            f"{out} already holds a finished build of other inputs or parameters; "
            "use another output folder or delete this one"
        )

    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    state_path = parts / "build.json"
    if state_path.exists():
        if json.loads(state_path.read_text()) != state:
            raise BuildError(
                f"{out} holds an unfinished build of other inputs or parameters; "
                "resume it with the same command, or use another output folder"
            )
    else:
        atomic_write_bytes(state_path, json.dumps(state, sort_keys=True).encode())
    for stale in list(out.glob("*.tmp")) + list(parts.glob("*.tmp")):
        stale.unlink()  # left by a killed run: never renamed, so never part of the output

    n_chunks = (len(source.items) + params.shard_size - 1) // params.shard_size
    todo: dict[int, list[SourceItem]] = {}
    for c in range(n_chunks):
        if _chunk_done(parts, out, c) is None:
            todo[c] = source.items[c * params.shard_size : (c + 1) * params.shard_size]
    n_todo = sum(len(v) for v in todo.values())
    if n_todo < len(source.items):
        log(f"resuming: {n_chunks - len(todo)} of {n_chunks} shards already complete")

    runner = make_engine(engine, workers=workers, address=ray_address)
    items = (item for c in sorted(todo) for item in todo[c])
    with tqdm(
        total=len(source.items),
        initial=len(source.items) - n_todo,
        unit="img",
        desc="shards",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        results = runner.map(process_item, items, params)
        try:
            _run_chunks(out, parts, todo, results, bar)
        finally:
            close = getattr(results, "close", None)
            if close:
                close()
    manifest = _finalize(out, parts, state, source, n_chunks)
    c = manifest["counts"]
    log(
        f"{out}: {c['samples']} samples in {len(manifest['shards'])} shards, "
        f"{c['rejects']} rejected (see rejects.jsonl), {c['boxes']} boxes"
    )
    return BuildResult(out, manifest, processed=n_todo, up_to_date=False)
