"""Decode kernel v4s (1 token): ``kernel_v4.cu`` behind ctypes; planner and launch.

Reads the quads of the runtime layout (``cmpq/kernels/layout.py``), as v3b: one stream over all
bit groups' quads, a cp.async ring of 4 slots per thread, single fp32 lookup tables (see kernel_v4.cu). The
other v4 variants (pair tables v4p/v4h, deeper ring v4p8/v4h8, more blocks per SM v4s5/v4s6) lost
to this one on the H200 and were deleted; their numbers stay in benchmarks/notes-kernels.md.

``decode(rt, x, splits=None)`` returns None for anything but one token (the caller falls back to
v3b); ``decode_group(rts, x)`` serves up to three layers that share ``x`` in one launch.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import Runtime

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_v4.cu")
NTHREADS = 256
RING_DEPTH = 4  # cp.async slots per thread (kernel_v4.cu RING_DEPTH)
MAX_GROUP = 3  # layers per group launch (kernel_v4.cu MAX_GROUP)
MAX_SMEM = 200 << 10
SM_SMEM = 227 << 10  # usable shared memory per SM (H100/H200), minus per-block reserve below
MAX_BLOCKS_PER_SM = 4  # __launch_bounds__(256, 4): 64 registers


class _G4(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("cb", ctypes.c_void_p), ("ch", ctypes.c_void_p),
                ("nq", ctypes.c_int), ("bits", ctypes.c_int)]


class _P4(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("x", "y", "part", "cnt", "och", "owt", "crow", "scol", "corr", "bias")] + [
                ("g", _G4 * 3)] + [(n, ctypes.c_int) for n in
                ("ldx", "out", "n_act", "S", "is_bf16", "ngroups", "ring_off", "tbl_off")]


class _P4G(ctypes.Structure):
    _fields_ = [("m", _P4 * MAX_GROUP), ("n", ctypes.c_int)]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_v4", _P4, n_int_args=3)
_GROUP_OK: bool | None = None


def _group_library():
    """The library with its group launch configured (checked once), or None."""
    global _GROUP_OK
    lib = library()
    if lib is None:
        return None
    if _GROUP_OK is None:
        lib.cmpq_v4g_launch.restype = ctypes.c_int
        lib.cmpq_v4g_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        _GROUP_OK = lib.cmpq_v4g_params_size() == ctypes.sizeof(_P4G)
    return lib if _GROUP_OK else None


def library():
    return _LIBRARY.get()


def library_error() -> str | None:
    return _LIBRARY.error


def word_bytes(bits: int) -> int:
    """Table bytes of one index word: 32/b channels x 2**b fp32 entries."""
    return (32 // bits) * (1 << bits) * 4


def table_bytes(groups, S: int) -> int:
    """Max over blocks of the table bytes, with the kernel's integer split of the quad stream."""
    G, NQ = [], 0
    for g in groups:
        G.append(NQ)
        NQ += g.nq
    s = np.arange(S, dtype=np.int64)
    q0, q1 = s * NQ // S, (s + 1) * NQ // S
    t = np.zeros(S, dtype=np.int64)
    for g, g0 in zip(groups, G):
        n = np.clip(np.minimum(q1, g0 + g.nq) - np.maximum(q0, g0), 0, None)
        t += n * 4 * word_bytes(g.bits)
    return int(t.max())


