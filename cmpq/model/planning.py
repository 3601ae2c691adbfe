"""Whole-model width plan for the compensated algorithm: every channel's width, before the walk.

The sensitivity pass (``cmpq.model.sensitivity``) gives each linear's loss-weighted Hessian
diagonal; ``cmpq.algorithm.distortion`` turns it into a loss per channel and width; one Lagrangian
over every channel of the model (``cmpq.algorithm.budget``) picks the widths so that the stored
size is the budget, every byte counted. Done before the block walk, on the full-precision weights
(the walk changes no later weight, only the inputs), one block at a time on the device.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cmpq.algorithm.allocation import algorithm1
from cmpq.algorithm.budget import (FP16, BudgetError, channel_cost_bits, row_scale_cost_bits, solve,
                                   sparse_cost_bits, total_cost)
from cmpq.algorithm import kmeans
from cmpq.algorithm.compensated import layer_groups
from cmpq.algorithm.distortion import layer_options_group
from cmpq.config import CMPQConfig
from cmpq.model.blocks import find_blocks, find_linears


def n_sparse(lin: nn.Linear, cfg: CMPQConfig) -> int:
    return int(round(cfg.weight_outlier_frac * lin.out_features * lin.in_features))


def algorithm1_widths(hdiag: torch.Tensor, cfg: CMPQConfig) -> torch.Tensor:
    """The paper's allocation as widths (ablation): O_act FP16 columns, then Algorithm 1 by norm."""
    in_f = hdiag.numel()
    n_act = min(int(round(cfg.act_outlier_frac * in_f)), in_f - 1)
    widths = torch.empty(in_f, dtype=torch.long)
    act = torch.topk(hdiag.float(), n_act).indices if n_act else torch.empty(0, dtype=torch.long)
    rest = torch.ones(in_f, dtype=torch.bool)
    rest[act] = False
    widths[act] = FP16
    widths[rest] = algorithm1(hdiag.float()[rest].sqrt(), cfg.bits, edge_frac=cfg.edge_frac)
    return widths


def smallest_bits(model: nn.Module, cfg: CMPQConfig) -> float:
    """Effective bits per weight with every channel at the narrowest width: from shapes alone."""
    _, blocks = find_blocks(model)
    bits = numel = 0
    for block in blocks:
        for lin in find_linears(block).values():
            out_f, in_f = lin.out_features, lin.in_features
            bits += in_f * channel_cost_bits(min(cfg.widths), out_f, in_f) + sparse_cost_bits(out_f, n_sparse(lin, cfg), in_f)
            bits += row_scale_cost_bits(out_f) if cfg.row_scale else 0
            numel += out_f * in_f
    return bits / max(numel, 1)


def check_reachable(model: nn.Module, cfg: CMPQConfig) -> None:
    """Refuse a budget below ``smallest_bits`` before any calibration work."""
    least = smallest_bits(model, cfg)
    if cfg.bits < least:
        raise BudgetError(f"a budget of {cfg.bits:g} effective bits per weight is below the smallest this model can "
                          f"be stored in with widths {list(cfg.widths)}: {least:.3f} bits per weight (every "
                          f"channel at {min(cfg.widths)} bits; small layers pay more for codebooks). Raise the "
                          f"budget, or allow narrower widths")


@torch.no_grad()
def plan_widths(model: nn.Module, hdiag: dict[tuple[int, str], torch.Tensor], cfg: CMPQConfig,
                device: torch.device, log: Callable[[str], None] | None = None,
                row_weight: dict[tuple[int, str], torch.Tensor] | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Width per input channel (``FP16`` for an FP16 column) of every block linear (``row_weight``:
    per-output-row k-means weights, ``cfg.row_weighting="gradient"``)."""
    _, blocks = find_blocks(model)
    keys, options = [], []
    numel = 0
    # layers of one shape share each k-means run (the same options as alone; fewer GPU launches); a
    # shared run holds every width's copy of its layers (channel_sse_many)
    copies = len(cfg.widths) if kmeans.share_runs(device) else 1
    for i, block in enumerate(blocks):
        linears, got = find_linears(block), {}
        for names in layer_groups(linears, copies):
            got.update(zip(names, layer_options_group(
                [linears[n].weight.detach().to(device) for n in names], [hdiag[(i, n)] for n in names], cfg.widths,
                [n_sparse(linears[n], cfg) for n in names], cfg.alloc_kmeans_iters, cfg.fp16_columns,
                [None if row_weight is None else row_weight.get((i, n)) for n in names], cfg.row_scale,
                cfg.alloc_kmeans_swaps)))
        for name, lin in linears.items():  # block order, as before: the solver's tie-breaks see the same list
            options.append(got[name])
            keys.append((i, name))
            numel += lin.weight.numel()
    budget = cfg.bits * numel
    check_reachable(model, cfg)
    choices = solve(options, budget)
    plan = {k: torch.tensor(o.widths)[c] for k, o, c in zip(keys, options, choices)}
    if log:
        got = total_cost(options, choices) / numel
        mix = torch.cat(list(plan.values()))
        shares = ", ".join(f"{'fp16' if b == FP16 else f'{b}-bit'} {100 * float((mix == b).float().mean()):.2f}%"
                           for b in sorted(set(mix.tolist())))
        log(f"allocation: {got:.4f} effective bits per weight (budget {cfg.bits}); channels: {shares}")
    return plan
