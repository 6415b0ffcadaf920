"""Frozen-feature evaluation: weighted kNN (DINO) and a linear probe.

Both take backbone features already extracted (``[N, D]``) with integer labels, so they are
independent of how the features were produced. :func:`knn_eval` and :func:`linear_eval` run
them on a checkpoint's backbone over labelled shards (features from the DALI centre-crop eval
loader, :mod:`train.features`) and write a JSON report into the run (``ssl-cli eval``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent
    n: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "n": self.n}


def _topk_accuracy(scores: Tensor, labels: Tensor) -> tuple[int, int]:
    """``scores [N, C]``, ``labels [N]`` -> (top-1 hits, top-5 hits); top-5 = top-C when C < 5."""
    k = min(5, scores.shape[1])
    pred = scores.topk(k, dim=1).indices  # [N, k]
    hit = pred == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN class scores ``[N_test, C]`` (Wu et al. 2018, as evaluated by DINO).

    Features are L2-normalised; the ``k`` most cosine-similar training samples vote for their
    class with weight ``exp(sim / temperature)``.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    if train_features.shape[0] == 0:
        raise ValueError("no training features for kNN")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # [n, N_train] cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)  # [n, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # sum of weights per class
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07
) -> Accuracy:
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    top1, top5 = _topk_accuracy(scores, test_labels.long())
    n = test_labels.shape[0]
    return Accuracy(100.0 * top1 / max(n, 1), 100.0 * top5 / max(n, 1), n)


@dataclass(frozen=True)
class LinearProbeConfig:
    """Linear classifier on frozen features: a non-affine BatchNorm then a linear layer (the
    MAE linear-probe head), SGD with momentum, cosine learning rate, no weight decay."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1  # for batch 256; scaled linearly with batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    config: LinearProbeConfig = LinearProbeConfig(),
) -> nn.Module:
    """Fit the probe on ``[N, D]`` features; returns the module in eval mode."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x = train_features.float()
    y = train_labels.long()
    probe = nn.Sequential(
        nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], num_classes)
    )
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    probe.to(x.device)
    lr = config.lr * config.batch_size / 256
    opt = torch.optim.SGD(
        probe.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, math.ceil(x.shape[0] / config.batch_size))
    total = config.epochs * steps_per_epoch
    step = 0
    probe.train()
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> Accuracy:
    scores = probe(features.float())
    top1, top5 = _topk_accuracy(scores, labels.long())
    n = labels.shape[0]
    return Accuracy(100.0 * top1 / max(n, 1), 100.0 * top5 / max(n, 1), n)


# ------------------------------------------------------------------- checkpoints on shards


def report_path(checkpoint: str | Path, kind: str, step: int, branch: str = "online") -> Path:
    """Where the report of ``kind`` ("knn", "linear") goes: ``RUN/eval/KIND-step-N.json`` for
    ``RUN/checkpoints/step-N.pt`` (``KIND-target-...`` for the EMA branch); beside the file in an
    ``eval/`` folder for a checkpoint outside a run directory."""
    ckpt = Path(checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = kind if branch == "online" else f"{kind}-{branch}"
    return run / "eval" / f"{name}-step-{step:08d}.json"


def _extract_pair(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    size: int | None,
    batch_size: int,
    branch: str,
    num_threads: int | None,
    precision: str,
    progress: bool,
    info,
) -> tuple[Any, Any, dict]:
    """Backbone features of ``train`` and ``val`` (every rank gets both, in row order)."""
    from pipeline.eval import EvalLoader
    from train.features import extract_features, load_backbone

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    if precision == "bf16" and info.device.type != "cuda":
        raise ValueError("precision 'bf16' (autocast) needs a CUDA GPU; use fp32")
    backbone, meta = load_backbone(checkpoint, branch)
    cuda = info.device.type == "cuda"
    backbone.to(info.device)
    if cuda:
        backbone.to(memory_format=torch.channels_last)
    size = size or meta["config"].data.size

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    out = []
    for shards in (train, val):
        with EvalLoader(
            shards,
            size=size,
            batch_size=batch_size,
            rank=info.rank,
            world_size=info.world_size,
            device=str(info.device),
            num_threads=num_threads,
        ) as loader:
            out.append(
                extract_features(
                    backbone,
                    loader,
                    autocast if precision == "bf16" else None,
                    channels_last=cuda,
                    progress=progress and info.is_main,
                )
            )
    meta.update(size=size, precision=precision)
    return out[0], out[1], meta


def _report(kind: str, meta: dict, bank, queries, info, seconds: float, **fields) -> dict:
    from train.runinfo import run_info

    cfg = meta["config"]
    return {
        "eval": kind,
        **fields,
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "method": meta["method"],
        "backbone": cfg.model.backbone,
        "branch": meta["branch"],
        "size": meta["size"],
        "precision": meta["precision"],
        "train": bank.root,
        "val": queries.root,
        "n_train": len(bank),
        "n_val": len(queries),
        "num_classes": max(bank.num_classes, queries.num_classes),
        "feature_dim": int(bank.features.shape[1]),
        "elapsed_s": round(seconds, 3),
        "run": run_info(info.device, info.world_size),
    }


def _evaluate(kind: str, checkpoint, train, val, options: dict, compute, out) -> dict:
    """Shared frame of :func:`knn_eval` and :func:`linear_eval`: process group, extraction,
    ``compute(bank, queries, num_classes) -> fields``, report written by rank 0."""
    import json
    import time

    from train.distributed import barrier, cleanup_distributed, init_distributed

    info = init_distributed(options.pop("device"))
    try:
        start = time.perf_counter()
        bank, queries, meta = _extract_pair(checkpoint, train, val, info=info, **options)
        num_classes = max(bank.num_classes, queries.num_classes)
        fields = compute(bank, queries, num_classes)
        report = _report(kind, meta, bank, queries, info, time.perf_counter() - start, **fields)
        path = (
            Path(out)
            if out
            else report_path(meta["checkpoint"], kind, meta["step"], meta["branch"])
        )
        report["path"] = str(path)
        if info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(path)
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
    branch: str = "online",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Weighted kNN (DINO) of a checkpoint's backbone: ``train`` shards are the memory bank,
    ``val`` the queries, centre crops of ``size`` (default: the checkpoint's ``data.size``).
    Writes the report (:func:`report_path`, or ``out``) and returns it (``top1``, ``top5`` in
    percent, counts, checkpoint, step, ...). Under ``torchrun`` every rank calls it."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")

    def compute(bank, queries, num_classes):
        acc = knn_accuracy(
            bank.features,
            bank.labels,
            queries.features,
            queries.labels,
            num_classes,
            k,
            temperature,
        )
        return {"top1": acc.top1, "top5": acc.top5, "k": k, "temperature": temperature}

    options = dict(
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        progress=progress,
    )
    return _evaluate("knn", checkpoint, train, val, options, compute, out)


def linear_eval(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path,
    probe: LinearProbeConfig = LinearProbeConfig(),
    size: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    branch: str = "online",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Linear probe (:func:`train_linear_probe`) on frozen centre-crop features of ``train``,
    accuracy on ``val``; report written and returned like :func:`knn_eval` (plus
    ``train_top1`` and the probe's hyper-parameters)."""
    from dataclasses import asdict

    def compute(bank, queries, num_classes):
        model = train_linear_probe(bank.features, bank.labels, num_classes, probe)
        acc = probe_accuracy(model, queries.features, queries.labels)
        fit = probe_accuracy(model, bank.features, bank.labels)
        return {"top1": acc.top1, "top5": acc.top5, "train_top1": fit.top1, "probe": asdict(probe)}

    options = dict(
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        progress=progress,
    )
    return _evaluate("linear", checkpoint, train, val, options, compute, out)
