"""``ssl-cli bench shards``: selective-search configurations against the ORL recipe, one run.

The ORL recipe runs selective search in fast mode on the full-resolution image and filters the
boxes in OpenCV's rank order. Every configuration runs on one core (``cv2.setNumThreads(1)``;
the build scales by processes) on the same images, decoded once up front, and is timed in CPU
seconds of this process (``time.process_time``): on a machine shared with other work, wall time
would count the time slices the other work gets; CPU time does not (caches and memory bandwidth
are still shared). A configuration's time is its search plus its proposal filter;
configurations that differ only in the filter share one run of the search. With ``rounds > 1``
every search (and filter) is timed that many times, the searches in alternating order (forward,
then backward), and the fastest round counts, as ``timeit`` advises: noise only adds time.

Two measures of the boxes:

- against ground truth (``annotations``: a COCO detection file of the source's images, matched
  to them as the build matches it): recall at IoU 0.5 and 0.7, AR@10, AR@100 and AR by object
  size, the procedure of :func:`shards.recall.proposal_recall`;
- against the ORL recipe under the same filter thresholds: the fraction of its boxes that have
  IoU >= 0.5 with one of ours. The ORL recipe runs a second time with OpenCV's rank order
  reseeded; its recall against the first run is the ceiling of this measure, and its
  ground-truth figures show how far the figures move by the random rank order alone.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from shards.atomic import atomic_write_bytes

from .annotations import ImageTruth, load_annotations
from .images import ImageParams, RejectedImage, decode_image
from .proposals import FilterParams, SearchParams, box_iou, filter_boxes, load_cv2, selective_search
from .recall import proposal_recall
from .sources import open_source, printable
from .sysinfo import cpu_model

# UniVIP §3.2 / ORL: fast mode at full resolution, boxes in OpenCV's rank order.
ORL_RECIPE = SearchParams(
    mode="fast", max_side=0, base_k=150, min_segment=100, scale_segment=False, upsample=False
)
RESEEDED = "/reseeded"  # appended to every key: another srand() seed, another rank order
_SHOWN = 5  # images named in one error message


class BenchError(ValueError):
    """The benchmark cannot run on this input (no usable image, ground truth that disagrees)."""


@dataclass(frozen=True)
class Contestant:
    """One configuration of the run: a search and the filter applied to its boxes."""

    name: str
    search: SearchParams
    filter: FilterParams


@dataclass
class BenchImages:
    """The decoded images of a run (``rgb[i]`` is ``[H, W, 3]`` uint8) and their ground truth."""

    keys: list[str]
    rgb: list[np.ndarray]
    truth: list[ImageTruth] | None  # None: no annotation file
    notes: dict[str, int]  # what was left out, by reason -> count
    annotations: dict | None = None  # the file's path and sha256


def hardware() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def orl_filter(fparams: FilterParams) -> FilterParams:
    """The ORL recipe's filter at the thresholds of ``fparams``: boxes in the search's rank order."""
    return replace(fparams, rank=FilterParams.ORL_RANK)


def sweep(
    search: SearchParams = SearchParams(),
    filter: FilterParams = FilterParams(),
    **values: Iterable,
) -> list[tuple[SearchParams, FilterParams]]:
    """Every combination of ``values`` (field name -> the values to try, of :class:`SearchParams`
    or :class:`FilterParams`) on top of ``search`` and ``filter``; an empty iterable keeps the
    base value. The first field varies slowest. Duplicates are dropped, order kept."""
    search_fields = {f.name for f in dataclasses.fields(SearchParams)}
    filter_fields = {f.name for f in dataclasses.fields(FilterParams)}
    axes = []
    for name, vals in values.items():
        if name not in search_fields | filter_fields:
            raise ValueError(f"{name!r} is a field of neither SearchParams nor FilterParams")
        vals = list(vals)
        if vals:
            axes.append((name, vals))
    out: list[tuple[SearchParams, FilterParams]] = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        s_kw = {n: v for (n, _), v in zip(axes, combo) if n in search_fields}
        f_kw = {n: v for (n, _), v in zip(axes, combo) if n in filter_fields}
        pair = (replace(search, **s_kw), replace(filter, **f_kw))
        if pair not in out:
            out.append(pair)
    return out


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_sweep(items: Iterable[str]) -> dict[str, list]:
    """``["NAME=V1,V2", ...]`` -> ``{NAME: [V1, V2]}``: fields of :class:`SearchParams` or
    :class:`FilterParams`, each value parsed as the field's type (``int``, ``float``, ``str``;
    ``bool``: true/false, yes/no, on/off, 1/0). Raises ``ValueError`` naming the item."""
    types = {
        f.name: str(f.type) for cls in (SearchParams, FilterParams) for f in dataclasses.fields(cls)
    }
    out: dict[str, list] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise ValueError(f"--sweep {item!r}: expected NAME=VALUE[,VALUE...]")
        if name not in types:
            raise ValueError(
                f"--sweep {item!r}: unknown parameter {name!r}; one of {sorted(types)}"
            )
        if name in out:
            raise ValueError(f"--sweep {item!r}: {name} given twice; list its values in one")
        values = []
        for v in (x.strip() for x in raw.split(",")):
            try:
                if types[name] == "bool":
                    if v.lower() not in _TRUE + _FALSE:
                        raise ValueError("not a boolean")
                    values.append(v.lower() in _TRUE)
                else:
                    values.append({"int": int, "float": float, "str": str}[types[name]](v))
            except ValueError as e:
                raise ValueError(f"--sweep {item!r}: {v!r} is not a {types[name]} ({e})") from None
        out[name] = values
    return out


def _values(search: SearchParams, fparams: FilterParams) -> dict:
    return {**dataclasses.asdict(search), **dataclasses.asdict(fparams)}


def describe(
    search: SearchParams, fparams: FilterParams, fields: Iterable[str] | None = None
) -> str:
    """A short label: the values of ``fields`` (default: every value that differs from the
    build's defaults; ``"default"`` when none does)."""
    values = _values(search, fparams)
    if fields is None:
        default = _values(SearchParams(), FilterParams())
        fields = [k for k, v in values.items() if v != default[k]]
    return ", ".join(f"{k}={values[k]}" for k in fields) or "default"


def varying(configs: Sequence[tuple[SearchParams, FilterParams]]) -> list[str]:
    """The parameter names whose values differ between ``configs``."""
    values = [_values(*c) for c in configs]
    return [k for k in values[0] if len({repr(v[k]) for v in values}) > 1]


def load_images(
    src: str,
    limit: int | None = None,
    annotations: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> BenchImages:
    """Decode the images of ``src`` once (EXIF-oriented, as the build stores them).

    With ``annotations`` only the images with an entry in the file are used, and every one
    whose decoded size differs from the file's is a :class:`BenchError` naming them (the truth
    would be in another pixel frame). ``limit`` keeps the first ``limit`` images used.
    Images that cannot be read or decoded are left out and counted in ``notes``.
    """
    source = open_source(src)
    items = [it for it in source.items if it.reject is None]
    notes: dict[str, int] = {}
    if len(items) < len(source.items):
        notes["rejected_while_listing"] = len(source.items) - len(items)
    truth: list[ImageTruth] | None = None
    info = None
    if annotations is not None:
        gt = load_annotations(annotations)
        matched = gt.match(items, source.root)
        pairs = [(it, t) for it, t in zip(items, matched) if t is not None]
        if not pairs:
            raise BenchError(
                f"{annotations}: no image of the file is in {src} (file_name is matched to the "
                "path relative to SRC, or to the base name)"
            )
        if len(pairs) < len(items):
            notes["no_entry_in_annotations"] = len(items) - len(pairs)
        if gt.unmatched_images:
            notes["annotated_but_not_in_source"] = len(gt.unmatched_images)
        items = [it for it, _ in pairs]
        truth = [t for _, t in pairs]
        info = {"file": str(annotations), "sha256": gt.sha256}
    if limit is not None:
        items = items[:limit]
        truth = truth[:limit] if truth is not None else None
    # The bench measures every image it can decode; which are too small for the build is the
    # build's --min-image-side, not a property of the search.
    params = ImageParams(min_side=1)
    keys, rgbs, kept_truth, mismatched = [], [], [], []
    for n, item in enumerate(items):
        try:
            rgb = decode_image(item.read(params.max_file_bytes), params).rgb
        except (RejectedImage, OSError) as e:
            reason = e.reason if isinstance(e, RejectedImage) else "unreadable"
            notes[reason] = notes.get(reason, 0) + 1
            continue
        if truth is not None:
            t = truth[n]
            if (t.width, t.height) != (rgb.shape[1], rgb.shape[0]):
                mismatched.append(
                    f"{printable(item.source)} is {rgb.shape[1]}x{rgb.shape[0]} decoded, "
                    f"{t.width}x{t.height} in the file (image id {t.image_id})"
                )
                continue
            kept_truth.append(t)
        keys.append(item.key)
        rgbs.append(rgb)
    if mismatched:
        more = f"; and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        raise BenchError(
            f"{annotations}: {len(mismatched)} image(s) differ in size from the annotation file "
            f"(the boxes would be in another pixel frame): {'; '.join(mismatched[:_SHOWN])}{more}"
        )
    if not keys:
        raise BenchError(f"{src}: no usable images to benchmark")
    for reason, count in notes.items():
        log(f"left out: {count} image(s), {reason.replace('_', ' ')}")
    return BenchImages(keys, rgbs, kept_truth if truth is not None else None, notes, info)


def _search_all(images: BenchImages, params: SearchParams, suffix: str = "") -> tuple[float, list]:
    start = time.process_time()
    out = [selective_search(rgb, params, key=k + suffix) for k, rgb in zip(images.keys, images.rgb)]
    return time.process_time() - start, out


def _filter_all(raw: list[np.ndarray], fparams: FilterParams) -> tuple[float, list]:
    start = time.process_time()
    out = [filter_boxes(boxes, fparams) for boxes in raw]
    return time.process_time() - start, out


def orl_recall(reference: list[np.ndarray], ours: list[np.ndarray], thr: float = 0.5) -> float:
    """The fraction of ``reference``'s boxes (all images) with IoU >= ``thr`` with one of ours."""
    hit = total = 0
    for ref, mine in zip(reference, ours):
        total += len(ref)
        if len(ref) and len(mine):
            hit += int((box_iou(ref, mine).max(axis=1) >= thr).sum())
    return hit / total if total else float("nan")


def run_bench(
    images: BenchImages,
    configs: Sequence[tuple[SearchParams, FilterParams]],
    rounds: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time and score the ORL recipe and each of ``configs`` on ``images``; one row each.

    A row: ``name`` (``ORL recipe``, ``ORL recipe, reseeded`` or ``ours``), ``label``,
    ``search`` and ``filter`` (every parameter), ``seconds`` (search + filter, fastest round),
    ``images_per_s_per_core``, ``speedup_vs_orl`` (against the ORL row of the same filter
    thresholds), ``boxes_per_image``, ``orl_recall`` and ``orl_ceiling`` (see the module
    docstring) and, with ground truth, ``gt``: :func:`shards.recall.proposal_recall`'s report.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    load_cv2().setNumThreads(1)
    orl_filters = list(dict.fromkeys(orl_filter(f) for _, f in configs))
    searches = [(ORL_RECIPE, ""), (ORL_RECIPE, RESEEDED)]
    searches += [(s, "") for s in dict.fromkeys(s for s, _ in configs)]
    searches = list(dict.fromkeys(searches))
    filters_of: dict[tuple[SearchParams, str], list[FilterParams]] = {s: [] for s in searches}
    for f in orl_filters:
        filters_of[(ORL_RECIPE, "")].append(f)
        filters_of[(ORL_RECIPE, RESEEDED)].append(f)
    for s, f in configs:
        if f not in filters_of[(s, "")]:
            filters_of[(s, "")].append(f)

    search_s = {s: float("inf") for s in searches}
    filter_s: dict[tuple, float] = {}
    raw: dict[tuple[SearchParams, str], list[np.ndarray]] = {}
    boxes: dict[tuple, list[np.ndarray]] = {}
    for s in searches:  # untimed: the first call of a process pays for loading and caches
        _search_all(replace(images, keys=images.keys[:1], rgb=images.rgb[:1]), *s)
    for r in range(rounds):
        order = searches if r % 2 == 0 else searches[::-1]
        for s in order:
            t, out = _search_all(images, *s)
            search_s[s] = min(search_s[s], t)
            raw.setdefault(s, out)
            for f in filters_of[s]:
                t, kept = _filter_all(raw[s], f)
                filter_s[(s, f)] = min(filter_s.get((s, f), float("inf")), t)
                boxes.setdefault((s, f), kept)
        if rounds > 1:
            log(f"round {r + 1}/{rounds} timed")

    n = len(images.keys)

    def seconds(s, f) -> float:
        return search_s[s] + filter_s[(s, f)]

    def row(name: str, s, f, orl_f: FilterParams) -> dict:
        orl_key = ((ORL_RECIPE, ""), orl_f)
        mine = boxes[(s, f)]
        out = {
            "name": name,
            "label": name if name.startswith("ORL") else describe(s[0], f, fields),
            "search": dataclasses.asdict(s[0]),
            "filter": dataclasses.asdict(f),
            "seconds": seconds(s, f),
            "images_per_s_per_core": n / seconds(s, f),
            "speedup_vs_orl": seconds(*orl_key) / seconds(s, f),
            "boxes_per_image": float(np.mean([len(b) for b in mine])),
            "orl_recall": orl_recall(boxes[orl_key], mine),
            "orl_ceiling": orl_recall(boxes[orl_key], boxes[((ORL_RECIPE, RESEEDED), orl_f)]),
        }
        if images.truth is not None:
            out["gt"] = proposal_recall(
                mine,
                [t.boxes for t in images.truth],
                [t.crowd for t in images.truth],
                [t.areas for t in images.truth],
            )
        return out

    fields = varying(configs) if len(configs) > 1 else None
    rows = []
    for f in orl_filters:
        rows.append(row("ORL recipe", (ORL_RECIPE, ""), f, f))
        rows.append(row("ORL recipe, reseeded", (ORL_RECIPE, RESEEDED), f, f))
    for s, f in configs:
        rows.append(row("ours", (s, ""), f, orl_filter(f)))
    return rows


def bench_search(
    src: str,
    configs: Sequence[tuple[SearchParams, FilterParams]] = ((SearchParams(), FilterParams()),),
    limit: int | None = None,
    annotations: str | os.PathLike | None = None,
    rounds: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Decode the images of ``src`` once, then time and score the ORL recipe and every one of
    ``configs`` (pairs of search and filter parameters; :func:`sweep` makes them) on them.
    Returns a JSON-able report; ``log`` gets a table."""
    if not configs:
        raise ValueError("no configuration to benchmark")
    cv2 = load_cv2()
    images = load_images(src, limit=limit, annotations=annotations, log=log)
    sizes = np.array([rgb.shape[:2] for rgb in images.rgb])
    median = [int(np.median(sizes[:, 1])), int(np.median(sizes[:, 0]))]
    objects = sum(int((~t.crowd).sum()) for t in images.truth) if images.truth is not None else None
    log(
        f"{len(images.keys)} images, median {median[0]}x{median[1]} px"
        + (f", {objects} objects (not crowd) in {annotations}" if objects is not None else "")
    )
    vary = varying(configs) if len(configs) > 1 else []
    fixed = [k for k in describe(*configs[0]).split(", ") if k.split("=")[0] not in vary]
    log(
        f"ours: {len(configs)} configuration(s)"
        + (f" varying {', '.join(vary)}" if vary else "")
        + "; other parameters: the build's defaults"
        + (f" but {', '.join(fixed)}" if fixed and fixed != ["default"] else "")
    )
    if images.truth is not None:
        smallest = min(f.min_side for _, f in configs)
        sides = np.concatenate(
            [np.minimum(t.boxes[:, 2] - t.boxes[:, 0], t.boxes[:, 3] - t.boxes[:, 1])
             for t in images.truth]
        )  # fmt: skip
        under = int((sides < smallest).sum())
        if under > len(sides) // 2:
            log(
                f"note: {under} of {len(sides)} ground-truth boxes have a side under the "
                f"minimum box side {smallest}: no kept box can match them (--min-box-side)"
            )
    rows = run_bench(images, configs, rounds=rounds, log=log)
    for line in format_table(rows):
        log(line)
    report = {
        "source": src,
        "images": len(images.keys),
        "median_size": median,
        "left_out": images.notes,
        "rounds": rounds,
        "hardware": hardware(),
        "opencv": cv2.__version__,
        "rows": rows,
    }
    if images.annotations is not None:
        report["annotations"] = {**images.annotations, "objects": objects}
    return report


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> list[str]:
    """The report's rows as an aligned text table (ground-truth columns when present)."""
    gt = any("gt" in r for r in rows)
    head = ["configuration", "img/s/core", "vs ORL"]
    if gt:
        head += ["R@0.5", "R@0.7", "AR@10", "AR@100", "AR S/M/L"]
    head += ["boxes", "ORL recall (ceiling)"]
    lines = [head]
    for r in rows:
        name = r["name"] if r["name"] != "ours" else r["label"]
        cells = [name, f"{r['images_per_s_per_core']:.2f}", f"{r['speedup_vs_orl']:.2f}x"]
        if gt:
            g = r["gt"]
            sizes = "/".join(_fmt(g["by_size"][k]["AR@100"], ".2f") for k in g["by_size"])
            cells += [
                _fmt(g["recall@0.5"]),
                _fmt(g["recall@0.7"]),
                _fmt(g["AR@10"]),
                _fmt(g["AR@100"]),
                sizes,
            ]
        cells += [f"{r['boxes_per_image']:.1f}", f"{r['orl_recall']:.3f} ({r['orl_ceiling']:.3f})"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]


def plot_bench(report: dict, out: str | os.PathLike, title: str | None = None) -> None:
    """A PNG of AR@100 against images/s per core (log scale), one numbered point per row of
    ``report`` (a :func:`bench_search` report with ground truth) and a key of the numbers,
    written atomically. ``title``: default, the images and the CPU."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in report["rows"] if "gt" in r and r["gt"]["AR@100"] is not None]
    if not rows:
        raise BenchError("the plot needs ground truth (--annotations)")
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    lines = []
    for n, r in enumerate(rows, 1):
        orl = r["name"].startswith("ORL")
        x, y = r["images_per_s_per_core"], r["gt"]["AR@100"]
        ax.scatter(x, y, marker="s" if orl else "o", color="tab:red" if orl else "tab:blue", s=28)
        ax.annotate(str(n), (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        lines.append(f"{n:>2}  {r['label']}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("images/s per core (log scale)")
    ax.set_ylabel("AR@100 against ground truth")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(
        title or f"{report['images']} images, {report['hardware'].split(',')[0]}", fontsize=9
    )
    key.axis("off")
    key.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
