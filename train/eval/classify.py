"""Frozen-backbone evaluation of a checkpoint: weighted kNN (DINO) and two linear probe protocols.

:func:`knn_eval` and :func:`linear_eval` run the maths of :mod:`train.eval.probes` on a checkpoint's
backbone(s) over labelled shards (centre-crop features from the DALI eval loader,
:mod:`train.eval.features`) and write a JSON report into the run (``ssl-cli eval``). The branch
defaults to ``auto``: the momentum (target) encoder when the checkpoint has one
(:func:`train.eval.features.resolve_branches`); ``both`` evaluates the online and the target
backbone and reports the two.

The maths (:func:`knn_classify`, :func:`knn_accuracy`, :func:`train_linear_probe`,
:func:`train_paper_probe`, ...) lives in :mod:`train.eval.probes` and is importable from here too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.eval import EvalLoader, ProbeTrainLoader
from shards.atomic import atomic_write_json
from train.distributed import barrier, cleanup_distributed, init_distributed
from train.eval.features import extract_features, fit_input_size, load_backbones, split_features
from train.eval.probes import (
    LinearProbeConfig,
    PaperProbeConfig,
    knn_accuracy,
    probe_accuracy,
    probe_loss,
    train_linear_probe,
    train_paper_probe,
)
from train.runinfo import run_info

PROTOCOLS = ("fast", "paper")  # linear probe protocols (docs/evaluation.md)


# ------------------------------------------------------------------- checkpoints on shards


def report_path(checkpoint: str | Path, kind: str, step: int, branch: str = "online") -> Path:
    """Where the report of ``kind`` ("knn", "linear") goes: ``RUN/eval/KIND-step-N.json`` for
    ``RUN/checkpoints/step-N.pt`` and the online branch, ``KIND-target-step-N.json`` for the
    momentum (target) branch, ``KIND-both-step-N.json`` for both in one report; beside the file
    in an ``eval/`` folder for a checkpoint outside a run directory. ``branch`` is a resolved
    name (``auto`` is resolved before, :func:`train.eval.features.resolve_branches`)."""
    if branch == "auto":
        raise ValueError("report_path needs a resolved branch (online, target or both)")
    ckpt = Path(checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = kind if branch == "online" else f"{kind}-{branch}"
    return run / "eval" / f"{name}-step-{step:08d}.json"


# Report keys that belong to one branch (under "branches" in a --branch both report); the
# other keys (counts, hyper-parameters, shards) are the same for both and stay at the top.
BRANCH_KEYS = (
    "top1",
    "top5",
    "best_top1",
    "train_top1",
    "train_loss",
    "val_loss",
    "history",
    "elapsed_s",
)


@dataclass
class _Setup:
    """What every branch's computation shares: the process, the input size, the extraction."""

    info: Any
    size: int
    batch_size: int
    num_threads: int | None
    precision: str
    progress: bool

    @property
    def cuda(self) -> bool:
        return self.info.device.type == "cuda"

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        if self.precision != "bf16":
            return None
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def extract(self, backbone: nn.Module, shards: str | Path):
        """Centre-crop features of every sample of ``shards`` (every rank gets all, in order)."""

        with EvalLoader(
            shards,
            size=self.size,
            batch_size=self.batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            device=str(self.info.device),
            num_threads=self.num_threads,
        ) as loader:
            return extract_features(
                backbone,
                loader,
                self.autocast,
                channels_last=self.cuda,
                progress=self.progress and self.info.is_main,
            )


def _check_split(train, val, val_fraction: float | None):
    """``val`` for a split: ``None`` or the same folder as ``train`` (``ValueError`` else)."""
    if val_fraction is None:
        if val is None:
            raise ValueError("no --val shards: give --val, or --val-fraction to split --train")
        return val
    if val is not None and Path(val).resolve() != Path(train).resolve():
        raise ValueError("--val-fraction splits --train into bank and queries: drop --val")
    return None


def _bank_and_queries(setup, backbone, train, val, val_fraction):
    """The bank and the queries: two shard sets, or one cut by ``val_fraction``."""

    if val_fraction is None:
        return setup.extract(backbone, train), setup.extract(backbone, val)
    return split_features(setup.extract(backbone, train), val_fraction)


def _free_report_path(path: Path, report: dict) -> Path:
    """``path``, unless it holds the report of the same step on other data: then a name with
    the data in it (``KIND-...-step-N-on-VAL-HASH.json``), so that evaluations of one
    checkpoint on different shards do not overwrite each other."""

    data = {k: report.get(k) for k in ("train", "val", "val_fraction")}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return path
    if not isinstance(old, dict) or {k: old.get(k) for k in data} == data:
        return path
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    val = Path(str(data["val"] or data["train"])).name or "data"
    return path.with_name(f"{path.stem}-on-{val}-{digest}{path.suffix}")


