"""Per-channel precision allocation (the paper's Algorithm 1), kept a small replaceable function.

An allocator maps the per-input-channel activation norms ``a`` and an average budget ``b`` to
a bit width per channel. Algorithm 1 starts every channel at 3 bits and moves the top
``b - 3`` fraction (by norm) to 4 bits, or the bottom ``3 - b`` fraction to 2 bits; at exactly
3 bits it moves 1% each way. We rank channels instead of thresholding at a quantile, so ties
in ``a`` never break the budget: the average is met to within one channel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Allocator = Callable[[torch.Tensor, float], torch.Tensor]

MIN_BITS, MAX_BITS = 2.0, 4.0


def check_budget(bits: float) -> float:
    """Validate an average bit budget; CMPQ mixes 2, 3 and 4 bits, so it lives in [2, 4]."""
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ValueError(f"bit budget must be a number in [2, 4], got {bits!r}") from None
    if not math.isfinite(b) or not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"bit budget must be in [2, 4] (CMPQ mixes 2/3/4-bit channels), got {bits!r}")
    return b


def algorithm1(norms: torch.Tensor, bits: float, edge_frac: float = 0.01) -> torch.Tensor:
    """Bit width (int64, values in {2, 3, 4}) per channel for average budget ``bits``."""
    b = check_budget(bits)
    n = norms.numel()
    c = torch.full((n,), 3, dtype=torch.int64, device=norms.device)
    if n == 0:
        return c
    order = torch.argsort(norms.float(), stable=True)  # ascending: low-norm channels first
    if b > 3:
        k = round((b - 3) * n)
        c[order[n - k :]] = 4 if k else 3
    elif b < 3:
        k = round((3 - b) * n)
        c[order[:k]] = 2
    else:
        k = round(edge_frac * n)
        if k:
            c[order[:k]] = 2
            c[order[n - k :]] = 4
    return c


ALLOCATORS: dict[str, Allocator] = {"algorithm1": algorithm1}
# "distortion" (cmpq.algorithm.budget) allocates across the whole model, not one layer's norms, so
# it is not an ``Allocator``; it is listed here so configs can name it.
ALLOCATOR_NAMES = ("algorithm1", "distortion")


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; choose from {sorted(ALLOCATORS)}") from None
