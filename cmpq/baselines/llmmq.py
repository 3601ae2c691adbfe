"""LLM-MQ-style layer-wise mixed precision (Li et al., 2023, "LLM-MQ: Mixed-precision Quantization for
Efficient LLM Deployment"): score each layer's loss at each candidate bit width, then pick one width
per layer minimizing the summed score under a total-bits budget (an integer program).

The integer program is a multiple-choice knapsack; it is solved exactly by dynamic programming over
integer cost units: layer sizes are divided by their gcd, so "one extra bit on layer l" costs
``size_l / gcd`` units and the budget becomes an integer number of units. Among optimal allocations
the one using the most bits (closest to the budget from below) is returned.
"""

from __future__ import annotations

import math
import warnings
from functools import reduce

import numpy as np
from torch import Tensor

_MAX_DP_CELLS = 200_000_000


def allocate_layer_bits(
    sensitivity: dict[str, dict[int, float]],
    sizes: dict[str, int],
    budget: float,
    choices: tuple[int, ...] = (2, 3, 4),
    fill_budget: bool = False,
) -> dict[str, int]:
    """One bit width per layer minimizing ``sum sensitivity[l][b_l]`` s.t. ``sum b_l size_l <= budget * sum size_l``.

    ``fill_budget=True`` makes the constraint an equality whenever the budget is reachable (so methods are
    compared at the very same bits even where spending fewer bits would score lower); otherwise the
    ``<=`` optimum is returned.

    ``sensitivity[l][b]``: the layer's loss score at ``b`` bits; ``sizes[l]``: its number of weights.
    Exact unless the DP table would exceed ``2e8`` cells (sizes with a tiny gcd); then cost units are
    coarsened with costs rounded up, which keeps the budget but may be slightly suboptimal (warned).
    """
    names = list(sizes)
    choices = tuple(sorted(set(choices)))
    if set(names) != set(sensitivity):
        raise ValueError("sensitivity and sizes must have the same layers")
    missing = [(l, b) for l in names for b in choices if b not in sensitivity[l]]
    if missing:
        raise ValueError(f"missing sensitivity for (layer, bits): {missing[:5]}")
    total = sum(sizes[l] for l in names)
    base = choices[0]
    if budget * total < base * total - 1e-9 * total:
        raise ValueError(f"budget {budget} is below the smallest choice {base}")

    unit = reduce(math.gcd, (sizes[l] for l in names))
    extra_bits = [b - base for b in choices]
    max_extra = max(extra_bits) * total // unit
    cap_f = (budget - base) * total / unit
    cap = min(max_extra, math.floor(cap_f + 1e-9 * max(1.0, cap_f)))
    exact = True
    if len(names) * (cap + 1) > _MAX_DP_CELLS:
        factor = math.ceil(len(names) * (cap + 1) / _MAX_DP_CELLS)
        exact = False
        warnings.warn(f"llmmq: DP table too large, coarsening cost units by {factor}x (budget kept, may be suboptimal)")
    else:
        factor = 1

    # cost[l, k] in units; sens[l, k]
    cost = np.array([[-(-e * sizes[l] // (unit * factor)) for e in extra_bits] for l in names], dtype=np.int64)
    if not exact:
        cap //= factor  # floor, and costs above round up: the budget still holds
    sens = np.array([[float(sensitivity[l][b]) for b in choices] for l in names], dtype=np.float64)

    # dp[c] = min total sensitivity of the layers so far using exactly c units
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    pick = np.zeros((len(names), cap + 1), dtype=np.int8)
    for li in range(len(names)):
        new = np.full(cap + 1, np.inf)
        for k in range(len(choices)):
            c = cost[li, k]
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = dp[: cap + 1 - c] + sens[li, k]
            better = cand < new
            new[better] = cand[better]
            pick[li, better] = k
        dp = new

    best = dp.min()
    if not np.isfinite(best):
        raise ValueError("no feasible allocation")
    # ties (within float noise) go to the allocation using the most bits
    c = int(np.nonzero(dp <= best + 1e-12 * max(1.0, abs(best)))[0].max())
    if fill_budget and np.isfinite(dp[cap]):
        c = cap
    out: dict[str, int] = {}
    for li in range(len(names) - 1, -1, -1):
        k = int(pick[li, c])
        out[names[li]] = choices[k]
        c -= int(cost[li, k])
    return {l: out[l] for l in names}


def first_order_sensitivity(W: Tensor, grad: Tensor, W_hat: Tensor) -> float:
    """LLM-MQ's first-order Taylor score ``|sum(grad * (W_hat - W))|`` (change of the loss to first order)."""
    return (grad.double() * (W_hat.double() - W.double())).sum().abs().item()


def proxy_sensitivity(W: Tensor, act_sqnorm: Tensor, W_hat: Tensor) -> float:
    """Calibration-statistics proxy (not in LLM-MQ): ``sum_i act_sqnorm[i] * ||W[:, i] - W_hat[:, i]||^2``.

    With ``act_sqnorm[i] = sum_t x_ti^2`` (the per-input-channel statistic CMPQ collects) this is the
    layer-output squared error ``||X (W - W_hat)^T||^2`` under the approximation that input channels are
    uncorrelated (diagonal of ``X^T X``). Needs no gradients, unlike :func:`first_order_sensitivity`.
    """
    d = (W.double() - W_hat.double()).pow(2).sum(0)
    return (act_sqnorm.to(d.device).double() * d).sum().item()