def _label_warning(bank, queries) -> str | None:
    """A warning when queries carry labels the bank (or the probe's training set) never has:
    those queries cannot be right, and disjoint label sets make the score meaningless."""
    bank_labels = set(bank.labels.unique().tolist())
    missing = ~torch.isin(
        queries.labels,
        torch.tensor(sorted(bank_labels), dtype=queries.labels.dtype, device=queries.labels.device),
    )
    n = int(missing.sum())
    if n == 0:
        return None
    classes = sorted(set(queries.labels[missing].tolist()))
    shown = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
    if n == len(queries):
        return (
            f"--train and --val share no label: none of the {len(queries)} queries' classes "
            f"({shown}) is in the training shards, so the score means nothing"
        )
    return (
        f"{n} of {len(queries)} queries have a label the training shards lack ({shown}): they "
        "cannot be classified right"
    )


def _shared(bank, queries) -> dict:
    warning = _label_warning(bank, queries)
    return {
        **({"warning": warning} if warning else {}),
        "train": bank.root,
        "val": queries.root,
        "n_train": len(bank),
        "n_val": len(queries),
        "num_classes": max(bank.num_classes, queries.num_classes),
        "feature_dim": int(bank.features.shape[1]),
    }


def _report(kind: str, meta: dict, results: dict[str, dict], setup: _Setup, seconds: float):
    """One branch: its fields at the top, ``branch`` its name. Both: ``branch`` "both",
    ``branches`` ``{name: {BRANCH_KEYS}}``, the shared fields at the top."""

    cfg = meta["config"]
    names = list(results)
    if len(names) == 1:
        fields, branch = dict(results[names[0]]), names[0]
    else:
        fields = {k: v for k, v in results[names[0]].items() if k not in BRANCH_KEYS}
        fields["branches"] = {
            name: {k: v for k, v in r.items() if k in BRANCH_KEYS} for name, r in results.items()
        }
        branch = "both"
    return {
        "eval": kind,
        **fields,
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "method": meta["method"],
        "backbone": cfg.model.backbone,
        "branch": branch,
        "branch_requested": meta["branch_requested"],
        "size": setup.size,
        "precision": setup.precision,
        "elapsed_s": round(seconds, 3),
        "run": run_info(setup.info.device, setup.info.world_size),
    }


def _evaluate(kind: str, checkpoint, options: dict, compute, out) -> dict:
    """Shared frame of :func:`knn_eval` and :func:`linear_eval`: process group, backbones of
    the branch(es), ``compute(backbone, setup) -> fields`` per branch, the report written by
    rank 0 (:func:`report_path` of the resolved branch, or ``out``)."""

    precision = options["precision"]
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    info = init_distributed(options.pop("device"))
    try:
        if precision == "bf16" and info.device.type != "cuda":
            raise ValueError("precision 'bf16' (autocast) needs a CUDA GPU; use fp32")
        start = time.perf_counter()
        backbones, meta = load_backbones(checkpoint, options.pop("branch"))
        size = options.pop("size") or meta["config"].data.size
        resized = [fit_input_size(b, size) for b in backbones.values()]  # ViTs: pos. embedding
        setup = _Setup(info=info, size=size, **options)
        results = {}
        for name in list(backbones):
            began = time.perf_counter()
            backbone = backbones.pop(name).to(info.device)
            if setup.cuda:
                backbone.to(memory_format=torch.channels_last)
            results[name] = compute(backbone, setup)
            results[name]["elapsed_s"] = round(time.perf_counter() - began, 3)
            del backbone  # one backbone on the device at a time
        report = _report(kind, meta, results, setup, time.perf_counter() - start)
        if resized[0] is not None:
            report["input_size_change"] = resized[0]
        path = (
            Path(out)
            if out
            else _free_report_path(
                report_path(meta["checkpoint"], kind, meta["step"], report["branch"]), report
            )
        )
        report["path"] = str(path)
        if info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, report)
        barrier()
        return report
    finally:
        cleanup_distributed(info)


