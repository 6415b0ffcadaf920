"""Frozen-feature evaluation: weighted kNN (DINO) and a linear probe.

Both take backbone features already extracted (``[N, D]``) with integer labels, so they are
independent of how the features were produced (the DALI centre-crop eval loader in practice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
