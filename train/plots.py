"""``ssl-cli plot``: loss terms and evaluation accuracy of a run against steps."""

from __future__ import annotations

import json
from pathlib import Path

_NOT_LOSSES = {"step", "epoch", "lr", "wd", "momentum", "images_per_s", "elapsed_s"}


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of ``RUN/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a pretraining run directory")
    train, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        (evals if any(k.startswith("eval/") for k in record) else train).append(record)
    if not train:
        raise ValueError(f"{path}: no training steps logged yet")
    return train, evals


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Total loss, each loss term, and eval accuracy (when logged) against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    terms = [k for k in train[0] if k not in _NOT_LOSSES and isinstance(train[0][k], (int, float))]
    terms = ["loss"] + [t for t in terms if t != "loss"] if "loss" in terms else terms
    panels = len(terms) + (1 if evals else 0)
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, term in zip(flat, terms):
        ax.plot(steps, [r.get(term) for r in train], lw=1.4, color="C0" if term == "loss" else "C1")
        ax.set_title("total loss" if term == "loss" else term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evals:
        ax = flat[len(terms)]
        for i, key in enumerate(sorted({k for r in evals for k in r if k.startswith("eval/")})):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), marker="o", lw=1.4, color=f"C{i + 2}", label=key[5:])
        ax.set_title("evaluation accuracy (%)")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).name}: {len(train)} logged steps, last step {steps[-1]}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
