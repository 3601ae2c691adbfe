"""Prefill path (more than 16 tokens): dequantization into a scratch weight, then cuBLAS.

Both dequantizers read the runtime layout's quads (``cmpq/kernels/layout.py``, no second copy of
the indices): on CUDA with nvcc ``dequant_cuda.cu`` (the whole layer in one launch); elsewhere (the
Triton interpreter in tests, no nvcc) the Triton kernel below, one launch per width group.

The weight is dequantized *transposed*, ``[in, out]``: the lanes of a warp hold consecutive output
rows, so every store is one contiguous run (a plain ``[out, in]`` store would put each lane on
another row: one 32-byte sector written per 2-byte value). Each channel's values go to its own row
(the group's channel ids), so ``x`` is used as it comes; cuBLAS takes the transposed weight as it
is. Sparse outliers overwrite their positions afterwards (they replace values). (Until 2026-12-06
the rows were written in storage order and ``x`` gathered into it, one more pass over ``x``.)
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import MAX_GROUPS, QUAD_WORDS, Runtime

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dequant_cuda.cu")
NTHREADS = 256


class _DQ(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "cb", "ch", "wt")] + [
                (n, ctypes.c_int) for n in ("nq", "out", "n", "bits", "is_bf16")]


class _DQL(ctypes.Structure):
    _fields_ = [("g", _DQ * MAX_GROUPS), ("owt", ctypes.c_void_p), ("och", ctypes.c_void_p), ("wt", ctypes.c_void_p)] + [
                (n, ctypes.c_int) for n in ("ng", "n_act", "out", "is_bf16")]


# one launch per layer: every width group and the FP16 columns (dequant_cuda.cu says what it replaced)
_LIBRARY = cd.KernelLibrary(SRC, "cmpq_dql", _DQL, n_int_args=1)


def _dequantize_cuda(rt: Runtime, dtype: torch.dtype) -> torch.Tensor | None:
    """``W_hat^T`` ``[in, out]`` from the CUDA kernel, or None where it does not apply: every width
    group and the FP16 columns in one launch; then the sparse outliers, which replace values."""
    dev = rt.device  # (Runtime.from_tensors has checked the layout's dtypes and its group count)
    if dev.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    lib = _LIBRARY.get()
    if lib is None:
        return None
    wt = torch.empty(rt.n_in, rt.out, dtype=dtype, device=dev)
    p = _DQL()
    is_bf16 = int(dtype == torch.bfloat16)
    for i, g in enumerate(rt.groups):
        p.g[i] = _DQ(g.q.data_ptr(), g.codebook.data_ptr(), g.channels.data_ptr(), wt.data_ptr(), g.nq, rt.out,
                     g.n, g.bits, is_bf16)
    n_act = rt.outlier_channels.numel()
    p.owt, p.och, p.wt = rt.outlier_weight_t.data_ptr(), rt.outlier_channels.data_ptr(), wt.data_ptr()
    p.ng, p.n_act, p.out, p.is_bf16 = len(rt.groups), n_act, rt.out, is_bf16
    err = lib.cmpq_dql_launch(ctypes.byref(p), sum(g.nq for g in rt.groups) + n_act,
                              torch.cuda.current_stream(dev).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq dequant kernel failed: {lib.cmpq_dql_error_string(err).decode()}")
    if rt.sparse_flat.numel():
        wt.view(-1)[rt.sparse_flat] = rt.sparse_val.to(wt.dtype)
    return wt


def _fill_outliers(wt: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The FP16 outlier columns (rows ``outlier_channels`` of ``wt``) and the sparse outliers (they
    replace values): the Triton dequantizer's second step."""
    if rt.outlier_channels.numel():
        wt[rt.outlier_channels.long()] = rt.outlier_weight_t.to(wt.dtype)
    if rt.sparse_flat.numel():
        wt.view(-1)[rt.sparse_flat] = rt.sparse_val.to(wt.dtype)
    return wt


@triton.jit
def _dequant_t(q, cb, ch, wt, n, out, B: tl.constexpr, K: tl.constexpr, CP: tl.constexpr,
               BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)  # quad
    c = tl.arange(0, CP)
    j = g * (4 * K) + c
    rm = rows < out
    jm = (c < 4 * K) & (j < n)
    w = tl.load(q + (g * out + rows[None, :]) * 4 + (c // K)[:, None], mask=jm[:, None] & rm[None, :], other=0)
    idx = (w >> ((c % K) * B)[:, None]) & ((1 << B) - 1)  # [CP, BLOCK_R], rows fastest
    v = tl.load(cb + j[:, None] * (1 << B) + idx, mask=jm[:, None], other=0.0)
    col = tl.load(ch + j, mask=jm, other=0)
    ptr = wt + col[:, None].to(tl.int64) * out + rows[None, :]
    tl.store(ptr, v.to(wt.dtype.element_ty), mask=rm[None, :] & jm[:, None])


def dequantize_t(rt: Runtime, dtype: torch.dtype, cuda: bool = True) -> torch.Tensor:
    """``W_hat^T``: the dense weight as a contiguous ``[in, out]`` tensor of ``dtype``.
    ``cuda=False`` skips the CUDA kernel."""
    wt = _dequantize_cuda(rt, dtype) if cuda else None
    if wt is not None:
        return wt
    out = rt.out
    wt = torch.empty(rt.n_in, out, dtype=dtype, device=rt.device)
    BR = 128
    for g in rt.groups:
        K = 32 // g.bits
        grid = (triton.cdiv(out, BR), g.nq)
        _dequant_t[grid](g.q, g.codebook, g.channels, wt, g.n, out, B=g.bits, K=K,
                         CP=triton.next_power_of_2(QUAD_WORDS * K), BLOCK_R=BR, num_warps=4)
    return _fill_outliers(wt, rt)


def prefill(rt: Runtime, x: torch.Tensor, cuda: bool = True) -> torch.Tensor:
    """``x @ W^T + bias`` for many tokens: dequantize + ``F.linear`` (cuBLAS). (Dequantizing the
    next layer on a side stream during this GEMM was tried and lost: notes-kernels.md, 2026-12-07 night.)"""
    bias = None if rt.bias is None else rt.bias.to(x.dtype)
    return F.linear(x, dequantize_t(rt, x.dtype, cuda).t(), bias)
