"""``ssl-cli plot``: loss terms and evaluation accuracy of a run against steps.

A line of ``metrics.jsonl`` is plotted when it is a JSON object with a numeric, finite
``step``; any other line (no ``step``, ``"step": null`` or a string, not an object) is
skipped, counted, and said: in the log and in the figure's title.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_NOT_LOSSES = {"step", "epoch", "lr", "wd", "momentum", "images_per_s", "elapsed_s"}


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
    out = Metrics([], [])
    for n, line in enumerate(path.read_text().splitlines(), 1):
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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def plot_run(run_dir: str | Path, out: str | Path, log: Callable[[str], None] = _stderr) -> Path:
    """Total loss, each loss term, and eval accuracy (when logged) against steps, as a PNG.
    Lines without a numeric step are skipped and counted (``log`` and the title say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    train, evals = metrics.train, metrics.evals
    if metrics.skipped:
        log(f"{Path(run_dir) / 'metrics.jsonl'}: {metrics.skipped_note()}")
    steps = [r["step"] for r in train]
    terms: list[str] = []  # every numeric key of any training line, in first-seen order
    for r in train:
        terms += [k for k, v in r.items() if k not in _NOT_LOSSES and _number(v) and k not in terms]
    terms = ["loss"] + [t for t in terms if t != "loss"] if "loss" in terms else terms
    panels = len(terms) + (1 if evals else 0)
    if panels == 0:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no numeric loss terms to plot")
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, term in zip(flat, terms):
        pts = [(r["step"], r[term]) for r in train if _number(r.get(term))]
        ax.plot(*zip(*pts), lw=1.4, color="C0" if term == "loss" else "C1")
        ax.set_title("total loss" if term == "loss" else term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evals:
        ax = flat[len(terms)]
        for i, key in enumerate(sorted({k for r in evals for k in r if k.startswith("eval/")})):
            pts = [(r["step"], r[key]) for r in evals if _number(r.get(key))]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", lw=1.4, color=f"C{i + 2}", label=key[5:])
        ax.set_title("evaluation accuracy (%)")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.axis("off")
    title = f"{Path(run_dir).name}: {len(train)} logged steps, last step {max(steps)}"
    if metrics.skipped:
        title += f"; {len(metrics.skipped)} line(s) without a numeric step skipped"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
