"""``ssl-cli plot``: loss terms, learning rate and evaluation accuracy of runs against steps.

One run or several in one figure (one colour per run, a legend of the run names). A line of
``metrics.jsonl`` is plotted when it is a JSON object with a numeric, finite ``step``; any
other line (no ``step``, ``"step": null`` or a string, not an object) is skipped, counted, and
said: in the log and in the figure's title.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NOT_LOSSES = {
    "step",
    "epoch",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "freeze_last_layer",
    "images_per_s",
    "elapsed_s",
}
_MARKERS = ("o", "^", "D", "v", "P", "X")  # one per evaluation family (knn, knn_online, ...)
# the loss terms' names as the papers say them (titles of their panels)
TERM_NAMES = {
    "m2s": "multi-to-single (MOS eq. 11)",
    "m2m": "multi-to-multi (MOS eq. 12)",
    "s2s": "single-to-single (MOS eq. 13)",
    "scene": "scene-scene (UniVIP eq. 3)",
    "scene_instance": "scene-instance (UniVIP eq. 6)",
    "instance": "instance-instance (UniVIP eq. 11)",
}


def _number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]
    )


@dataclass
class Metrics:
    """The plottable lines of ``metrics.jsonl`` and the line numbers of the skipped ones."""

    train: list[dict]
    evals: list[dict]
    skipped: list[int] = field(default_factory=list)

    def __iter__(self):  # ``train, evals = read_metrics(run)``
        return iter((self.train, self.evals))

    def skipped_note(self) -> str:
        if not self.skipped:
            return ""
        shown = ", ".join(map(str, self.skipped[:5])) + (", ..." if len(self.skipped) > 5 else "")
        return f"{len(self.skipped)} line(s) without a numeric step skipped (line {shown})"


def read_metrics(run_dir: str | Path) -> Metrics:
    """(training lines, evaluation lines) of ``RUN/metrics.jsonl``, unpackable as a pair;
    ``.skipped``: numbers of the lines that are not an object with a numeric ``step``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a pretraining run directory")
    lines = path.read_text().splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty: no training steps logged yet")
    out = Metrics([], [])
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(record, dict) or not _number(record.get("step")):
            out.skipped.append(n)
            continue
        (out.evals if any(k.startswith("eval/") for k in record) else out.train).append(record)
    if not out.train:
        note = f" ({out.skipped_note()})" if out.skipped else ""
        raise ValueError(f"{path}: no training steps logged yet{note}")
    return out


