"""Decode kernel (1..16 tokens) in Triton: the fallback where the CUDA kernels are not built (no nvcc).

Fused LUT-GEMV over the runtime layout's quads (``cmpq/kernels/layout.py``), no fp16 weight in
memory. Two launches:

1. ``_lut_gemv``: grid ``(row blocks, K splits)``. A program owns ``BLOCK_N`` output rows and a
   slice of every bit group's quads. Per quad it reads each row's 4 index words once (all rows of
   a quad are one contiguous run), takes index ``(word >> f*b) & (2**b - 1)`` for the 4 * 32/b
   channels of the quad, looks the values up in their codebooks (L1-resident) and multiplies with
   the gathered activations ``x[:, channels]``: FMA in fp32 for one token, ``tl.dot`` (fp32
   accumulate) for 2..16 tokens. Partial sums go to ``partial[split, token, row]`` (fp32, tiny):
   no atomics, deterministic.
2. ``_epilogue``: sums the splits, adds the fp16 outlier columns, the sparse-outlier corrections
   (``(sparse_val - W_q) * x``, see layout.py), the bias, and casts to the activation dtype.

The quads' padding (index 0 of an all-zero codebook row) adds nothing, so only the lanes beyond a
quad's 4 * 32/b channels (3 bits: 40 of 64) are masked. Up to three bit groups in one launch.
Tested on CPU through Triton's interpreter; on a GPU only where nvcc is missing (the CUDA kernels
are faster: benchmarks/notes-kernels.md, v1/v2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cmpq.kernels.layout import QUAD_WORDS, Runtime

MAX_TOKENS = 16
MAX_GROUPS = 3


@triton.jit
def _group(acc, q, cb, ch, x, stride_xt, T, nq, rows, rmask, s, S, out,
           B: tl.constexpr, K: tl.constexpr, CP: tl.constexpr, BLOCK_N: tl.constexpr, TP: tl.constexpr):
    """Accumulate this program's share of one bit group's quads into ``acc``.

    Tiles are ``[CP channels, BLOCK_N rows]`` with rows fastest, so the threads of a warp share one
    channel: its codebook gather reads one 32-byte sector (channels across lanes cost ~16 sectors
    per warp load and ran 4x slower than cuBLAS fp16).
    """
    c = tl.arange(0, CP)
    cm = c < 4 * K  # the quad's channels (CP is the next power of two)
    word_of = c // K
    shift = (c % K) * B
    g0 = s * nq // S
    g1 = (s + 1) * nq // S
    for g in range(g0, g1):
        j = g * (4 * K) + c
        chn = tl.load(ch + j, mask=cm, other=0)
        w = tl.load(q + (g * out + rows[None, :]) * 4 + word_of[:, None], mask=cm[:, None] & rmask[None, :], other=0)
        idx = (w >> shift[:, None]) & ((1 << B) - 1)
        wv = tl.load(cb + j[:, None] * (1 << B) + idx, mask=cm[:, None], other=0.0)
        if TP == 1:
            xv = tl.load(x + chn, mask=cm, other=0.0).to(tl.float32)
            acc += wv.to(tl.float32) * xv[:, None]
        else:
            t = tl.arange(0, TP)
            xv = tl.load(x + t[:, None] * stride_xt + chn[None, :], mask=cm[None, :] & (t[:, None] < T), other=0.0)
            if xv.dtype == tl.bfloat16:  # tf32 holds fp16 weights and bf16 activations exactly
                acc = tl.dot(xv.to(tl.float32), wv.to(tl.float32), acc, input_precision="tf32")
            else:
                acc = tl.dot(xv, wv, acc)
    return acc


@triton.jit
def _lut_gemv(
    x, stride_xt, T, out, part,
    q0, cb0, ch0, nq0,
    q1, cb1, ch1, nq1,
    q2, cb2, ch2, nq2,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, CP: tl.constexpr,
    BLOCK_N: tl.constexpr, TP: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < out
    if TP == 1:
        acc = tl.zeros([CP, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([TP, BLOCK_N], dtype=tl.float32)  # tokens x rows: dot(x^T, W^T)
    if B0 > 0:
        acc = _group(acc, q0, cb0, ch0, x, stride_xt, T, nq0, rows, rmask, s, S, out, B0, K0, CP, BLOCK_N, TP)
    if B1 > 0:
        acc = _group(acc, q1, cb1, ch1, x, stride_xt, T, nq1, rows, rmask, s, S, out, B1, K1, CP, BLOCK_N, TP)
    if B2 > 0:
        acc = _group(acc, q2, cb2, ch2, x, stride_xt, T, nq2, rows, rmask, s, S, out, B2, K2, CP, BLOCK_N, TP)
    base = part + s * T * out
    if TP == 1:
        tl.store(base + rows, tl.sum(acc, axis=0), mask=rmask)
    else:
        t = tl.arange(0, TP)
        tl.store(base + t[:, None] * out + rows[None, :], acc, mask=rmask[None, :] & (t[:, None] < T))


@triton.jit
def _epilogue(
    part, S, T, out, y, x, stride_xt,
    och, owt, n_act, crow, scol, corr, bias,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, TP: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = rows < out
    t = tl.arange(0, TP)
    tm = t < T
    m2 = rm[:, None] & tm[None, :]
    acc = tl.zeros([BLOCK, TP], dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part + s * T * out + t[None, :] * out + rows[:, None], mask=m2, other=0.0)
    for a in range(n_act):  # fp16 activation-outlier columns, stored [n_act, out]
        c = tl.load(och + a)
        w = tl.load(owt + a * out + rows, mask=rm, other=0.0).to(tl.float32)
        xv = tl.load(x + t * stride_xt + c, mask=tm, other=0.0).to(tl.float32)
        acc += w[:, None] * xv[None, :]
    start = tl.load(crow + rows, mask=rm, other=0)
    end = tl.load(crow + rows + 1, mask=rm, other=0)
    for k in range(tl.max(end - start, axis=0)):  # sparse outliers: add (val - W_q) * x
        kk = start + k
        km = kk < end
        col = tl.load(scol + kk, mask=km, other=0)
        v = tl.load(corr + kk, mask=km, other=0.0)
        xv = tl.load(x + t[None, :] * stride_xt + col[:, None], mask=km[:, None] & tm[None, :], other=0.0)
        acc += v[:, None] * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
    tl.store(y + t[None, :] * out + rows[:, None], acc.to(y.dtype.element_ty), mask=m2)


_SMS: dict[int, int] = {}


def _num_sms(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 4  # interpreter: small, but still exercises the split
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def decode(rt: Runtime, x: torch.Tensor, block_n: int = 64, splits: int | None = None) -> torch.Tensor | None:
    """``x @ W^T + bias`` for 1..16 tokens through the fused kernel; None if it does not apply."""
    groups = rt.groups
    if len(groups) > MAX_GROUPS:
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], rt.out
    x2 = x.reshape(-1, n_in).contiguous()
    T = x2.shape[0]
    if T == 0 or T > MAX_TOKENS:
        return None
    TP = 1 if T == 1 else 16
    rb = triton.cdiv(out, block_n)
    if splits is None:
        nq = max((g.nq for g in groups), default=1)
        splits = max(1, min(triton.cdiv(4 * _num_sms(x.device), rb), max(1, nq // 2)))
    part = torch.empty(splits, T, out, dtype=torch.float32, device=x.device)
    args, bits = [], []
    for i in range(MAX_GROUPS):
        if i < len(groups):
            g = groups[i]
            args += [g.q, g.codebook, g.channels, g.nq]
            bits.append(g.bits)
        else:
            args += [rt.sparse_crow] * 3 + [0]  # never read: this group has B == 0
            bits.append(0)
    ks = [32 // b if b else 1 for b in bits]
    cp = triton.next_power_of_2(max(QUAD_WORDS * k for k, b in zip(ks, bits) if b) if any(bits) else 16)
    _lut_gemv[(rb, splits)](
        x2, x2.stride(0), T, out, part, *args,
        B0=bits[0], B1=bits[1], B2=bits[2], K0=ks[0], K1=ks[1], K2=ks[2], CP=max(cp, 16),
        BLOCK_N=block_n, TP=TP, num_warps=4,
    )
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    EB = 128
    _epilogue[(triton.cdiv(out, EB),)](
        part, splits, T, out, y, x2, x2.stride(0),
        rt.outlier_channels, rt.outlier_weight_t, rt.outlier_channels.numel(),
        rt.sparse_crow, rt.sparse_col, rt.sparse_corr, rt.bias if rt.bias is not None else part,
        HAS_BIAS=rt.bias is not None, BLOCK=EB, TP=triton.next_power_of_2(T), num_warps=4,
    )
    return y.reshape(*lead, out)