def layout(groups, S: int) -> tuple[int, tuple[int, int]]:
    """(dynamic shared memory bytes, (ring offset, table offset)) of a block."""
    ring = RING_DEPTH * NTHREADS * 16
    tbl_off = ring
    # + 256: alignment slack; + 64: the deleted variants' reduction area, kept so that the plans
    # (and the timings measured with them) stay exactly as they were
    return tbl_off + -(-table_bytes(groups, S) // 256) * 256 + 64 + 256, (0, tbl_off)


_PLANS: dict = {}


def plan(groups, out: int, sms: int, splits: int | None = None):
    """Pick the split count S: one or few waves, even work per SM, enough loads in flight."""
    key = (tuple((g.bits, g.nq) for g in groups), out, sms, splits)
    if key not in _PLANS:
        _PLANS[key] = _plan(groups, out, sms, splits)
    return _PLANS[key]


def _plan(groups, out: int, sms: int, splits: int | None):
    rb = -(-out // NTHREADS)
    NQ = max(1, sum(g.nq for g in groups))
    if splits is not None:  # forced (tests, sweeps): refused when a block's tables do not fit
        S = max(1, min(splits, NQ))
        smem, offs = layout(groups, S)
        return (rb, S, smem, offs) if smem <= MAX_SMEM else None
    best = None
    for S in range(1, min(NQ, 4 * sms) + 1):
        smem, offs = layout(groups, S)
        if smem > MAX_SMEM:
            continue
        resident = max(1, min(MAX_BLOCKS_PER_SM, SM_SMEM // (smem + 1024)))
        blocks = rb * S
        per_sm = -(-blocks // sms)  # blocks the busiest SM runs
        waves = -(-per_sm // resident)
        quads = per_sm * -(-NQ // S)  # quads the busiest SM streams (x 256 rows)
        live = min(resident, per_sm)
        inflight = min(1.0, live * (RING_DEPTH - 1) / 8)  # ~32 KB of loads in flight per SM for full rate
        cost = 15 * waves + quads / inflight  # unit: one quad of 256 rows (~0.13 us); ~2 us per wave
        if best is None or cost < best[0] - 1e-9:
            best = (cost, S, smem, offs)
    if best is None:
        return None
    _, S, smem, offs = best
    return rb, S, smem, offs


def _params(rt: Runtime, splits: int | None):
    return cd.PLANS.get(("v4s", rt.key, splits), lambda: _make_params(rt, splits))


def _make_params(rt: Runtime, splits: int | None):
    pl = plan(rt.groups, rt.out, cd._num_sms(rt.device), splits)
    if pl is None:
        return None
    rb, S, smem, offs = pl
    p = _P4()
    p.och, p.owt = rt.outlier_channels.data_ptr(), rt.outlier_weight_t.data_ptr()
    p.crow, p.scol, p.corr = rt.sparse_crow.data_ptr(), rt.sparse_col.data_ptr(), rt.sparse_corr.data_ptr()
    p.bias = rt.bias.data_ptr() if rt.bias is not None else None
    for i, g in enumerate(rt.groups):
        p.g[i].q, p.g[i].cb, p.g[i].ch = g.q.data_ptr(), g.codebook.data_ptr(), g.channels.data_ptr()
        p.g[i].nq, p.g[i].bits = g.nq, g.bits
    p.ngroups = len(rt.groups)
    p.out, p.n_act, p.S = rt.out, rt.outlier_channels.numel(), S
    p.ring_off, p.tbl_off = offs
    return p, rb, S, smem


def decode(rt: Runtime, x: torch.Tensor, splits: int | None = None) -> torch.Tensor | None:
    """``x @ W^T + bias`` for exactly one token; None when this kernel does not apply."""
    lead, n_in, out = x.shape[:-1], x.shape[-1], rt.out
    if x.numel() != n_in or not rt.groups:
        return None
    lib = library()
    if lib is None:
        return None
    x2 = x.reshape(1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pp = _params(rt, splits)
    if pp is None:
        return None
    p, rb, S, smem = pp
    part, cnt = cd._workspace(x.device, out, rb)
    y = torch.empty(1, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.is_bf16 = n_in, int(x.dtype == torch.bfloat16)
    err = lib.cmpq_v4_launch(ctypes.byref(p), rb, S, smem, torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq v4 decode kernel failed: {lib.cmpq_v4_error_string(err).decode()}")
    return y.reshape(*lead, out)


def decode_group(rts: list[Runtime], x: torch.Tensor) -> list[torch.Tensor] | None:
    """``[decode(rt, x) for rt in rts]`` for one token in ONE launch of v4s: the layers share x
    (q/k/v, gate/up), each keeps its own plan and workspace. None when it does not apply."""
    n_in = x.shape[-1]
    if not 1 <= len(rts) <= MAX_GROUP or x.numel() != n_in:
        return None
    if any(rt.n_in != n_in or not rt.groups for rt in rts):
        return None
    lib = _group_library()
    if lib is None:
        return None
    x2 = x.reshape(1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    plans = []
    for rt in rts:
        pp = _params(rt, None)
        if pp is None:
            return None
        plans.append(pp)
    part, cnt = cd._workspace(x.device, sum(rt.out for rt in rts), sum(pp[1] for pp in plans))
    g = _P4G()
    g.n = len(rts)
    ys, po, co = [], 0, 0
    for i, (rt, (p, rb, S, smem)) in enumerate(zip(rts, plans)):
        y = torch.empty(1, rt.out, dtype=x.dtype, device=x.device)
        p.x, p.y = x2.data_ptr(), y.data_ptr()
        p.part, p.cnt = part.data_ptr() + 4 * po, cnt.data_ptr() + 4 * co  # disjoint, self-zeroing
        p.ldx, p.is_bf16 = n_in, int(x.dtype == torch.bfloat16)
        g.m[i] = p
        po, co = po + rt.out, co + rb
        ys.append(y)
    err = lib.cmpq_v4g_launch(ctypes.byref(g), max(pp[1] for pp in plans), max(pp[2] for pp in plans),
                              max(pp[3] for pp in plans), torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq v4 group decode kernel failed: {lib.cmpq_v4_error_string(err).decode()}")
    lead = x.shape[:-1]
    return [y.reshape(*lead, rt.out) for y, rt in zip(ys, rts)]
