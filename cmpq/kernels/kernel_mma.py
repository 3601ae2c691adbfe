"""Decode kernel "mma" (2..16 tokens, tensor cores): ``kernel_mma.cu`` behind ctypes; planner, launch.

Reads the fragment-order part of the runtime layout (``layout.Mma``, built once at load time by
``cmpq/kernels/layout.py``): per b-bit group, chunks of 16*KS channels (KS = 8 / 5 / 4 k16-steps
for 2 / 3 / 4 bits), the fp16 outlier columns as a fourth kind (KS = 1); ``q [NC, ntiles, 32, 4]``
int32 holds the 16 bytes lane ``l`` of a warp needs for its m16n8k16 A fragments of one (chunk,
16-row tile) (field order in kernel_mma.cu); ``tbl``: codebooks per (chunk, k-step) at the
bank-conflict-free slot order; ``chl``: the input channel of every MMA k position (x gathers).
Sparse corrections and bias come from the shared part of the layout, as for v3b.

``decode(rt, x, splits=None, tpb=None)``: ``x @ W^T + bias`` for 1..16 tokens, None if the kernel
does not apply (no fragment layout, no library, a forced plan that does not fit).
"""

from __future__ import annotations

import ctypes
import os

import torch

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import MMA_KINDS as KINDS
from cmpq.kernels.layout import MMA_KS as KS
from cmpq.kernels.layout import Runtime

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_mma.cu")
NTHREADS, NWARPS, RING_D = 256, 8, 4
TB = {2: 1024, 3: 1280, 4: 2048, 16: 0}  # table bytes per chunk: KS * 16 * 2^b * 2
MAX_SMEM = 200 << 10
SM_SMEM = 227 << 10
BLOCKS_PER_SM = 3  # __launch_bounds__(256, 3)
DEFAULT_TPB = 8
# A grid that spills past one wave of blocks by at most this share is cut back to one wave: the
# spilled blocks run as a second wave as long as the first. H100, 2026-12-07
# (`benchmarks/results/mma-splits-h100.json`, `kernel_bench.py --impl mma --sweep`, 3 bits, graph-timed):
# 4096x4096 and 4096x11008 (1.05 waves) and 11008x4096 (1.09) ran 11-22% faster at one wave at 2, 4
# and 16 tokens; at 8 tokens -21%, +2% and +13% respectively. 8192x8192 (1.13 waves) ran 3-13%
# slower at one wave at 2-8 tokens, so it stays above the bound.
MAX_TAIL_SHARE = 0.10


class _PM(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("q", "tbl", "chl", "x", "y", "part", "cnt", "crow", "scol", "corr", "bias", "xf")] + [
                ("cs", ctypes.c_int * 5)] + [(n, ctypes.c_int) for n in
                ("ntiles", "out", "ldx", "T", "S", "tpb", "red_off", "tbl_off", "xf_off", "nks")]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_mma", _PM, n_int_args=5)


def library():
    return _LIBRARY.get()


def library_error() -> str | None:
    return _LIBRARY.error


