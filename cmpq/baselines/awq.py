"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization", Sec. 3.2-3.3) for one linear or
a set of linears that read the same input (e.g. q/k/v, or gate/up).

AWQ protects salient input channels (those with large activations) by scaling them up before
quantization: ``y = x W^T = (x / s) (W * s)^T``, and quantizing ``W * s`` instead of ``W``. The
per-channel scale is ``s = mean|x|^alpha`` with ``alpha`` picked by grid search on the layer-output
error (paper Eq. 5). Optionally the quantization range of each group is then shrunk (clipped) by a
second grid search on the output error (the reference's ``auto_clip``).

The real AWQ folds ``1 / s`` into the previous op (a norm or linear) and stores ``Q(W * s)``. Here the
returned weight is the effective fake-quantized ``Q(W * s) / s``, which can replace ``W`` with nothing
else changed; in exact arithmetic the two are the same function of ``x``.

Output errors are computed as quadratic forms with the input Gram matrix ``x^T x`` when there are more
tokens than input channels (cheaper, and the same value as ``||x D^T||^2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .rtn import _group_size, rtn_quantize


def _sq_out_err(D: Tensor, x: Tensor, G: Tensor | None) -> Tensor:
    """``||x D^T||_F^2`` for a weight error ``D [out, in]``; uses ``G = x^T x`` when given."""
    if G is None:
        return (x @ D.T).pow(2).sum()
    return ((D @ G) * D).sum()


@torch.no_grad()
def awq_search_scale(
    weights: list[Tensor], x: Tensor, bits: int, group_size: int | None = 128, grid: int = 20
) -> tuple[Tensor, Tensor]:
    """Grid-search AWQ's per-input-channel scales for linears sharing the input ``x [n_tokens, in]``.

    For ``alpha = k / grid``, ``k = 0..grid-1``: ``s = clamp(mean|x|^alpha, 1e-4)``, normalized by
    ``sqrt(max(s) * min(s))`` as in the reference, and the loss is the mean squared error of the
    concatenated outputs ``x W^T`` vs ``(x / s) Q(W * s)^T``. ``alpha = 0`` gives ``s = 1`` (plain RTN), so
    the chosen loss is never above RTN's.

    Returns ``(scales [in] float32, loss_by_ratio [grid])``, ``loss_by_ratio[k]`` being the loss at
    ``alpha = k / grid``.
    """
    W = torch.cat([w.detach().float() for w in weights], 0)
    x = x.detach().reshape(-1, W.shape[1]).to(device=W.device, dtype=torch.float32)
    G = x.T @ x if x.shape[0] > x.shape[1] else None
    denom = x.shape[0] * W.shape[0]
    x_mean = x.abs().mean(0)

    losses = torch.empty(grid, dtype=torch.float32)
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for k in range(grid):
        s = x_mean.pow(k / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        D = W - rtn_quantize(W * s, bits, group_size) / s
        losses[k] = (_sq_out_err(D, x, G) / denom).item()
        if losses[k] < best:
            best, best_s = losses[k].item(), s
    return best_s, losses


@torch.no_grad()
def awq_search_clip(
    W: Tensor,
    x: Tensor,
    scales: Tensor,
    bits: int,
    group_size: int | None = 128,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> Tensor:
    """AWQ's ``auto_clip``: per (row, group) the symmetric clip ``|w| <= c * absmax`` of the scaled
    weight ``W * s``, ``c = 1 - k / grid`` for ``k < max_shrink * grid``, minimizing that group's share of
    the output error on inputs ``x / s``. Returns ``clip_max [out, n_groups]`` (in the scaled domain).

    Vectorized over rows and groups: each group's error is ``d^T G_g d`` with the group's input Gram
    ``G_g`` (the ragged last group is zero-padded for this product only; padding adds nothing). Uses
    every token of ``x`` (the reference subsamples 512 tokens).
    """
    Ws = W.detach().float() * scales
    out, n = Ws.shape
    g = _group_size(n, group_size)
    ng = -(-n // g)
    pad = ng * g - n
    xs = x.detach().reshape(-1, n).to(device=Ws.device, dtype=torch.float32) / scales
    xp = F.pad(xs, (0, pad)).view(-1, ng, g)
    Gg = torch.einsum("tnk,tnl->nkl", xp, xp)  # [ng, g, g]
    gid = torch.arange(n, device=Ws.device) // g

    absmax = F.pad(Ws.abs(), (0, pad)).view(out, ng, g).amax(-1)  # [out, ng]
    best_err = torch.full_like(absmax, float("inf"))
    best_max = absmax.clone()
    for k in range(max(1, int(max_shrink * grid))):
        mv = absmax * (1 - k / grid)
        lim = mv[:, gid]
        D = F.pad(Ws - rtn_quantize(torch.clamp(Ws, -lim, lim), bits, group_size), (0, pad)).view(out, ng, g)
        err = (torch.einsum("onk,nkl->onl", D, Gg) * D).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mv, best_max)
    return best_max


def awq_quantize(
    W: Tensor, scales: Tensor, bits: int, group_size: int | None = 128, clip_max: Tensor | None = None
) -> Tensor:
    """Effective AWQ weight ``Q(clip(W * s)) / s`` in ``W.dtype`` (``clip_max`` from :func:`awq_search_clip`)."""
    s = scales.to(device=W.device, dtype=torch.float32)
    Ws = W.detach().float() * s
    if clip_max is not None:
        gid = torch.arange(W.shape[1], device=W.device) // _group_size(W.shape[1], group_size)
        lim = clip_max[:, gid]
        Ws = torch.clamp(Ws, -lim, lim)
    return (rtn_quantize(Ws, bits, group_size) / s).to(W.dtype)


def awq_quantize_layers(
    weights: list[Tensor],
    x: Tensor,
    bits: int,
    group_size: int | None = 128,
    grid: int = 20,
    clip: bool = True,
) -> tuple[list[Tensor], Tensor]:
    """Full AWQ for linears sharing input ``x``: scale search, then (``clip=True``) per-layer clip search,
    then fake quantization. Returns ``(effective weights, scales)``.

    The reference skips clipping for q/k projections (their error goes through the attention softmax);
    pass ``clip=False`` for those.
    """
    scales, _ = awq_search_scale(weights, x, bits, group_size, grid)
    out = []
    for w in weights:
        cm = awq_search_clip(w, x, scales, bits, group_size, grid) if clip else None
        out.append(awq_quantize(w, scales, bits, group_size, cm))
    return out, scales
