"""The training half of ``make demo``: short MOS and UniVIP runs on the sample shards, then kNN.

Each run reads ``configs/demo_<method>_cpu.yaml`` (a tiny model, 30 steps; well under two
minutes on two cores) and writes ``OUT/<method>/``. Running it again resumes, i.e. finds the
runs finished and returns at once.

The evaluation uses labelled shards made from the handwritten digits that ship with
scikit-learn (1,797 scans of 8x8 pixels, 10 classes; upscaled to 32 px): they are written as
IDX files (the MNIST format) and built with ``shards build --layout idx``, the bank from the
first 1,000 and the queries from the other 797. Thirty steps on nineteen photographs teach a
model little: the figure shows that the whole path (shards, checkpoint, frozen features, kNN)
works, not what the methods reach (``ssl-cli bench quality`` measures that).
"""

from __future__ import annotations

import gzip
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import configs
from shards.atomic import atomic_write_bytes
from shards.build import build_shards
from shards.process import BuildParams
from train.config import load_yaml
from train.eval.classify import knn_eval
from train.loop import pretrain
from train.resolve import resolve_config

__all__ = [
    "DEMO_METHODS",
    "demo_config_path",
    "demo_evaluate",
    "demo_pretrain",
    "next_steps",
    "write_digits_idx",
]

DEMO_METHODS = ("mos", "univip")
CONFIGS = Path(configs.__file__).resolve().parent


def demo_config_path(method: str) -> Path:
    path = CONFIGS / f"demo_{method}_cpu.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo config {path} not found: the installed package is incomplete"
        )
    return path


def demo_pretrain(
    shards_dir: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = DEMO_METHODS,
    log: Callable[[str], None] = print,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict[str, dict]:
    """Pretrain each of ``methods`` on ``shards_dir`` into ``out_dir/<method>``; returns
    ``{method: {"checkpoint": ..., "first": first metrics line, "last": last one}}``.
    ``overrides``: a config layer applied last (e.g. ``{"schedule": {"steps": 4}}``)."""
    results = {}
    for method in methods:
        cfg = resolve_config(
            load_yaml(demo_config_path(method)),
            {
                "data": {"shards": str(shards_dir)},
                "run": {"out": str(Path(out_dir) / method), "progress": progress},
            },
            overrides or {},
        )
        log(f"--- {method}: {demo_config_path(method).name} -> {cfg.run.out}")
        result = pretrain(cfg, log=log)
        metrics = result["metrics"]
        results[method] = {
            "checkpoint": result["checkpoint"],
            "first": metrics[0] if metrics else None,
            "last": metrics[-1] if metrics else None,
        }
    return results


DIGITS_BANK = 1000  # digits 0..999 are the kNN memory bank ("train"), the rest the queries
DIGITS_SIDE = 32


def _idx_bytes(array) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000 0x08 ndim, big-endian int32 dims, data."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return head + array.tobytes()


def write_digits_idx(folder: str | Path) -> Path:
    """scikit-learn's bundled digits as a gzipped IDX file set in ``folder`` (idempotent).

    ``digits-train-*``: the first :data:`DIGITS_BANK` images, ``digits-test-*``: the rest;
    each 8x8 scan (0..16) is scaled to 0..255 and resized to 32x32 (bilinear)."""
    from PIL import Image

    try:
        import sklearn.datasets
    except ImportError as e:
        raise RuntimeError(
            f"the demo's kNN evaluation reads the digits shipped with scikit-learn: {e}; "
            "install the demo extra (pip install -e '.[demo]')"
        ) from None
    folder = Path(folder)
    names = [f"digits-{s}-{k}-idx{n}-ubyte.gz" for s in ("train", "test") for k, n in
             (("images", 3), ("labels", 1))]  # fmt: skip
    if all((folder / n).is_file() for n in names):
        return folder
    digits = sklearn.datasets.load_digits()
    scans = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(img).resize((DIGITS_SIDE, DIGITS_SIDE), Image.BILINEAR))
            for img in scans
        ]
    )
    labels = digits.target.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": slice(0, DIGITS_BANK), "test": slice(DIGITS_BANK, None)}
    for split, part in parts.items():
        for kind, arr in (("images", big[part]), ("labels", labels[part])):
            ndim = 3 if kind == "images" else 1
            path = folder / f"digits-{split}-{kind}-idx{ndim}-ubyte.gz"
            atomic_write_bytes(path, gzip.compress(_idx_bytes(arr), mtime=0))
    return folder


def demo_evaluate(
    out_dir: str | Path,
    checkpoints: dict[str, str | Path],
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> dict[str, dict]:
    """kNN (k = 20, T = 0.07) of each demo run's momentum encoder on the digits shards.

    Builds ``OUT/digits/{bank,queries}`` once (resumable like any build) and returns
    ``{method: knn report}``."""

    out_dir = Path(out_dir)
    idx = write_digits_idx(out_dir / "digits" / "idx")
    splits = {"bank": "train", "queries": "test"}
    shards = {}
    for name, split in splits.items():
        shards[name] = out_dir / "digits" / name
        build_shards(
            str(idx),
            shards[name],
            BuildParams(shard_size=256),
            layout="idx",
            split=split,
            workers=workers,
            progress=False,
            log=lambda _line: None,
        )
    log(
        f"--- kNN on the scikit-learn digits: bank {shards['bank']} ({DIGITS_BANK} images), "
        f"queries {shards['queries']} (797 images), 10 classes, chance 10%"
    )
    reports = {}
    for method, ckpt in checkpoints.items():
        report = knn_eval(ckpt, shards["bank"], shards["queries"], device="cpu", branch="auto")
        reports[method] = report
        log(
            f"{method}: kNN top-1 {report['top1']:.1f}%, top-5 {report['top5']:.1f}% "
            f"({report['branch']} encoder, step {report['step']})"
        )
    return reports


def cli_command() -> str:
    """How to call ssl-cli from here: ``ssl-cli`` when that is on PATH and is this install,
    else the path of this environment's script (``.venv/bin/ssl-cli`` after ``make demo``,
    whose venv is not activated), relative to the working directory when inside it."""
    script = Path(sys.executable).parent / "ssl-cli"
    found = shutil.which("ssl-cli")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "ssl-cli"
    if not script.exists():
        return "ssl-cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def next_steps(out_dir: str | Path) -> str:
    """What to run after the demo, with its real paths and a command that runs as printed."""
    out = Path(out_dir)
    shards, digits = out / "shards", out / "digits"
    cli = cli_command()
    steps = [
        (
            f"ssl-cli preview --data {shards} --method mos --out {out / 'preview.png'}",
            "the views",
        ),
        (
            f"ssl-cli plot {out / 'mos'} {out / 'univip'} --out {out / 'curves.png'}",
            "curves",
        ),
        (
            f"ssl-cli eval linear {out / 'univip'} --train {digits / 'bank'} "
            f"--val {digits / 'queries'}",
            "linear probe",
        ),
        (f"ssl-cli export {out / 'mos'} --format hf --out {out / 'mos_export'}", "export"),
        ("ssl-cli shards build IMAGES SHARDS", "your images"),
        ("ssl-cli pretrain --config configs/demo_mos_cpu.yaml --data SHARDS --out RUN", "then"),
    ]
    width = max(len(why) for _, why in steps) + 1
    lines = [f"  {why + ':':<{width}}  {cli}{cmd[len('ssl-cli') :]}" for cmd, why in steps]
    return "\n".join(["next steps:", *lines])