# -- plan ------------------------------------------------------------------------------------------
def _ranges(cs, S):
    NC = cs[-1]
    return [(s * NC // S, (s + 1) * NC // S) for s in range(S)]


def _toff(cs, c):
    return sum((min(c, cs[k + 1]) - min(c, cs[k])) * TB[kind] for k, kind in enumerate(KINDS))


def _koff(cs, c):
    return sum((min(c, cs[k + 1]) - min(c, cs[k])) * KS[kind] for k, kind in enumerate(KINDS))


def smem_layout(cs, S: int, ntl: int, tpb: int) -> tuple[int, tuple[int, int, int]]:
    tb = kb = 0
    for c0, c1 in _ranges(cs, S):
        tb = max(tb, _toff(cs, c1) - _toff(cs, c0))
        kb = max(kb, _koff(cs, c1) - _koff(cs, c0))
    ring = NWARPS * RING_D * 512
    red_off = ring
    tbl_off = red_off + -(-(tpb * 16 * 8 * ntl * 4) // 256) * 256
    xf_off = tbl_off + -(-tb // 256) * 256
    total = xf_off + kb * 32 * ntl * 8
    return total + 256 + 64, (red_off, tbl_off, xf_off)  # + 256: alignment slack


def plan(cs, ntiles: int, ntl: int, sms: int, splits: int | None = None, tpb: int | None = None):
    tpb = tpb or DEFAULT_TPB
    rb = -(-ntiles // tpb)
    NC = max(1, cs[-1])
    cstride = NWARPS // tpb
    if splits is None:
        # ~BLOCKS_PER_SM blocks per SM, each warp >= 2 chunks; a small tail wave is cut (MAX_TAIL_SHARE)
        wave = sms * BLOCKS_PER_SM
        S = -(-wave // rb)
        if wave < rb * S <= wave * (1 + MAX_TAIL_SHARE) and wave // rb >= 1:
            S = wave // rb
        S = max(1, min(S, NC // (2 * cstride)))
        while S < NC and smem_layout(cs, S, ntl, tpb)[0] > SM_SMEM // BLOCKS_PER_SM - 1024:
            S += 1
    else:
        S = max(1, min(splits, NC))
    smem, offs = smem_layout(cs, S, ntl, tpb)
    if smem > MAX_SMEM:
        return None
    return rb, S, smem, offs, tpb


def _params(rt: Runtime, ntl: int, splits: int | None, tpb: int | None):
    return cd.PLANS.get(("mma", rt.key, ntl, splits, tpb), lambda: _make_params(rt, ntl, splits, tpb))


def _make_params(rt: Runtime, ntl: int, splits: int | None, tpb: int | None):
    m = rt.mma
    pl = plan(m.cs, m.ntiles, ntl, cd._num_sms(rt.device), splits, tpb)
    if pl is None:
        return None
    rb, S, smem, (red_off, tbl_off, xf_off), tpb = pl
    p = _PM()
    p.q, p.tbl, p.chl = m.q.data_ptr(), m.tbl.data_ptr(), m.chl.data_ptr()
    p.crow, p.scol, p.corr = rt.sparse_crow.data_ptr(), rt.sparse_col.data_ptr(), rt.sparse_corr.data_ptr()
    p.bias = rt.bias.data_ptr() if rt.bias is not None else None
    for i, v in enumerate(m.cs):
        p.cs[i] = v
    p.ntiles, p.out, p.S, p.tpb = m.ntiles, rt.out, S, tpb
    p.red_off, p.tbl_off, p.xf_off = red_off, tbl_off, xf_off
    p.nks = _koff(m.cs, m.cs[-1])
    return p, rb, S, smem


def decode(rt: Runtime, x: torch.Tensor, splits: int | None = None, tpb: int | None = None) -> torch.Tensor | None:
    """``x @ W^T + bias`` for 1..16 tokens on CUDA (tensor cores); None when this kernel does not apply.
    Two launches: ``mma_xprep`` puts x in fragment order once, then the main kernel."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or rt.mma is None:
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], rt.out
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T == 0 or T > 16:
        return None
    lib = library()
    if lib is None:
        return None
    if rt.mma.cs[-1] == 0:
        return None
    ntl = 1 if T <= 8 else 2
    pp = _params(rt, ntl, splits, tpb)
    if pp is None:
        return None
    p, rb, S, smem = pp
    part, cnt = cd._workspace(x.device, out * 8 * ntl, rb)
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.T = x2.stride(0), T
    # x in fragment order (``mma_xprep``). The ctypes struct is cached per plan: every field a call
    # sets is set on every call. The buffer lives past the launch, after which the stream orders
    # any reuse of its memory.
    xf = torch.empty(p.nks * 32 * ntl * 2, dtype=torch.int32, device=x.device)
    p.xf = xf.data_ptr()
    err = lib.cmpq_mma_launch(ctypes.byref(p), ntl, int(x.dtype == torch.bfloat16), rb, S, smem,
                              torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq mma decode kernel failed: {lib.cmpq_mma_error_string(err).decode()}")
    return y.reshape(*lead, out)
