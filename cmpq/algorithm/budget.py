"""Bit allocation by measured distortion: one Lagrangian over every channel of the whole model.

Each input channel ``j`` of each linear can be stored at one of a few widths (``FP16`` stands for
a whole FP16 column). Option ``o`` costs ``cost[o]`` bits, counted exactly as the storage format
counts them (indices, codebook, channel id, or the FP16 column), and is expected to add
``loss[j, o]`` to the model's loss. We want the options that minimise the total loss while the
total cost (plus the layers' fixed costs) stays within ``budget`` bits.

That is a multiple-choice knapsack. Its Lagrangian relaxation decouples the channels: for a price
``lam`` per bit each channel picks ``argmin loss + lam * cost`` on its own, and the total cost falls
as ``lam`` rises. We bisect ``lam`` to the cheapest feasible price, then spend what is left of the
budget greedily on the moves towards the next (infeasible) price's choices, best loss saved per
bit first. The result never exceeds the budget; it is optimal whenever the budget falls on a
vertex of the relaxation's convex hull, and otherwise at most one channel's move from it (the
classical bound for the relaxation). With a million channels and five options this is a few dozen
vectorized passes, well under a second.

Because the price is shared by every channel of every layer, bits go where they buy the most loss
(a 192-row ``k_proj`` whose 16-entry codebook costs more per weight than a 1,536-row ``down_proj``
gets fewer 4-bit channels, for instance), and FP16 columns are chosen exactly when a channel's
quantization loss at every width is worth more than its extra bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmpq.storage.codebook import id_dtype

FP16 = 16  # the option "keep this channel as an FP16 column"


@dataclass
class LayerOptions:
    """Options of one linear: ``widths`` (ascending cost), ``cost`` bits per channel for each,
    ``loss`` ``[channels, options]``, and the layer's ``fixed`` bits (sparse outliers, row pointers)."""

    widths: tuple[int, ...]
    cost: torch.Tensor  # float64 [options]
    loss: torch.Tensor  # float64 [channels, options]
    fixed: float = 0.0


def _int_bits(n: int) -> int:
    """Bits of one stored id in ``[0, n]`` (format v3 picks int16 where it fits, else int32)."""
    return 8 * torch.empty(0, dtype=id_dtype(n)).element_size()


def channel_cost_bits(width: int, out_features: int, in_features: int) -> int:
    """Stored bits of one channel of an ``out_features x in_features`` layer at ``width`` (format
    v3): its packed indices (blocks of 32 rows), its ``2**width`` 8-bit codebook codes with their
    FP16 minimum and maximum, and its channel id; or, for ``FP16``, the column and its id."""
    ids = _int_bits(in_features)
    if width == FP16:
        return 16 * out_features + ids
    return 32 * width * (-(-out_features // 32)) + 8 * 2**width + 32 + ids


def sparse_cost_bits(out_features: int, n_sparse: int, in_features: int) -> int:
    """Stored bits of a layer's sparse outliers: CSR row pointers (int16 up to 32,767 outliers),
    column ids (int16 up to 32,767 inputs) and FP16 values."""
    return _int_bits(n_sparse) * (out_features + 1) + n_sparse * (_int_bits(in_features) + 16)


def row_scale_cost_bits(out_features: int) -> int:
    """Stored bits of a layer's row scales: one FP16 per output row."""
    return 16 * out_features


class BudgetError(ValueError):
    """The bit budget cannot be met with the allowed options."""


def _choose(loss: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    # ties go to the first (cheapest) option; options are in ascending cost
    return torch.argmin(loss + lam * cost, dim=1)


def solve(layers: list[LayerOptions], budget_bits: float, iters: int = 100) -> list[torch.Tensor]:
    """Option index per channel of every layer (int64 tensors, one per layer), total cost <= budget."""
    if not layers:
        return []
    loss = torch.cat([l.loss.double() for l in layers])
    cost = torch.cat([l.cost.double().expand(l.loss.shape[0], -1) for l in layers])
    if loss.shape != cost.shape:
        raise ValueError("every layer must offer the same number of options")
    if not torch.isfinite(loss).all() or (loss < 0).any():
        raise ValueError("channel losses must be finite and non-negative")
    fixed = sum(l.fixed for l in layers)
    avail = budget_bits - fixed
    rows = torch.arange(loss.shape[0])

    def total(choice: torch.Tensor) -> float:
        return float(cost[rows, choice].sum())

    cheapest = cost.argmin(dim=1)
    if total(cheapest) > avail + 1e-6:
        raise BudgetError(f"the budget of {budget_bits:.0f} bits is below the smallest possible size "
                          f"({total(cheapest) + fixed:.0f} bits: every channel at the narrowest width)")
    # price range: 0 (loss only) .. a price at which no move is worth a single bit
    dl = loss.max() - loss.min()
    dc = (cost.max(dim=1).values - cost.min(dim=1).values).clamp(min=1).min()
    lo, hi = 0.0, float(dl / dc) * 2 + 1.0
    c0 = _choose(loss, cost, lo)
    if total(c0) <= avail:
        return list(c0.split([l.loss.shape[0] for l in layers]))
    while total(_choose(loss, cost, hi)) > avail:  # ties at hi may still pick dear options
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi) if hi / max(lo, 1e-300) < 4 or lo == 0 else (lo * hi) ** 0.5
        if total(_choose(loss, cost, mid)) > avail:
            lo = mid
        else:
            hi = mid
    choice = _choose(loss, cost, hi)
    target = _choose(loss, cost, lo)
    # spend the slack: moves towards the infeasible side's choices, best saving per bit first
    slack = avail - total(choice)
    moving = (target != choice).nonzero().squeeze(1)
    if moving.numel() and slack > 0:
        dcost = cost[moving, target[moving]] - cost[moving, choice[moving]]
        dloss = loss[moving, choice[moving]] - loss[moving, target[moving]]
        ok = (dcost > 0) & (dloss > 0)
        moving, dcost, dloss = moving[ok], dcost[ok], dloss[ok]
        order = torch.argsort(dloss / dcost, descending=True, stable=True)
        moving, dcost = moving[order], dcost[order]
        n = int((dcost.cumsum(0) <= slack).sum())  # the longest prefix that fits, in one step
        choice[moving[:n]] = target[moving[:n]]
        slack -= float(dcost[:n].sum())
        tail_min = dcost.flip(0).cummin(0).values.flip(0).tolist()
        for j in range(n, moving.numel()):  # then whatever smaller moves still fit
            if slack < tail_min[j]:
                break
            if dcost[j] <= slack:
                slack -= float(dcost[j])
                choice[moving[j]] = target[moving[j]]
    return list(choice.split([l.loss.shape[0] for l in layers]))


def total_cost(layers: list[LayerOptions], choices: list[torch.Tensor]) -> float:
    """Bits of a solution, the layers' fixed bits included."""
    return sum(float(l.cost.double()[c].sum()) + l.fixed for l, c in zip(layers, choices))


def total_loss(layers: list[LayerOptions], choices: list[torch.Tensor]) -> float:
    return sum(float(l.loss.double().gather(1, c[:, None]).sum()) for l, c in zip(layers, choices))