def read_eval_reports(run_dir: str | Path) -> list[dict]:
    """The ``ssl-cli eval`` reports of a run (``RUN/eval/*.json``) as points: ``step``,
    ``label`` (``knn target``, ``linear online``, ...) and ``top1``; unreadable files and
    reports without a top-1 are left out."""
    points = []
    for path in sorted((Path(run_dir) / "eval").glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or not _number(report.get("step")):
            continue
        kind = report.get("eval", path.stem.split("-")[0])
        branches = report.get("branches") or {report.get("branch", ""): report}
        for branch, values in branches.items():
            if isinstance(values, dict) and _number(values.get("top1")):
                label = f"{kind} {branch}".strip()
                points.append({"step": report["step"], "label": label, "top1": values["top1"]})
    return points


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Legend names of run folders: the folder's name, widened to ``parent/name`` (and further
    up) where two different runs share it; the same folder given twice is numbered ``name (2)``."""
    paths = [Path(r).resolve() for r in runs]
    depth = [1] * len(paths)

    def name(i: int) -> str:
        return str(Path(*paths[i].parts[-depth[i] :]))

    widened = True
    while widened:
        widened = False
        names = [name(i) for i in range(len(paths))]
        for i, p in enumerate(paths):
            clash = any(names[j] == names[i] and paths[j] != p for j in range(len(paths)))
            if clash and depth[i] < len(p.parts):
                depth[i] += 1
                widened = True
    names = [name(i) for i in range(len(paths))]
    out = []
    for i, n in enumerate(names):
        k = names[:i].count(n)
        out.append(n if k == 0 else f"{n} ({k + 1})")
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _eval_style(key: str) -> tuple[str, str]:
    """(family, ``top1``/``top5``/other) of an ``eval/...`` key: ``eval/knn_online_top5`` ->
    (``knn_online``, ``top5``)."""
    family, _, kind = key[5:].rpartition("_")
    return (family, kind) if family else (key[5:], "")


def _draw_eval(ax: Any, evals: list[dict], colour: str | None, name: str, order: dict) -> None:
    """Evaluation accuracies of one run: top-5 dashed, thin and hollow underneath, top-1 solid
    on top with filled markers, so that equal curves stay visible; a marker shape per family
    (``order``: family -> index, shared by the runs). ``colour`` None: one colour per family
    (a single run)."""
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in evals if _number(r.get(key))]
        if not pts:
            continue
        family, kind = _eval_style(key)
        f = order.setdefault(family, len(order))
        c = colour or f"C{(f + 2) % 10}"
        marker = _MARKERS[f % len(_MARKERS)]
        top5 = kind == "top5"
        ax.plot(
            *zip(*pts),
            color=c,
            marker=marker,
            ls="--" if top5 else "-",
            lw=1.0 if top5 else 1.8,
            ms=8 if top5 else 4.5,
            mfc="none" if top5 else c,
            zorder=2 if top5 else 3,
            clip_on=False,  # a 100 % curve is drawn whole on the axis' top edge
            label=key[5:],
            gid=f"{name} {key[5:]}",
        )


def curves_figure(runs: Sequence[str | Path], log: Callable[[str], None] = _stderr) -> Any:
    """The matplotlib Figure of :func:`plot_runs` (not saved): a panel per loss term (total loss
    first; the union over the runs), one of the learning rate, one of evaluation accuracy
    (0-100 %) when a run logged one; one colour per run, a figure legend of the run names when
    there are several. Panels carry their title (``total loss``, a term, ``learning rate``,
    ``evaluation accuracy (%)``); a line's ``gid`` is its run's name (:func:`run_names`), then
    the evaluation key on the accuracy panel (``NAME knn_top1``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not runs:
        raise ValueError("no run to plot")
    names = run_names(runs)
    metrics = [read_metrics(r) for r in runs]
    for run, m in zip(runs, metrics):
        if m.skipped:
            log(f"{Path(run) / 'metrics.jsonl'}: {m.skipped_note()}")
    terms = _loss_terms(metrics)
    has_lr = any(_number(r.get("lr")) for m in metrics for r in m.train)
    reports = [read_eval_reports(r) for r in runs]
    has_eval = any(m.evals for m in metrics) or any(reports)
    if not terms and not has_eval:
        where = ", ".join(str(Path(r) / "metrics.jsonl") for r in runs)
        raise ValueError(f"{where}: no numeric loss terms to plot")
    panels = len(terms) + has_lr + has_eval
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        fig.delaxes(ax)
    several = len(runs) > 1
    colours = [f"C{i % 10}" for i in range(len(runs))]

    def line(ax, pts, i):  # one run's curve, in its colour; a lone point as a marker
        marker = "o" if len(pts) < 3 else None
        ax.plot(*zip(*pts), lw=1.4, color=colours[i], marker=marker, ms=5, gid=names[i])

    for ax, term in zip(flat, terms):
        for i, m in enumerate(metrics):
            pts = [(r["step"], r[term]) for r in m.train if _number(r.get(term))]
            if pts:
                line(ax, pts, i)
        name = TERM_NAMES.get(term)
        ax.set_title("total loss" if term == "loss" else f"{term} = {name}" if name else term)
    if has_lr:
        _lr_panel(flat[len(terms)], metrics, line)
    if has_eval:
        _eval_panel(flat[len(terms) + has_lr], metrics, reports, colours, names)
    for ax in flat[:panels]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    if several:
        fig.legend(
            handles=[Line2D([], [], color=c, lw=2, label=n) for c, n in zip(colours, names)],
            loc="lower center",
            ncol=min(len(runs), 4),
            frameon=False,
        )
        last = ", ".join(f"{n} {max(r['step'] for r in m.train)}" for n, m in zip(names, metrics))
        title = f"{len(runs)} runs; last step: {last}"
    else:
        steps = [r["step"] for r in metrics[0].train]
        title = f"{names[0]}: {len(steps)} logged steps, last step {max(steps)}"
    skipped = sum(len(m.skipped) for m in metrics)
    if skipped:
        title += f"; {skipped} line(s) without a numeric step skipped"
    fig.suptitle(title, fontsize="medium" if several else "large")
    legend_rows = (len(runs) + 3) // 4 if several else 0  # room for the run legend underneath
    fig.tight_layout(rect=(0, min(0.4, 0.32 * legend_rows / (3.2 * rows)), 1, 1))
    return fig


def _loss_terms(metrics: Sequence[Any]) -> list[str]:
    """Every numeric key of any run's training lines that is a loss term, in first-seen order,
    the total ``loss`` first."""
    terms: list[str] = []
    for m in metrics:
        for r in m.train:
            terms += [
                k for k, v in r.items() if k not in _NOT_LOSSES and _number(v) and k not in terms
            ]
    return ["loss"] + [t for t in terms if t != "loss"] if "loss" in terms else terms


def _lr_panel(ax: Any, metrics: Sequence[Any], line: Callable) -> None:
    """The learning rate of every run; on a log scale when each run has a positive value (runs
    of other batch sizes differ by orders of magnitude; warm-up's 0 drops off the scale)."""
    positive = True
    for i, m in enumerate(metrics):
        pts = [(r["step"], r["lr"]) for r in m.train if _number(r.get("lr"))]
        if pts:
            line(ax, pts, i)
            positive &= any(v > 0 for _, v in pts)
    ax.set_title("learning rate (log scale)" if positive else "learning rate")
    if positive:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _eval_panel(
    ax: Any,
    metrics: Sequence[Any],
    reports: Sequence[list[dict]],
    colours: Sequence[str],
    names: Sequence[str],
) -> None:
    """Evaluation accuracy (0-100 %): the kNN lines logged during training (one style per
    family, top-5 dashed) and the ``ssl-cli eval`` reports as labelled stars. Several runs: a
    legend of the styles in grey (the colours are the runs, in the figure legend); one run: a
    legend of its curves by name."""
    from matplotlib.lines import Line2D

    order: dict[str, int] = {}
    for i, m in enumerate(metrics):
        if m.evals:
            _draw_eval(ax, m.evals, colours[i], names[i], order)
    for i, points in enumerate(reports):
        for p in points:
            ax.plot(p["step"], p["top1"], marker="*", ms=12, color=colours[i], ls="none",
                    zorder=4, clip_on=False, gid=f"{names[i]} {p['label']}")  # fmt: skip
            ax.annotate(p["label"], (p["step"], p["top1"]), textcoords="offset points",
                        xytext=(4, -10), fontsize="x-small", color=colours[i])  # fmt: skip
    ax.set_ylim(0, 100)
    ax.set_title("evaluation accuracy (%)")
    if len(metrics) > 1:
        styles = (("top1", "-", 1.8, "grey"), ("top5", "--", 1.0, "none"))
        handles = [
            Line2D(
                [],
                [],
                color="grey",
                ls=ls,
                lw=lw,
                marker=_MARKERS[f],
                mfc=mfc,
                label=f"{family}_{kind}",
            )  # fmt: skip
            for family, f in order.items()
            for kind, ls, lw, mfc in styles
        ]
        ax.legend(handles=handles, fontsize="small", loc="lower right")
    else:
        curves = [h for h in ax.get_lines() if h.get_marker() != "*"]
        if curves:
            ax.legend(handles=curves, loc="lower right")


def plot_runs(
    runs: Sequence[str | Path], out: str | Path, log: Callable[[str], None] = _stderr
) -> Path:
    """:func:`curves_figure` of ``runs`` written as a PNG to ``out``; returns ``out``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(runs, log)
    try:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path, log: Callable[[str], None] = _stderr) -> Path:
    """Total loss, each loss term, the learning rate and eval accuracy (when logged) of one run
    against steps, as a PNG. Lines without a numeric step are skipped and counted (``log`` and
    the title say so)."""
    return plot_runs([run_dir], out, log)
