"""Frozen-backbone evaluation: weighted kNN (DINO) and two linear probe protocols.

- :func:`knn_classify` / :func:`knn_accuracy` and the fast probe (:func:`train_linear_probe`)
  take backbone features already extracted (``[N, D]``) with integer labels, so they are
  independent of how the features were produced.
- The paper probe (:func:`train_paper_probe`) runs the frozen backbone on augmented training
  crops every step (:class:`pipeline.eval.ProbeTrainLoader`): the protocol of MoCo v3
  ``main_lincls.py`` and DINO ``eval_linear.py``.

:func:`knn_eval` and :func:`linear_eval` run them on a checkpoint's backbone(s) over labelled
shards (centre-crop features from the DALI eval loader, :mod:`train.features`) and write a
JSON report into the run (``ssl-cli eval``). The branch defaults to ``auto``: the momentum
(target) encoder when the checkpoint has one (:func:`train.features.resolve_branches`);
``both`` evaluates the online and the target backbone and reports the two.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.bench import eta_seconds, format_duration
from pipeline.eval import PROBE_SCALE
from pipeline.views import RATIO
from train.distributed import is_distributed

PROTOCOLS = ("fast", "paper")  # linear probe protocols (docs/evaluation.md)


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


def probe_head(dim: int, num_classes: int) -> nn.Module:
    """``[B, D] -> [B, C]``: ``BatchNorm1d(affine=False)`` then ``Linear`` (weights
    ``trunc_normal(std=0.01)``, bias 0), the linear-probe head of MAE (``main_linprobe.py``,
    Appendix A.2). The non-affine BatchNorm is a re-parameterised linear classifier (it folds
    into the linear layer after training) that standardises the feature scale, which differs
    between methods and branches, so that one learning rate serves all of them without a sweep
    (MAE's reason for it). MoCo v3 ``main_lincls.py`` and DINO ``eval_linear.py`` use a plain
    ``Linear`` (init ``normal(std=0.01)``); this head is our choice for both protocols."""
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)
    nn.init.zeros_(probe[1].bias)
    return probe


def _epoch_timing(started: float, now: float, epoch: int, epochs: int) -> str:
    """``E elapsed, ETA T`` after ``epoch`` of ``epochs`` epochs (cumulative rate)."""
    elapsed = now - started
    eta = format_duration(eta_seconds(elapsed, epoch, epochs))
    return f"{format_duration(elapsed)} elapsed, ETA {eta}"


def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    config: LinearProbeConfig = LinearProbeConfig(),
    log: Callable[[str], None] | None = None,
    log_every: float = 10.0,
) -> nn.Module:
    """Fit the probe on ``[N, D]`` features; returns the module in eval mode.

    ``log``: a line ``linear probe (fast) epoch i/N: loss L, E elapsed, ETA T`` (mean training
    cross-entropy of the epoch; ETA at the cumulative rate of the epochs so far) after the
    first and the last epoch and whenever ``log_every`` seconds have passed since the last
    line (0: every epoch); ``None``: silent. Logging does not change the probe."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x = train_features.float()
    y = train_labels.long()
    probe = probe_head(x.shape[1], num_classes).to(x.device)
    lr = config.lr * config.batch_size / 256
    opt = torch.optim.SGD(
        probe.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, math.ceil(x.shape[0] / config.batch_size))
    total = config.epochs * steps_per_epoch
    step = 0
    started = last_line = time.perf_counter()
    probe.train()
    for epoch in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        sums = torch.zeros(2, dtype=torch.float64, device=x.device) if log is not None else None
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
            if sums is not None:  # summed on the device: no sync per step
                sums[0] += loss.detach().double() * idx.numel()
                sums[1] += idx.numel()
        if log is not None:
            now = time.perf_counter()
            if epoch in (0, config.epochs - 1) or now - last_line >= log_every:
                last_line = now
                mean = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
                log(
                    f"linear probe (fast) epoch {epoch + 1}/{config.epochs}: loss {mean:.4f}, "
                    + _epoch_timing(started, now, epoch + 1, config.epochs)
                )
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> Accuracy:
    scores = probe(features.float())
    top1, top5 = _topk_accuracy(scores, labels.long())
    n = labels.shape[0]
    return Accuracy(100.0 * top1 / max(n, 1), 100.0 * top5 / max(n, 1), n)


@torch.no_grad()
def probe_loss(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Mean cross-entropy of the probe on ``[N, D]`` features."""
    if labels.shape[0] == 0:
        return float("nan")
    return float(F.cross_entropy(probe(features.float()), labels.long()))


# ------------------------------------------------------------------------- paper protocol


@dataclass(frozen=True)
class PaperProbeConfig:
    """The linear probe as MoCo v3 / DINO train it: frozen backbone run on augmented crops.

    - ``epochs`` 100: DINO ``eval_linear.py`` (MoCo v3 ``main_lincls.py``: 90; MOS and BYOL
      report 100-epoch probes too).
    - ``lr`` 0.1 per 256 images, scaled by the global batch (``batch_size x world size``) /
      256, cosine decay to 0 per step: MoCo v3 ``main_lincls.py`` (``--lr 0.1``, ``init_lr =
      lr * batch / 256``, cosine). DINO's default is 0.001 per 256 with a plain linear head on
      unnormalised ViT features; behind our non-affine BatchNorm (:func:`probe_head`) the
      features have unit scale, where MoCo v3's value fits. The value is our choice, not a
      sweep: DINO and MoCo v3 both recommend tuning it per checkpoint.
    - SGD, ``momentum`` 0.9, ``weight_decay`` 0: both references.
    - ``batch_size`` 256 per process: our choice (MoCo v3: 1024 in total, DINO: 128 per GPU);
      the lr follows it.
    - Inputs: random resized crops of area ``scale`` 0.08..1, aspect ``ratio`` 3/4..4/3,
      horizontal ``flip`` with probability 0.5 (torchvision ``RandomResizedCrop`` +
      ``RandomHorizontalFlip``, both references); validation: the centre crop of
      :class:`pipeline.eval.EvalLoader` (``Resize(256)`` + ``CenterCrop(224)``).
    - ``seed``: the probe's initialisation and every epoch's order and crops.
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1  # per 256 images of the global batch
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    scale: tuple[float, float] = PROBE_SCALE
    ratio: tuple[float, float] = RATIO
    flip: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum <= 1 or self.weight_decay < 0:
            raise ValueError(
                f"need lr > 0, 0 <= momentum <= 1, weight_decay >= 0; got {self.lr}, "
                f"{self.momentum}, {self.weight_decay}"
            )


def cosine_schedule(peak: float, total: int) -> list[float]:
    """Per-step learning rates: ``peak * (1 + cos(pi t / total)) / 2`` for ``t < total``."""
    return [peak * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks in place (no-op in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def train_paper_probe(
    backbone: nn.Module,
    loader: Any,
    num_classes: int,
    config: PaperProbeConfig = PaperProbeConfig(),
    val: Any = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    channels_last: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Fit :func:`probe_head` on the frozen ``backbone`` over ``config.epochs`` epochs of a
    :class:`~pipeline.eval.ProbeTrainLoader` (augmented crops, decoded again every epoch).

    The backbone stays in eval mode (BatchNorm running statistics untouched, no drop path, as
    MoCo v3 ``main_lincls.py`` insists) and runs under ``no_grad``; only the head learns.
    Under DDP every rank trains on its part of each epoch and the head's gradients are summed
    over ranks (the lr scales with the global batch), so the heads stay equal; the BatchNorm
    running statistics are averaged at the end. ``val``: centre-crop
    :class:`~train.features.Features`, scored after every epoch (cheap: cached features of a
    frozen backbone). ``log``: one line per epoch (loss, accuracies, lr, its seconds, the
    elapsed time and the ETA at the cumulative rate of the epochs so far).

    Returns the head in eval mode and one dict per epoch: ``epoch``, ``loss`` (mean training
    cross-entropy), ``train_top1`` (on the augmented crops), ``val_top1``, ``val_top5``,
    ``lr`` (at the epoch's first step), ``seconds``.
    """
    from tqdm import tqdm

    world = torch.distributed.get_world_size() if is_distributed() else 1
    device = loader.device
    torch.manual_seed(config.seed)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        dim = int(backbone(torch.zeros(2, 3, loader.size, loader.size, device=device)).shape[1])
    probe = probe_head(dim, num_classes).to(device)
    peak = config.lr * config.batch_size * world / 256
    opt = torch.optim.SGD(
        probe.parameters(), lr=peak, momentum=config.momentum, weight_decay=config.weight_decay
    )
    lrs = cosine_schedule(peak, config.epochs * len(loader))
    step, history = 0, []
    began = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            loader.set_epoch(epoch)
            probe.train()
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, hits, samples
            epoch_lr = lrs[step]
            for batch in tqdm(loader, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
                x = batch["image"]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    with autocast() if autocast is not None else contextlib.nullcontext():
                        f = backbone(x)
                logits = probe(f.float())  # [B, C]
                y = batch["label"]
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    for p in probe.parameters():
                        _all_reduce_sum(p.grad).div_(world)
                for group in opt.param_groups:
                    group["lr"] = lrs[step]
                opt.step()
                step += 1
                n = y.shape[0]
                sums += torch.stack(
                    [
                        loss.detach().double() * n,
                        (logits.argmax(1) == y).sum().double(),
                        torch.tensor(float(n), dtype=torch.float64, device=device),
                    ]
                )
            _all_reduce_sum(sums)
            row = {
                "epoch": epoch + 1,
                "loss": float(sums[0] / sums[2]),
                "train_top1": float(100.0 * sums[1] / sums[2]),
                "lr": epoch_lr,
            }
            if val is not None:
                probe.eval()
                acc = probe_accuracy(probe, val.features, val.labels)
                row.update(val_top1=acc.top1, val_top5=acc.top5)
            row["seconds"] = round(time.perf_counter() - start, 3)
            history.append(row)
            if log is not None:
                scored = f", val top-1 {row['val_top1']:.2f}%" if val is not None else ""
                log(
                    f"linear probe (paper) epoch {epoch + 1}/{config.epochs}: loss "
                    f"{row['loss']:.4f}, train top-1 {row['train_top1']:.2f}% (augmented)"
                    f"{scored}, lr {epoch_lr:.4g}, {row['seconds']:.1f} s, "
                    + _epoch_timing(began, time.perf_counter(), epoch + 1, config.epochs)
                )
    finally:
        backbone.train(was_training)
    if world > 1:  # every rank normalised its own batches: average the running statistics
        bn = probe[0]
        for buf in (bn.running_mean, bn.running_var):
            _all_reduce_sum(buf).div_(world)
    return probe.eval(), history


# ------------------------------------------------------------------- checkpoints on shards


def report_path(checkpoint: str | Path, kind: str, step: int, branch: str = "online") -> Path:
    """Where the report of ``kind`` ("knn", "linear") goes: ``RUN/eval/KIND-step-N.json`` for
    ``RUN/checkpoints/step-N.pt`` and the online branch, ``KIND-target-step-N.json`` for the
    momentum (target) branch, ``KIND-both-step-N.json`` for both in one report; beside the file
    in an ``eval/`` folder for a checkpoint outside a run directory. ``branch`` is a resolved
    name (``auto`` is resolved before, :func:`train.features.resolve_branches`)."""
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
        from pipeline.eval import EvalLoader
        from train.features import extract_features

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


def _shared(bank, queries) -> dict:
    return {
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
    from train.runinfo import run_info

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
    import json

    from train.distributed import barrier, cleanup_distributed, init_distributed
    from train.features import fit_input_size, load_backbones

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
            else report_path(meta["checkpoint"], kind, meta["step"], report["branch"])
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
    branch: str = "auto",
    num_threads: int | None = None,
    precision: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Weighted kNN (DINO) of a checkpoint's backbone: ``train`` shards are the memory bank,
    ``val`` the queries, centre crops of ``size`` (default: the checkpoint's ``data.size``).
    ``branch``: ``auto`` (the momentum encoder when the checkpoint has one), ``online``,
    ``target`` or ``both``. Writes the report (:func:`report_path`, or ``out``) and returns it
    (``top1``, ``top5`` in percent, counts, checkpoint, step, resolved ``branch``, ...; for
    ``both`` the results under ``branches``). Under ``torchrun`` every rank calls it."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")

    def compute(backbone, setup):
        bank, queries = setup.extract(backbone, train), setup.extract(backbone, val)
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
        return {**fields, **_shared(bank, queries)}

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

    def fast(backbone, setup):
        bank, queries = setup.extract(backbone, train), setup.extract(backbone, val)
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
            "protocol": protocol,
            "probe": asdict(probe),
            **_shared(bank, queries),
        }

    def paper(backbone, setup):
        from pipeline.eval import ProbeTrainLoader

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
            "protocol": protocol,
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

    options = dict(
        size=size,
        batch_size=batch_size,
        device=device,
        branch=branch,
        num_threads=num_threads,
        precision=precision,
        progress=progress,
    )
    return _evaluate("linear", checkpoint, options, fast if protocol == "fast" else paper, out)
