"""Prefill path (more than 16 tokens): dequantization into a scratch weight, then cuBLAS.

On CUDA with nvcc, ``dequant_cuda.cu`` dequantizes from the decode kernels' layout
(``cuda_decode.repack``, no second copy of the indices); elsewhere (the Triton interpreter in
tests, no nvcc, other bit widths) the Triton kernel below does it from ``layout.prepare``.

The weight is dequantized in *storage order* (each group's channels, then the outlier columns) and
*transposed*, ``[in, out]``: the lanes of a warp hold consecutive output rows, so every store is
one contiguous run (a plain ``[out, in]`` store would put each lane on another row: one 32-byte
sector written per 2-byte value). ``x`` is gathered into the same order with one cheap
``index_select``; cuBLAS takes the transposed weight as it is. Sparse outliers overwrite their
positions afterwards (they replace values).
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import prefill_index, prepare

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dequant_cuda.cu")
NTHREADS = 256


class _DQ(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "cb", "wt")] + [
                (n, ctypes.c_int) for n in ("nq", "out", "n", "bits", "off", "is_bf16")]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_dq", _DQ, n_int_args=1)


def _dequantize_cuda(layer, dtype: torch.dtype) -> torch.Tensor | None:
    """``W_hat[:, perm]^T`` ``[in, out]`` from the CUDA kernel, or None where it does not apply."""
    dev = layer.outlier_weight.device
    if (dev.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not cd.supported(layer)
            or os.environ.get("CMPQ_KERNELS") == "triton"):
        return None
    lib = _LIBRARY.get()
    if lib is None:
        return None
    lay = cd.repack(layer)
    idx = prefill_index(layer)
    out, n_in = layer.out_features, layer.in_features
    wt = torch.empty(n_in, out, dtype=dtype, device=dev)
    off, stream = 0, torch.cuda.current_stream(dev).cuda_stream
    for g in lay.groups:
        p = _DQ(g.q.data_ptr(), g.codebook.data_ptr(), wt.data_ptr(), g.nq, out, g.n, g.bits, off,
                int(dtype == torch.bfloat16))
        err = lib.cmpq_dq_launch(ctypes.byref(p), g.nq, stream)
        if err:
            raise RuntimeError(f"cmpq dequant kernel failed: {lib.cmpq_dq_error_string(err).decode()}")
        off += g.n
    return _fill_outliers(wt, lay.outlier_weight_t, idx.sparse_flat, layer.sparse_val)


def _fill_outliers(wt: torch.Tensor, outlier_weight_t: torch.Tensor, sparse_flat: torch.Tensor,
                   sparse_val: torch.Tensor) -> torch.Tensor:
    """The FP16 outlier columns (last rows of ``wt``) and the sparse outliers (they replace values)."""
    n_act = outlier_weight_t.shape[0]
    if n_act:
        wt[wt.shape[0] - n_act:] = outlier_weight_t.to(wt.dtype)
    if sparse_flat.numel():
        wt.view(-1)[sparse_flat] = sparse_val.to(wt.dtype)
    return wt


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


def dequantize_permuted_t(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_hat[:, perm]^T, perm)``: the dense weight, columns in storage order, as a contiguous
    ``[in, out]`` tensor of ``dtype``, and that column order."""
    wt = _dequantize_cuda(layer, dtype)
    if wt is not None:
        return wt, prefill_index(layer).perm
    lay = prepare(layer)
    out, n_in = layer.out_features, layer.in_features
    wt = torch.empty(n_in, out, dtype=dtype, device=lay.perm.device)
    BR = 128
    for g in lay.groups:
        if g.n:
            grid = (triton.cdiv(out, BR), triton.cdiv(g.n, 32))
            _dequant_t[grid](g.packed_t, g.codebook, wt, g.offset, g.n, out, B=g.bits, BLOCK_R=BR, num_warps=4)
    return _fill_outliers(wt, lay.outlier_weight_t, lay.sparse_flat, lay.sparse_val), lay.perm


def dequantize_permuted(layer, dtype: torch.dtype) -> torch.Tensor:
    """``W_hat[:, perm]`` as a dense ``[out, in]`` tensor (a transposed view)."""
    return dequantize_permuted_t(layer, dtype)[0].t()


def prefill(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for many tokens: dequantize + ``F.linear`` (cuBLAS)."""
    wt, perm = dequantize_permuted_t(layer, x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x.index_select(-1, perm), wt.t(), bias)
