"""kNN classification and linear probes: the maths of frozen-backbone evaluation.

- :func:`knn_classify` / :func:`knn_accuracy` (weighted kNN, DINO) and the fast probe
  (:func:`train_linear_probe`, :func:`probe_accuracy`, :func:`probe_loss`) take backbone
  features already extracted (``[N, D]``) with integer labels, so they are independent of how
  the features were produced.
- The paper probe (:func:`train_paper_probe`) runs a frozen backbone on the augmented training
  crops of a loader it is given, every step (:class:`pipeline.eval.ProbeTrainLoader`): the
  protocol of MoCo v3 ``main_lincls.py`` and DINO ``eval_linear.py``.

Nothing here opens a checkpoint or a shard folder: :mod:`train.eval.features` extracts the features
and :mod:`train.eval.classify` runs these on a checkpoint over labelled shards (``ssl-cli eval``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.bench import eta_seconds, format_duration
from pipeline.eval import PROBE_SCALE
from pipeline.views import RATIO
from train.distributed import all_reduce_sum, is_distributed
from train.schedules import cosine_schedule

__all__ = [
    "Accuracy",
    "LinearProbeConfig",
    "PaperProbeConfig",
    "knn_accuracy",
    "knn_classify",
    "probe_accuracy",
    "probe_head",
    "probe_loss",
    "train_linear_probe",
    "train_paper_probe",
]


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


@contextlib.contextmanager
def probe_threads(device: torch.device):
    """One intra-op thread for a probe's steps on the CPU (the caller's count restored).

    A probe step is a ``[256, D] x [D, C]`` matmul with a BatchNorm: too small for threads to
    share, so a second thread only adds its hand-over, and where the cores are busy with other
    work the hand-over waits for a core every op. Measured on a 2-core VM at load 7 (9,060
    features of 512 dimensions, 10 classes, 100 epochs): 260 s with 2 threads, 32 s with 1.
    CUDA probes are left alone."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    line (0: every epoch); ``None``: silent. Logging does not change the probe. On the CPU it
    runs on one thread (:func:`probe_threads`)."""
    with probe_threads(train_features.device):
        return _train_linear_probe(
            train_features, train_labels, num_classes, config, log, log_every
        )


def _train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    config: LinearProbeConfig,
    log: Callable[[str], None] | None,
    log_every: float,
) -> nn.Module:
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


def _probe_epoch(
    probe: nn.Module,
    opt: torch.optim.Optimizer,
    lrs: Any,
    backbone: nn.Module,
    batches: Any,
    autocast: Callable[[], contextlib.AbstractContextManager] | None,
    channels_last: bool,
    world: int,
    device: torch.device,
) -> tuple[Tensor, int]:
    """One epoch of the paper probe: the frozen backbone's features (no grad) into the head, a
    step per batch at ``lrs[i]``, the head's gradients averaged over ranks. Returns this rank's
    ``[loss sum, hits, samples]`` (float64) and the steps taken."""
    probe.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    i = -1
    for i, batch in enumerate(batches):
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
                all_reduce_sum(p.grad).div_(world)
        for group in opt.param_groups:
            group["lr"] = float(lrs[i])
        opt.step()
        n = y.shape[0]
        sums += torch.stack(
            [
                loss.detach().double() * n,
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ]
        )
    return sums, i + 1


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
    :class:`~train.eval.features.Features`, scored after every epoch (cheap: cached features of a
    frozen backbone). ``log``: one line per epoch (loss, accuracies, lr, its seconds, the
    elapsed time and the ETA at the cumulative rate of the epochs so far).

    Returns the head in eval mode and one dict per epoch: ``epoch``, ``loss`` (mean training
    cross-entropy), ``train_top1`` (on the augmented crops), ``val_top1``, ``val_top5``,
    ``lr`` (at the epoch's first step), ``seconds``.
    """

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
    lrs = cosine_schedule(peak, 0.0, config.epochs * len(loader))
    step, history = 0, []
    began = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            loader.set_epoch(epoch)
            epoch_lr = float(lrs[step])
            batches = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
            sums, steps = _probe_epoch(
                probe, opt, lrs[step:], backbone, batches, autocast, channels_last, world, device
            )
            step += steps
            all_reduce_sum(sums)
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
            all_reduce_sum(buf).div_(world)
    return probe.eval(), history
