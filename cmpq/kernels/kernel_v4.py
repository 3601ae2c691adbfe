"""Decode kernel v4 (1 token): ``kernel_v4.cu`` behind ctypes; planner and launch.

Reads the same one-time layout as v3b (``cuda_decode.repack``). Variants (see kernel_v4.cu):

| name   | 2-bit        | 3-bit               | 4-bit  | cp.async ring depth |
|--------|--------------|---------------------|--------|---------------------|
| v4s    | single fp32  | single fp32         | single | 4 |
| v4p    | pair fp32    | pair fp32 (64 ent.) | single | 4 |
| v4h    | pair fp32    | pair fp16, scaled   | single | 4 |
| v4p8   | as v4p       |                     |        | 8 |
| v4h8   | as v4h       |                     |        | 8 |
| v4s5   | as v4s, 48 registers (5 blocks/SM)  |  |        | 4 |
| v4s6   | as v4s, 40 registers (6 blocks/SM, small spills) | | | 4 |

``decode(layer, x, variant, splits=None)`` returns None for anything but one token (the caller
falls back to v3b).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from cmpq.kernels import cuda_decode as cd

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_v4.cu")
NTHREADS = 256
VARIANTS = {"v4s": (0, 4), "v4p": (1, 4), "v4h": (2, 4), "v4p8": (1, 8), "v4h8": (2, 8), "v4s5": (0, 4), "v4s6": (0, 4)}
MIN_BLOCKS = {"v4s5": 5, "v4s6": 6}  # __launch_bounds__ minimum blocks per SM; 4 for the others
MAX_GROUP = 3  # layers per group launch (kernel_v4.cu MAX_GROUP)
MAX_SMEM = 200 << 10
SM_SMEM = 227 << 10  # usable shared memory per SM (H100/H200), minus per-block reserve below
MAX_BLOCKS_PER_SM = 4  # __launch_bounds__(256, 4): 64 registers (the default; MIN_BLOCKS per variant)


class _G4(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("cb", ctypes.c_void_p), ("ch", ctypes.c_void_p),
                ("nq", ctypes.c_int), ("bits", ctypes.c_int), ("pair", ctypes.c_int), ("esize", ctypes.c_int)]


class _P4(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("x", "y", "part", "cnt", "och", "owt", "crow", "scol", "corr", "bias")] + [
                ("g", _G4 * 3)] + [(n, ctypes.c_int) for n in
                ("ldx", "out", "n_act", "S", "is_bf16", "ngroups", "ring_off", "tbl_off", "stage_off", "red_off")]


class _P4G(ctypes.Structure):
    _fields_ = [("m", _P4 * MAX_GROUP), ("n", ctypes.c_int)]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_v4", _P4, n_int_args=6)
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


def group_modes(groups, mode: int) -> list[tuple[int, int]]:
    """(pair, esize) per group."""
    res = []
    for g in groups:
        pair = int(mode >= 1 and g.bits in (2, 3))
        esize = 2 if (mode == 2 and g.bits == 3) else 4
        res.append((pair, esize))
    return res


def word_bytes(bits: int, pair: int, esize: int) -> int:
    K = 32 // bits
    return (K // 2) * (1 << (2 * bits)) * esize if pair else K * (1 << bits) * 4


def slice_bytes(groups, modes, S: int) -> tuple[int, int]:
    """Max over blocks of (table bytes, staging bytes), with the kernel's integer split."""
    G, NQ = [], 0
    for g in groups:
        G.append(NQ)
        NQ += g.nq
    s = np.arange(S, dtype=np.int64)
    q0, q1 = s * NQ // S, (s + 1) * NQ // S
    t = np.zeros(S, dtype=np.int64)
    st = np.zeros(S, dtype=np.int64)
    for g, (pair, esize), g0 in zip(groups, modes, G):
        n = np.clip(np.minimum(q1, g0 + g.nq) - np.maximum(q0, g0), 0, None)
        t += n * 4 * word_bytes(g.bits, pair, esize)
        if pair:
            st += n * 4 * (32 // g.bits) * (1 << g.bits) * 4
    return int(t.max()), int(st.max())


def layout(groups, modes, S: int, depth: int) -> tuple[int, tuple[int, int, int, int]]:
    ring = depth * NTHREADS * 16
    t, st = slice_bytes(groups, modes, S)
    tbl_off = ring
    stage_off = tbl_off + -(-t // 256) * 256
    red_off = stage_off + -(-st // 16) * 16
    return red_off + 64 + 256, (0, tbl_off, stage_off, red_off)  # + 256: alignment slack


_PLANS: dict = {}


def plan(groups, out: int, mode: int, depth: int, sms: int, splits: int | None = None,
         max_blocks: int = MAX_BLOCKS_PER_SM):
    """Pick the split count S: one or few waves, even work per SM, enough loads in flight."""
    key = (tuple((g.bits, g.nq) for g in groups), out, mode, depth, sms, splits, max_blocks)
    if key not in _PLANS:
        _PLANS[key] = _plan(groups, out, mode, depth, sms, splits, max_blocks)
    return _PLANS[key]


def _plan(groups, out: int, mode: int, depth: int, sms: int, splits: int | None, max_blocks: int):
    rb = -(-out // NTHREADS)
    modes = group_modes(groups, mode)
    NQ = max(1, sum(g.nq for g in groups))
    if splits is not None:  # forced (tests, sweeps): refused when a block's tables do not fit
        S = max(1, min(splits, NQ))
        smem, offs = layout(groups, modes, S, depth)
        return (rb, S, smem, offs) if smem <= MAX_SMEM else None
    best = None
    for S in range(1, min(NQ, 4 * sms) + 1):
        smem, offs = layout(groups, modes, S, depth)
        if smem > MAX_SMEM:
            continue
        resident = max(1, min(max_blocks, SM_SMEM // (smem + 1024)))
        blocks = rb * S
        per_sm = -(-blocks // sms)  # blocks the busiest SM runs
        waves = -(-per_sm // resident)
        quads = per_sm * -(-NQ // S)  # quads the busiest SM streams (x 256 rows)
        live = min(resident, per_sm)
        inflight = min(1.0, live * (depth - 1) / 8)  # ~32 KB of loads in flight per SM for full rate
        cost = 15 * waves + quads / inflight  # unit: one quad of 256 rows (~0.13 us); ~2 us per wave
        if best is None or cost < best[0] - 1e-9:
            best = (cost, S, smem, offs)
    if best is None:
        return None
    _, S, smem, offs = best
    return rb, S, smem, offs


def _params(layer, lay, mode: int, depth: int, splits: int | None, minb: int = MAX_BLOCKS_PER_SM):
    k = ("v4", mode, depth, splits, minb)
    if k in lay.plans:
        return lay.plans[k]
    dev = layer.outlier_weight.device
    pl = plan(lay.groups, layer.out_features, mode, depth, cd._num_sms(dev), splits, minb)
    if pl is None:
        lay.plans[k] = None
        return None
    rb, S, smem, offs = pl
    p = _P4()
    p.och, p.owt = lay.outlier_channels.data_ptr(), lay.outlier_weight_t.data_ptr()
    p.crow, p.scol, p.corr = lay.sparse_crow.data_ptr(), lay.sparse_col.data_ptr(), lay.sparse_corr.data_ptr()
    p.bias = lay.bias.data_ptr() if lay.bias is not None else None
    for i, (g, (pair, esize)) in enumerate(zip(lay.groups, group_modes(lay.groups, mode))):
        p.g[i].q, p.g[i].cb, p.g[i].ch = g.q.data_ptr(), g.codebook.data_ptr(), g.channels.data_ptr()
        p.g[i].nq, p.g[i].bits, p.g[i].pair, p.g[i].esize = g.nq, g.bits, pair, esize
    p.ngroups = len(lay.groups)
    p.out, p.n_act, p.S = layer.out_features, lay.outlier_channels.numel(), S
    p.ring_off, p.tbl_off, p.stage_off, p.red_off = offs
    lay.plans[k] = (p, rb, S, smem)
    return lay.plans[k]


def decode(layer, x: torch.Tensor, variant: str, splits: int | None = None) -> torch.Tensor | None:
    """``layer(x)`` for exactly one token; None when this kernel does not apply."""
    mode, depth = VARIANTS[variant]
    minb = MIN_BLOCKS.get(variant, MAX_BLOCKS_PER_SM)
    lead, n_in, out = x.shape[:-1], x.shape[-1], layer.out_features
    if x.numel() != n_in or not cd.supported(layer):
        return None
    lib = library()
    if lib is None:
        return None
    x2 = x.reshape(1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    lay = cd.repack(layer)
    if not lay.groups:
        return None
    pp = _params(layer, lay, mode, depth, splits, minb)
    if pp is None:
        return None
    p, rb, S, smem = pp
    part, cnt = cd._workspace(x.device, out, rb)
    y = torch.empty(1, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.is_bf16 = n_in, int(x.dtype == torch.bfloat16)
    err = lib.cmpq_v4_launch(ctypes.byref(p), mode, depth, minb, rb, S, smem,
                             torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq v4 decode kernel failed: {lib.cmpq_v4_error_string(err).decode()}")
    return y.reshape(*lead, out)


def decode_group(layers: list, x: torch.Tensor) -> list[torch.Tensor] | None:
    """``[layer(x) for layer in layers]`` for one token in ONE launch of v4s: the layers share x
    (q/k/v, gate/up), each keeps its own plan and workspace. None when it does not apply."""
    n_in = x.shape[-1]
    if not 1 <= len(layers) <= MAX_GROUP or x.numel() != n_in:
        return None
    if any(l.in_features != n_in or not cd.supported(l) for l in layers):
        return None
    lib = _group_library()
    if lib is None:
        return None
    x2 = x.reshape(1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    plans = []
    for layer in layers:
        lay = cd.repack(layer)
        pp = _params(layer, lay, 0, 4, None) if lay.groups else None
        if pp is None:
            return None
        plans.append(pp)
    part, cnt = cd._workspace(x.device, sum(l.out_features for l in layers), sum(pp[1] for pp in plans))
    g = _P4G()
    g.n = len(layers)
    ys, po, co = [], 0, 0
    for i, (layer, (p, rb, S, smem)) in enumerate(zip(layers, plans)):
        y = torch.empty(1, layer.out_features, dtype=x.dtype, device=x.device)
        p.x, p.y = x2.data_ptr(), y.data_ptr()
        p.part, p.cnt = part.data_ptr() + 4 * po, cnt.data_ptr() + 4 * co  # disjoint, self-zeroing
        p.ldx, p.is_bf16 = n_in, int(x.dtype == torch.bfloat16)
        g.m[i] = p
        po, co = po + layer.out_features, co + rb
        ys.append(y)
    err = lib.cmpq_v4g_launch(ctypes.byref(g), max(pp[1] for pp in plans), max(pp[2] for pp in plans),
                              max(pp[3] for pp in plans), torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq v4 group decode kernel failed: {lib.cmpq_v4_error_string(err).decode()}")
    lead = x.shape[:-1]
    return [y.reshape(*lead, layer.out_features) for y, layer in zip(ys, layers)]
