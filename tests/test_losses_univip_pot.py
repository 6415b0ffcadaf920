"""UniVIP's Sinkhorn (eq. 7) against POT, the Python Optimal Transport library (``ot.sinkhorn``).

Two comparisons, both at OTA's ``eps = 0.1`` on random costs in ``[0, 2]`` (the range of eq. 8)
and random masses:

- the same 50 iterations, before our rounding step: POT's linear-domain ``sinkhorn_knopp``
  updates columns then rows, ours rows then columns, so POT runs on the transposed problem
  (``a`` and ``b`` swapped, ``cost.T``); after that the two iterates are the same in exact
  arithmetic. After rounding they would differ by up to twice the row-marginal error left after
  50 iterations, which is no fair test of either solver.
- converged: our rounded plan after 3000 iterations against POT's log-domain solver run to
  ``stopThr = 1e-13``: both are then the entropic optimum, where rounding changes nothing.
"""

import numpy as np
import pytest
import torch

from train.losses.univip import sinkhorn

ot = pytest.importorskip("ot", reason="POT (pip install POT) is needed to compare Sinkhorn plans")

SHAPES = [(32, 4, 4), (8, 3, 7), (4, 10, 10)]
EPS = 0.1  # OTA (Ge et al., CVPR 2021), cited by UniVIP for Sinkhorn


def _problem(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, m, n = shape
    cost = 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    a = torch.rand(batch, m, generator=gen, dtype=torch.float64)
    b = 3 * torch.rand(batch, n, generator=gen, dtype=torch.float64)
    return cost, a, b


def _np(x):
    return x.numpy().astype(np.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_sinkhorn_iterate_matches_pot_after_same_iterations(shape):
    cost, a, b = _problem(shape, seed=0)
    plan = sinkhorn(cost, a, b, eps=EPS, iters=50, rounded=False).double()
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    for i in range(shape[0]):
        # stopThr < 0: never stop early, exactly numItermax (v, u) updates
        ref_t = ot.sinkhorn(
            _np(b[i]), _np(a[i]), _np(cost[i].T), reg=EPS, numItermax=50, stopThr=-1.0, warn=False
        )
        np.testing.assert_allclose(plan[i].numpy(), ref_t.T, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_sinkhorn_converged_matches_pot_log_domain(shape):
    cost, a, b = _problem(shape, seed=1)
    plan = sinkhorn(cost, a, b, eps=EPS, iters=3000).double()
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    for i in range(shape[0]):
        ref = ot.sinkhorn(
            _np(a[i]),
            _np(b[i]),
            _np(cost[i]),
            reg=EPS,
            method="sinkhorn_log",
            numItermax=100_000,
            stopThr=1e-13,
        )
        np.testing.assert_allclose(plan[i].numpy(), ref, atol=2e-6, rtol=0)