def knn_eval(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    k: int = 20,
    temperature: float = 0.07,
    size: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    branch: str = "auto",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
    val_fraction: float | None = None,
) -> dict:
    """Weighted kNN (DINO) of a checkpoint's backbone: ``train`` shards are the memory bank,
    ``val`` the queries, centre crops of ``size`` (default: the checkpoint's ``data.size``).
    ``val_fraction``: ``train`` alone, cut into bank and queries that share no sample
    (:func:`train.eval.features.split_features`); ``val`` is then ``None`` or the same shards.
    ``branch``: ``auto`` (the momentum encoder when the checkpoint has one), ``online``,
    ``target`` or ``both``. Writes the report (:func:`report_path`, or ``out``) and returns it
    (``top1``, ``top5`` in percent, counts, checkpoint, step, resolved ``branch``, ...; for
    ``both`` the results under ``branches``). Under ``torchrun`` every rank calls it."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")

    val = _check_split(train, val, val_fraction)

    def compute(backbone, setup):
        bank, queries = _bank_and_queries(setup, backbone, train, val, val_fraction)
        num_classes = max(bank.num_classes, queries.num_classes)
        acc = knn_accuracy(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            num_classes,
            k,
            temperature,
        )
        fields = {"top1": acc.top1, "top5": acc.top5, "k": k, "temperature": temperature}
        return {**fields, **_shared(bank, queries), "val_fraction": val_fraction}

    options = dict(
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        progress=progress,
    )
    return _evaluate("knn", checkpoint, options, compute, out)


def linear_eval(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    probe: LinearProbeConfig | PaperProbeConfig | None = None,
    size: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    branch: str = "auto",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
    protocol: str = "fast",
    log: Callable[[str], None] | None = None,
    val_fraction: float | None = None,
) -> dict:
    """Linear probe of a checkpoint's backbone, fit on ``train``, scored on ``val`` (centre
    crops); report written and returned like :func:`knn_eval`, plus ``protocol``, the probe's
    hyper-parameters (``probe``), ``train_top1`` and ``val_loss``.

    ``protocol``:

    - ``fast`` (``probe``: :class:`LinearProbeConfig`): :func:`train_linear_probe` on the
      centre-crop features of ``train``, extracted once.
    - ``paper`` (``probe``: :class:`PaperProbeConfig`): :func:`train_paper_probe` on augmented
      crops of ``train`` decoded every epoch; also ``best_top1`` (the best epoch's val top-1,
      as DINO prints it: a test-set maximum, for reference only), ``train_loss`` and the
      per-epoch ``history``.

    ``log`` (rank 0): the probe's progress, a line per epoch with ``paper``, after the first
    and the last epoch and every 10 s with ``fast``; ``None``: silent.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    config_type = LinearProbeConfig if protocol == "fast" else PaperProbeConfig
    probe = config_type() if probe is None else probe
    if not isinstance(probe, config_type):
        raise TypeError(f"protocol {protocol!r} takes a {config_type.__name__}, got {probe!r}")

    if val_fraction is not None and protocol != "fast":
        raise ValueError("--val-fraction cuts extracted features: use it with --protocol fast")
    val = _check_split(train, val, val_fraction)

    options = dict(
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        progress=progress,
    )
    if protocol == "fast":
        run = functools.partial(
            _fast_probe, train=train, val=val, probe=probe, log=log, val_fraction=val_fraction
        )
    else:
        run = functools.partial(_paper_probe, train=train, val=val, probe=probe, log=log)
    return _evaluate("linear", checkpoint, options, run, out)


def _fast_probe(backbone, setup, *, train, val, probe, log, val_fraction) -> dict:
    """``linear_eval``'s fast protocol: :func:`train_linear_probe` on the centre-crop features
    of ``train`` (extracted once), scored on those of ``val``."""
    bank, queries = _bank_and_queries(setup, backbone, train, val, val_fraction)
    num_classes = max(bank.num_classes, queries.num_classes)
    model = train_linear_probe(
        bank.features, bank.labels, num_classes, probe, log=log if setup.info.is_main else None
    )
    acc = probe_accuracy(model, queries.features, queries.labels)
    fit = probe_accuracy(model, bank.features, bank.labels)
    return {
        "top1": acc.top1,
        "top5": acc.top5,
        "train_top1": fit.top1,
        "val_loss": probe_loss(model, queries.features, queries.labels),
        "protocol": "fast",
        "probe": asdict(probe),
        **_shared(bank, queries),
        "val_fraction": val_fraction,
    }


def _paper_probe(backbone, setup, *, train, val, probe, log) -> dict:
    """``linear_eval``'s paper protocol: :func:`train_paper_probe` on augmented crops of
    ``train`` decoded every epoch, scored on the centre-crop features of ``val``."""
    queries = setup.extract(backbone, val)
    with ProbeTrainLoader(
        train,
        size=setup.size,
        batch_size=probe.batch_size,
        rank=setup.info.rank,
        world_size=setup.info.world_size,
        seed=probe.seed,
        device=str(setup.info.device),
        num_threads=setup.num_threads,
        scale=probe.scale,
        ratio=probe.ratio,
        flip=probe.flip,
    ) as loader:
        num_classes = max(loader.num_classes, queries.num_classes)
        model, history = train_paper_probe(
            backbone,
            loader,
            num_classes,
            probe,
            val=queries,
            autocast=setup.autocast,
            channels_last=setup.cuda,
            log=log if setup.info.is_main else None,
            progress=setup.progress and setup.info.is_main,
        )
        n_train, steps = loader.num_samples, len(loader) * probe.epochs
    acc = probe_accuracy(model, queries.features, queries.labels)
    world = setup.info.world_size
    return {
        "top1": acc.top1,
        "top5": acc.top5,
        "best_top1": max(row["val_top1"] for row in history),
        "train_top1": history[-1]["train_top1"],
        "train_loss": history[-1]["loss"],
        "val_loss": probe_loss(model, queries.features, queries.labels),
        "protocol": "paper",
        "probe": {
            **asdict(probe),
            "global_batch": probe.batch_size * world,
            "peak_lr": probe.lr * probe.batch_size * world / 256,
            "steps": steps,
            "head": "BatchNorm1d(affine=False) + Linear",
        },
        "history": history,
        "train": str(train),
        "val": queries.root,
        "n_train": n_train,
        "n_val": len(queries),
        "num_classes": num_classes,
        "feature_dim": int(queries.features.shape[1]),
    }
