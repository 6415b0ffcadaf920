import pytest
import torch

from train.eval.probes import (
    LinearProbeConfig,
    knn_accuracy,
    knn_classify,
    probe_accuracy,
    train_linear_probe,
)


def test_knn_weights_hand_computed():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # cosine 1, 0, 1/sqrt(2) to the three
    scores = knn_classify(train, labels, test, num_classes=2, k=2, temperature=0.5)
    # the two nearest: sample 0 (cos 1) for class 0, sample 2 (cos 0.7071) for class 1
    expected = torch.tensor(
        [[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(2**-0.5 / 0.5))]]
    )
    torch.testing.assert_close(scores, expected)


def _clusters(n_per_class, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_on_known_clusters():
    train, train_y = _clusters(50, 10, 32, 0.5, seed=0)
    test, test_y = _clusters(20, 10, 32, 0.5, seed=0)
    acc = knn_accuracy(train, train_y, test + 0.01, test_y, num_classes=10)
    assert acc.top1 == 100.0 and acc.top5 == 100.0 and acc.n == 200
    # labels that carry no information give chance accuracy, not 100%
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    chance = knn_accuracy(train, shuffled, test, test_y, num_classes=10)
    assert chance.top1 < 30.0


def test_linear_probe_learns_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    w = torch.randn(16, 3, generator=g)
    y = (x @ w).argmax(dim=1)  # linearly separable by construction
    probe = train_linear_probe(x[:500], y[:500], 3, LinearProbeConfig(epochs=30, batch_size=64))
    acc = probe_accuracy(probe, x[500:], y[500:])
    assert acc.top1 > 90.0
    untrained = train_linear_probe(x[:500], y[:500], 3, LinearProbeConfig(epochs=0))
    assert probe_accuracy(untrained, x[500:], y[500:]).top1 < acc.top1


def test_probe_runs_on_one_cpu_thread_and_restores_the_count():
    from train.eval.probes import probe_threads

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with probe_threads(torch.device("cpu")):
            Spy()(torch.zeros(1))
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), probe_threads(torch.device("cpu")):
            raise RuntimeError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
