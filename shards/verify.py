"""``ssl-cli shards verify`` and ``inspect``: check a shard folder against its manifest.

Both take a local folder or a URL (``s3://bucket/prefix``, ``gs://...``, ``https://...``),
read through the shard cache of :mod:`shards.remote`: a remote tar that differs from the
manifest or is missing is a problem naming its URL.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .annotations import AnnotationError, load_annotations
from .boxes import read_gt
from .build import proposals_schema
from .location import ShardLocation, locate
from .manifest import ShardsNotFound
from .remote import READ_ONLY, RemoteShardError, ShardCache, filesystem
from .sources import parse_label
from .writer import index_path_for, read_index, sha256_file


def load_manifest(out: str | Path | ShardLocation) -> dict:
    """The checked ``manifest.json`` of the shard folder ``out`` (a local folder or a URL)."""
    location = locate(out)
    try:
        return location.read_manifest()
    except RemoteShardError as e:
        kind = ShardsNotFound if " not found: " in str(e) else ValueError
        raise kind(str(e)) from None


def _read_tar_samples(
    path: Path, problems: list[str]
) -> tuple[dict[str, dict[str, bytes]], dict[str, dict[str, tuple[int, int]]], list[str]]:
    """key -> {ext: bytes}, key -> {ext: (offset, size)}, keys in order: every member that
    reads; what does not (a truncated tar, a duplicate member) goes to ``problems``."""
    samples: dict[str, dict[str, bytes]] = {}
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tf:
        while True:
            try:
                m = tf.next()
                if m is None:
                    break
                if not m.isfile():
                    problems.append(f"{path.name}:{m.name}: not a regular file member")
                    continue
                data = tf.extractfile(m).read()
            except (tarfile.TarError, OSError) as e:
                problems.append(f"{path.name}: unreadable from byte {tf.offset}: {e}")
                break
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key not in samples:
                samples[key] = {}
                offsets[key] = {}
                order.append(key)
            if ext in samples[key]:
                problems.append(f"{path.name}:{m.name}: member appears twice")
            samples[key][ext] = data
            offsets[key][ext] = (m.offset_data, m.size)
    return samples, offsets, order


def _remote_names(store: ShardCache) -> set[str]:
    """Names in the folder at the URL (none where the storage has no listing: https)."""
    if store.url.split("://", 1)[0].lower() in READ_ONLY:
        return set()
    fs, base = filesystem(store.url, store.endpoint_url)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return set()
    return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries}


def verify_shards(
    out: str | Path | ShardLocation | ShardCache,
    decode: bool = False,
    annotations: str | Path | None = None,
) -> list[str]:
    """Every problem found, as one line each; an empty list means the folder is sound.

    Checks checksums, sizes and sample counts of every shard against the manifest, every DALI
    index against its tar, that tar samples and Parquet rows match one to one (boxes and labels
    included), that samples + rejects add up to the inputs, and with ``decode`` that every image
    decodes to the recorded size with DALI's own decoder (as the training pipeline decodes it).

    A build with annotations is also checked against its annotation file (the path the manifest
    records, or ``annotations``): the file's sha256 must be the recorded one, and every sample's
    ``KEY.gt`` and ``gt_*`` columns must be the file's ground truth of its ``image_id``.

    A URL (or a shard cache of one) is checked through its cache: each tar is downloaded
    (once; a tar the cache has is checked there), so a cache smaller than the folder evicts the
    tars checked before.
    """
    location = locate(out)
    store = location.cache if location.is_remote else None
    if store is not None:
        try:
            manifest = store.open()
        except RemoteShardError as e:
            return [str(e)]
        out = store.root
        store_problems = store.check_store()
        listed = {s["name"] for s in manifest["shards"]}
        strays = sorted(
            n for n in _remote_names(store) if n.startswith("shard-") and n.endswith(".tar")
        )
        problems = store_problems + [
            f"{store.remote(n)}: shard file not listed in the manifest"
            for n in strays
            if n not in listed
        ]
    else:
        out = location.path
        manifest = load_manifest(out)
        listed = {s["name"] for s in manifest["shards"]}
        problems = [
            f"{stray}: shard file not listed in the manifest"
            for stray in sorted(p.name for p in out.glob("shard-*.tar"))
            if stray not in listed
        ]
    try:
        return _verify(out, manifest, decode, problems, store, annotations)
    finally:
        if store is not None:
            for name in store.pinned():
                store.unpin(name)


def _verify(
    out: Path,
    manifest: dict,
    decode: bool,
    problems: list[str],
    store: ShardCache | None,
    annotations: str | Path | None = None,
) -> list[str]:
    """Every check of a shard folder, by phase: the Parquet table, each shard (file, index,
    samples against their rows, decoding), the rows left over, the counts and rejects, and the
    ground truth against its annotation file."""
    decoder = None
    if decode:
        from .dali_decode import DaliDecoder

        decoder = DaliDecoder()
    try:
        table = pq.read_table(out / manifest["files"]["proposals"])
    except Exception as e:  # noqa: BLE001
        return problems + [f"proposals.parquet: unreadable: {e}"]
    annotated = "annotations" in manifest
    if table.schema.remove_metadata() != proposals_schema(annotated):
        problems.append(f"proposals.parquet: schema differs from the shard format:\n{table.schema}")
        return problems
    rows = table.to_pydict()
    keys = rows["key"]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    if dup:
        problems.append(f"proposals.parquet: duplicate keys {dup[:5]}")
    row_of = {k: i for i, k in enumerate(keys)}
    seen_rows: set[str] = set()

    pinned: str | None = None
    for shard in manifest["shards"]:
        if store is not None and pinned is not None:
            store.unpin(pinned)  # checked: the cache may evict it
            pinned = None
        path, fetched = _shard_path(out, shard, store, problems)
        if fetched:
            pinned = shard["name"]
        if path is None:
            continue
        read = _check_shard_file(path, shard, problems)
        if read is None:
            continue
        samples, order = read
        to_decode = _check_samples(
            shard["name"], samples, order, rows, row_of, manifest, problems, seen_rows
        )
        if decoder is not None:
            _check_decodes(decoder, to_decode, problems)
    for key in keys:
        if key not in seen_rows and key in row_of:
            problems.append(f"proposals.parquet: row {key!r} has no sample in any shard")
    _check_counts(out, manifest, len(keys), problems)
    if annotated:
        problems += _verify_truth(manifest, rows, annotations)
    return problems


def _shard_path(out: Path, shard: dict, store: ShardCache | None, problems: list[str]):
    """The local file of ``shard`` (in ``out``, or the store's cached copy, pinned) and whether
    it was fetched and pinned; the path is ``None``, with the problem said, when there is none."""
    fetched = False
    if store is None:
        path = out / shard["name"]
    else:
        try:
            path = store.fetch(shard["name"], pin=True)
            fetched = True
        except RemoteShardError as e:
            said = f"{store.remote(shard['name'])}: "
            if not any(p.startswith(said) for p in problems):  # once per object
                problems.append(str(e))
            return None, False
    if not path.exists():
        problems.append(f"{shard['name']}: missing")
        return None, fetched
    return path, fetched


def _check_shard_file(path: Path, shard: dict, problems: list[str]):
    """Size, digest, members and DALI index of one shard file against its manifest entry;
    returns its samples (``key -> {ext: bytes}``) and their order, or ``None`` when the tar
    does not read."""
    if path.stat().st_size != shard["bytes"]:
        problems.append(
            f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}"
        )
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 {digest[:12]}… differs from the manifest")
    try:
        samples, offsets, order = _read_tar_samples(path, problems)
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{shard['name']}: unreadable tar: {e}")
        return None
    if len(order) != shard["samples"]:
        problems.append(f"{shard['name']}: {len(order)} samples, manifest says {shard['samples']}")
    idx_path = index_path_for(path)
    if shard.get("index_sha256") and idx_path.is_file():
        if sha256_file(idx_path) != shard["index_sha256"]:
            problems.append(f"{idx_path.name}: sha256 differs from the manifest")
    try:
        index = read_index(idx_path)
    except (OSError, ValueError) as e:
        problems.append(f"{idx_path.name}: {e}")
        index = None
    if index is not None and [offsets[k] for k in order] != index:
        problems.append(f"{idx_path.name}: offsets or sizes do not match {shard['name']}")
    return samples, order


def _check_samples(
    name: str,
    samples: dict,
    order: list[str],
    rows: dict,
    row_of: dict[str, int],
    manifest: dict,
    problems: list[str],
    seen_rows: set[str],
) -> list[tuple[str, bytes, int, int]]:
    """Each sample of shard ``name`` against its Parquet row: placement, members, boxes in the
    image, label, ground truth. Returns ``(where, jpeg, width, height)`` of each for decoding."""
    classes = manifest.get("classes")
    annotated = "annotations" in manifest
    to_decode = []
    for key in order:
        comps = samples[key]
        where = f"{name}:{key}"
        if key not in row_of:
            problems.append(f"{where}: no row in proposals.parquet")
            continue
        seen_rows.add(key)
        i = row_of[key]
        if rows["shard"][i] != name:
            problems.append(f"{where}: proposals.parquet places it in {rows['shard'][i]}")
        if "jpg" not in comps or "boxes" not in comps:
            problems.append(f"{where}: missing component (has {sorted(comps)})")
            continue
        raw = comps["boxes"]
        if len(raw) % 16:
            problems.append(f"{where}: .boxes is {len(raw)} bytes, not a multiple of 16")
            continue
        boxes = np.frombuffer(raw, dtype="<i4").reshape(-1, 4)
        expected = np.asarray(rows["boxes"][i], dtype=np.int32).reshape(-1, 4)
        if not np.array_equal(boxes, expected):
            problems.append(f"{where}: .boxes differ from proposals.parquet")
        w, h = rows["width"][i], rows["height"][i]
        if len(boxes) and (
            (boxes[:, 0] < 0).any()
            or (boxes[:, 1] < 0).any()
            or (boxes[:, 2] > w).any()
            or (boxes[:, 3] > h).any()
            or (boxes[:, 2] <= boxes[:, 0]).any()
            or (boxes[:, 3] <= boxes[:, 1]).any()
        ):
            problems.append(f"{where}: boxes outside the {w}x{h} image or empty")
        label = rows["label"][i]
        cls = comps.get("cls")
        if cls is not None:
            parsed, why = parse_label(cls, classes)
            if why:
                problems.append(f"{where}: .cls {cls[:20]!r}: {why}")
            elif parsed != label:
                problems.append(f"{where}: .cls {cls!r} disagrees with label {label!r}")
        elif label is not None:
            problems.append(f"{where}: no .cls, but label {label!r} in proposals.parquet")
        if annotated:
            _check_gt(comps.get("gt"), rows, i, where, problems)
        elif "gt" in comps:
            problems.append(f"{where}: a .gt member in a build without annotations")
        to_decode.append((where, comps["jpg"], w, h))
    return to_decode


def _check_decodes(decoder, to_decode: list[tuple[str, bytes, int, int]], problems: list[str]):
    """Every image decodes with DALI to the size its row records."""
    sizes = decoder.sizes([j for _, j, _, _ in to_decode])
    for (where, _, w, h), size in zip(to_decode, sizes):
        if isinstance(size, str):
            problems.append(f"{where}: image does not decode: {size}")
        elif size != (w, h):
            problems.append(f"{where}: decodes to {size[0]}x{size[1]} (DALI), recorded {w}x{h}")


def _check_counts(out: Path, manifest: dict, n_rows: int, problems: list[str]) -> None:
    """The manifest's counts against the rows and ``rejects.jsonl``."""
    counts = manifest["counts"]
    if n_rows != counts["samples"]:
        problems.append(
            f"proposals.parquet: {n_rows} rows, manifest says {counts['samples']} samples"
        )
    rejects_path = out / manifest["files"]["rejects"]
    n_rejects = None
    if rejects_path.exists():
        n_rejects = 0
        for n, line in enumerate(rejects_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            n_rejects += 1
            try:
                entry = json.loads(line)
                entry["key"], entry["source"], entry["reason"]  # noqa: B018 - must be present
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"{rejects_path.name}: line {n} is not a reject entry: {e}")
    if n_rejects is None:
        problems.append(f"{rejects_path.name}: missing")
    elif n_rejects != counts["rejects"]:
        problems.append(
            f"{rejects_path.name}: {n_rejects} entries, manifest says {counts['rejects']}"
        )
    if counts["samples"] + counts["rejects"] != counts["inputs"]:
        problems.append(
            f"manifest: {counts['samples']} samples + {counts['rejects']} rejects != {counts['inputs']} inputs"
        )


def _gt_of_row(rows: dict, i: int) -> np.ndarray:
    """``[M, 6]`` of row ``i`` from the ``gt_*`` columns (the layout of ``KEY.gt``)."""
    boxes = np.asarray(rows["gt_boxes"][i], dtype=np.int32).reshape(-1, 4)
    labels = np.asarray(rows["gt_labels"][i], dtype=np.int32).reshape(-1, 1)
    crowd = np.asarray(rows["gt_crowd"][i], dtype=np.int32).reshape(-1, 1)
    return np.concatenate([boxes, labels, crowd], axis=1)


def _check_gt(raw: bytes | None, rows: dict, i: int, where: str, problems: list[str]) -> None:
    if raw is None:
        problems.append(f"{where}: no .gt member in a build with annotations")
        return
    try:
        gt = read_gt(raw, where=f"{where}.gt")
    except ValueError as e:
        problems.append(str(e))
        return
    if not np.array_equal(gt, _gt_of_row(rows, i)):
        problems.append(f"{where}: .gt differs from the gt_* columns of proposals.parquet")
    w, h = rows["width"][i], rows["height"][i]
    if len(gt) and ((gt[:, 2] > w).any() or (gt[:, 3] > h).any()):
        problems.append(f"{where}: ground-truth boxes outside the {w}x{h} image")
    if len(rows["gt_areas"][i]) != len(gt):
        problems.append(f"{where}: {len(rows['gt_areas'][i])} gt_areas for {len(gt)} objects")
    if rows["image_id"][i] is None and len(gt):
        problems.append(f"{where}: objects but no image_id")


def _verify_truth(manifest: dict, rows: dict, override: str | Path | None) -> list[str]:
    """The ground truth of every row of ``proposals.parquet`` (``rows``, as read by
    :func:`_verify`) against the annotation file it came from."""
    info = manifest["annotations"]
    path = Path(override or info["file"])
    if not path.is_file():
        return [
            f"annotation file {path} not found (recorded sha256 {info['sha256'][:12]}…); "
            "pass its current path with --annotations"
        ]
    try:
        ann = load_annotations(path)
    except AnnotationError as e:
        return [str(e)]
    if ann.sha256 != info["sha256"]:
        return [
            f"{path}: sha256 {ann.sha256[:12]}… is not the {info['sha256'][:12]}… the shards "
            "were built from (the file changed since the build)"
        ]
    problems = []
    if ann.categories != info["categories"]:
        problems.append(f"{path}: categories differ from the manifest's")
    by_id = {t.image_id: t for t in ann.images.values()}
    seen: Counter = Counter()
    for i, key in enumerate(rows["key"]):
        iid = rows["image_id"][i]
        if iid is None:
            continue
        seen[iid] += 1
        truth = by_id.get(iid)
        if truth is None:
            problems.append(f"proposals.parquet: {key}: image id {iid} is not in {path}")
        elif (truth.width, truth.height) != (rows["width"][i], rows["height"][i]):
            problems.append(f"proposals.parquet: {key}: size differs from image id {iid} of {path}")
        elif not np.array_equal(_gt_of_row(rows, i), truth.rows()):
            problems.append(
                f"proposals.parquet: {key}: ground truth differs from image id {iid} of {path}"
            )
    problems += [
        f"proposals.parquet: image id {iid} on {n} rows" for iid, n in seen.items() if n > 1
    ]
    return problems


_CLASSES_SHOWN = 30  # classes listed by `shards inspect`; the rest are counted


def inspect_shards(out: str | Path | ShardLocation, examples: int = 5) -> str:
    """A human-readable summary: counts, shards, labels, boxes per image, a few samples (of a
    local folder, or of a URL: only its manifest and proposals are fetched)."""
    location = locate(out)
    title = str(location)
    if location.is_remote:
        store = location.cache
        try:
            manifest = store.read_manifest()
            store.fetch(store.small(manifest["files"]["proposals"]))
        except RemoteShardError as e:
            raise ValueError(str(e)) from None
        title, out = store.url, store.root
    else:
        out = location.path
        manifest = load_manifest(out)
    rows = pq.read_table(out / manifest["files"]["proposals"]).to_pydict()
    lines = [
        title,
        *_describe_inputs(manifest),
        *_describe_boxes(rows),
        *_describe_labels(rows, manifest.get("classes")),
    ]
    if "annotations" in manifest:
        lines.extend(_describe_truth(manifest["annotations"], rows))
    p = manifest["build"]["parameters"]
    lines.append(
        f"  search      mode {p['search']['mode']}, max side {p['search']['max_side']}; filter min side "
        f"{p['filter']['min_side']}, aspect [{p['filter']['min_aspect']:.3g}, {p['filter']['max_aspect']:.3g}], "
        f"IoU <= {p['filter']['max_iou']}, top {p['filter']['top_n']}"
    )
    lines.append("  samples")
    for i in range(min(examples, len(rows["key"]))):
        b = rows["boxes"][i]
        first = ", ".join(str(list(x)) for x in b[:2])
        lines.append(
            f"    {rows['key'][i]:<28} {rows['shard'][i]} {rows['width'][i]}x{rows['height'][i]} "
            f"label={rows['label'][i]} boxes={len(b)} (raw {rows['num_raw_boxes'][i]}) {first}"
        )
    return "\n".join(lines)


def _describe_inputs(manifest: dict) -> list[str]:
    """The summary's lines on the inputs: source, counts, subset, rejects and ignored files by
    reason, symlinks, warnings, shards."""
    c = manifest["counts"]
    lines = [
        f"  source      {manifest['build']['source']} (layout {manifest['build']['layout']})",
        f"  inputs      {c['inputs']}: {c['samples']} samples, {c['rejects']} rejected"
        + (f", {c['transcoded']} re-encoded to JPEG" if c["transcoded"] is not None else ""),
    ]
    subset = manifest["build"].get("subset")
    if subset:
        lines.append(
            f"  subset      the {subset['side']} side of {subset['of']} (val fraction "
            f"{subset['val_fraction']}, seed {subset['seed']}; ssl-cli shards split)"
        )
    for reason, n in manifest["rejects_by_reason"].items():
        lines.append(f"    rejected  {reason}: {n}")
    for reason, n in manifest.get("ignored_by_reason", {}).items():
        lines.append(f"    ignored   {reason}: {n} (not inputs; see ignored.jsonl)")
    if c.get("symlinks_followed"):
        lines.append(
            f"  symlinks    {c['symlinks_followed']} followed, "
            f"{c.get('symlinks_outside_src', 0)} of them to files outside SRC"
        )
    for w in manifest.get("warnings", []):
        lines.append(f"  warning     {w}")
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines.append(f"  shards      {len(manifest['shards'])} ({total_bytes / 2**20:.1f} MiB)")
    return lines


def _describe_boxes(rows: dict) -> list[str]:
    """The summary's lines on proposals per image and image sizes."""
    n_boxes = np.array([len(b) for b in rows["boxes"]], dtype=np.int64)
    lines: list[str] = []
    if len(n_boxes):
        q = np.percentile(n_boxes, [0, 10, 50, 90, 100])
        lines.append(
            f"  boxes/image mean {n_boxes.mean():.1f}, min {q[0]:.0f}, p10 {q[1]:.0f}, median {q[2]:.0f}, "
            f"p90 {q[3]:.0f}, max {q[4]:.0f}; {int((n_boxes == 0).sum())} images with no box"
        )
        w = np.array(rows["width"])
        h = np.array(rows["height"])
        lines.append(
            f"  image size  median {int(np.median(w))}x{int(np.median(h))}, "
            f"min side {int(np.minimum(w, h).min())}, max side {int(np.maximum(w, h).max())}"
        )
    return lines


def _describe_labels(rows: dict, classes: list[str] | None) -> list[str]:
    """The summary's lines on labels: every class with its count (up to
    :data:`_CLASSES_SHOWN`, then how many more), or ``none``."""
    labels = [x for x in rows["label"] if x is not None]
    lines: list[str] = []
    if labels:
        counts = Counter(labels)
        lines.append(f"  labels      {len(counts)} classes, {len(labels)} labelled samples")
        shown = sorted(counts)[:_CLASSES_SHOWN]
        for lab in shown:  # every class by label, up to _CLASSES_SHOWN
            name = f" ({classes[lab]})" if classes and lab < len(classes) else ""
            lines.append(f"    {lab}{name}: {counts[lab]}")
        if len(counts) > len(shown):
            lines.append(f"    ... {len(counts) - len(shown)} more")
    else:
        lines.append("  labels      none")
    return lines


def _describe_truth(info: dict, rows: dict) -> list[str]:
    """The ``inspect`` lines of a build with annotations."""
    c, r = info["counts"], info["recall"]
    names = {cat["id"]: cat["name"] for cat in info["categories"]}
    per_class: Counter = Counter()
    per_image = []
    for labels, crowd, iid in zip(rows["gt_labels"], rows["gt_crowd"], rows["image_id"]):
        objs = [lab for lab, k in zip(labels, crowd) if not k]
        per_class.update(objs)
        if iid is not None:
            per_image.append(len(objs))
    lines = [
        f"  annotations {info['file']} (sha256 {info['sha256'][:12]}…)",
        f"    images    {c['annotated_images']} annotated, {c['images_without_entry']} without an "
        f"entry; {info['images_not_in_source']} image(s) of the file not in the source",
        f"    objects   {c['objects']} in {c['classes']} of {len(names)} classes, "
        f"{c['crowd']} crowd regions apart, {info['clipped_boxes']} boxes clipped to the image",
    ]
    if per_image:
        lines.append(f"    per image mean {np.mean(per_image):.1f}, max {max(per_image)}")
    for cid, n in per_class.most_common(5):
        lines.append(f"    {cid} ({names.get(cid, '?')}): {n}")

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines.append(
        f"  recall      @0.5 {f(r['recall@0.5'])}, @0.7 {f(r['recall@0.7'])}, AR@10 "
        f"{f(r['AR@10'])}, AR@100 {f(r['AR@100'])} ("
        + ", ".join(f"{k} {f(v['AR@100'])}" for k, v in r["by_size"].items() if v["objects"])
        + ")"
    )
    return lines
