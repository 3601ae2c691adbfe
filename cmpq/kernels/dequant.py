"""Prefill path (more than 16 tokens): Triton dequantization into a scratch weight, then cuBLAS.

The weight is dequantized in *storage order* (each group's channels, then the outlier columns) and
*transposed*, ``[in, out]``: the lanes of a warp hold consecutive output rows, so every store is
one contiguous run (a plain ``[out, in]`` store would put each lane on another row: one 32-byte
sector written per 2-byte value). ``x`` is gathered into the same order with one cheap
``index_select``; cuBLAS takes the transposed weight as it is. Sparse outliers overwrite their
positions afterwards (they replace values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmpq.kernels.layout import prepare


@triton.jit
def _dequant_t(pk, cb, wt, col0, n, out, B: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    lane = tl.arange(0, 32)
    j = g * 32 + lane
    rm = rows < out
    jm = j < n
    idx = tl.zeros([32, BLOCK_R], dtype=tl.int32)  # rows fastest: one codebook sector per warp
    for p in tl.static_range(B):
        word = tl.load(pk + (g * B + p) * out + rows, mask=rm, other=0)
        idx |= ((word[None, :] >> lane[:, None]) & 1) << p
    v = tl.load(cb + j[:, None] * (1 << B) + idx, mask=jm[:, None], other=0.0)
    ptr = wt + (col0 + j[:, None]).to(tl.int64) * out + rows[None, :]
    tl.store(ptr, v.to(wt.dtype.element_ty), mask=rm[None, :] & jm[:, None])


def dequantize_permuted(layer, dtype: torch.dtype) -> torch.Tensor:
    """``W_hat[:, perm]`` (see layout.py) as a dense ``[out, in]`` tensor of ``dtype`` (a transposed
    view of a contiguous ``[in, out]`` tensor)."""
    lay = prepare(layer)
    out, n_in = layer.out_features, layer.in_features
    wt = torch.empty(n_in, out, dtype=dtype, device=lay.perm.device)
    BR = 128
    for g in lay.groups:
        if g.n:
            grid = (triton.cdiv(out, BR), triton.cdiv(g.n, 32))
            _dequant_t[grid](g.packed_t, g.codebook, wt, g.offset, g.n, out, B=g.bits, BLOCK_R=BR, num_warps=4)
    n_act = lay.outlier_channels.numel()
    if n_act:
        wt[n_in - n_act:] = lay.outlier_weight_t.to(dtype)
    if lay.sparse_flat.numel():
        wt.view(-1)[lay.sparse_flat] = lay.sparse_val.to(dtype)
    return wt.t()


def prefill(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for many tokens: dequantize (Triton) + ``F.linear`` (cuBLAS)."""
    lay = prepare(layer)
    w = dequantize_permuted(layer, x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x.index_select(-1, lay.perm), w, bias)
