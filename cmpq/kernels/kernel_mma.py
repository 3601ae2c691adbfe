"""Decode kernel "mma" (2..16 tokens, tensor cores): ``kernel_mma.cu`` behind ctypes; layout, planner, launch.

- ``repack(layer)``: one-time layout (cached on the layer as ``_mma_layout``, rebuilt when a buffer
  changes, never saved; indices from ``layer.group_indices``): per b-bit group, chunks of 16*KS
  channels (KS = 8 / 5 / 4 k16-steps for 2 / 3 / 4 bits), the fp16 outlier columns as a fourth
  kind (KS = 1). ``q [NC, ntiles, 32, 4]`` int32: the 16 bytes lane ``l`` of a warp needs for its
  m16n8k16 A fragments of one (chunk, 16-row tile) (see kernel_mma.cu for the field order);
  ``tbl``: codebooks per (chunk, k-step) at the bank-conflict-free slot order; ``chl``: the input
  channel of every MMA k position (x gathers); sparse corrections as v3b (``cuda_decode.repack``).
- ``decode(layer, x, splits=None, tpb=None)``: ``layer(x)`` for 1..16 tokens, None if the
  kernel does not apply.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import torch

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import _key

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_mma.cu")
NTHREADS, NWARPS, RING_D = 256, 8, 4
KINDS = (2, 3, 4, 16)
KS = {2: 8, 3: 5, 4: 4, 16: 1}  # k16-steps per chunk
TB = {2: 1024, 3: 1280, 4: 2048, 16: 0}  # table bytes per chunk: KS * 16 * 2^b * 2
MAX_SMEM = 200 << 10
SM_SMEM = 227 << 10
BLOCKS_PER_SM = 3  # __launch_bounds__(256, 3)
DEFAULT_TPB = 8



class _PM(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("q", "tbl", "chl", "x", "y", "part", "cnt", "crow", "scol", "corr", "bias")] + [
                ("cs", ctypes.c_int * 5)] + [(n, ctypes.c_int) for n in
                ("ntiles", "out", "ldx", "T", "S", "tpb", "red_off", "tbl_off", "xf_off", "pad_")]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_mma", _PM, n_int_args=5)


def library():
    return _LIBRARY.get()


def library_error() -> str | None:
    return _LIBRARY.error


# -- layout ----------------------------------------------------------------------------------------
@dataclass
class MmaLayout:
    key: tuple
    q: torch.Tensor  # int32 [NC, ntiles, 32, 4]
    tbl: torch.Tensor  # fp16, chunk tables (kinds 2, 3, 4)
    chl: torch.Tensor  # int32 [ksteps * 16]
    cs: tuple  # first chunk of each kind + NC
    ntiles: int
    cuda: object  # cuda_decode.CudaLayout-like: sparse_crow, sparse_col, sparse_corr, bias
    plans: dict = field(default_factory=dict)


def _frag_order(v: torch.Tensor, rows: int, nch: int, ks: int) -> torch.Tensor:
    """``v [rows(=16*ntiles), nch*ks*16]`` -> ``[nch, ntiles, 32 lanes, ks*8]``: element (row g + 8*rowhi,
    k = 2t + e + 8h) of k-step s at lane 4g + t, field s*8 + e + 2*rowhi + 4*h."""
    nt = rows // 16
    v = v.reshape(nt, 2, 8, nch, ks, 2, 4, 2)  # tile, rowhi, g, chunk, s, h, t, e
    v = v.permute(3, 0, 2, 6, 4, 5, 1, 7)  # chunk, tile, g, t, s, h, rowhi, e
    return v.reshape(nch, nt, 32, ks * 8)


def _indices(layer, b: int, r0: int, r1: int) -> torch.Tensor:
    if hasattr(layer, "group_indices"):
        return layer.group_indices(b, r0, r1)
    from cmpq.storage.packing import unpack_indices

    ch, pk, _ = layer.group(b)
    return unpack_indices(pk[r0:r1], b, ch.numel())


def supported(layer) -> bool:
    return all(b in (2, 3, 4) for b in layer.bit_widths if layer.group(b)[0].numel())


@torch.no_grad()
def repack(layer, rows_per_step: int = 2048) -> MmaLayout:
    key = _key(layer)
    cached = getattr(layer, "_mma_layout", None)
    if cached is not None and cached.key == key:
        return cached
    out = layer.out_features
    dev = layer.outlier_weight.device
    ntiles = -(-out // 16)
    qs, tbls, chls, cs = [], [], [], [0]
    for kind in KINDS:
        if kind == 16:
            ch = layer.outlier_channels.to(torch.int32)
            n = ch.numel()
        else:
            n = layer.group(kind)[0].numel() if kind in layer.bit_widths else 0
            ch = layer.group(kind)[0] if n else None
        CH = 16 * KS[kind]
        nch = -(-n // CH)
        cs.append(cs[-1] + nch)
        if nch == 0:
            continue
        npad = nch * CH
        chp = torch.zeros(npad, dtype=torch.int32, device=dev)
        chp[:n] = ch
        chls.append(chp)
        q = torch.empty(nch, ntiles, 32, 4, dtype=torch.int32, device=dev)
        step = max(16, rows_per_step // 16 * 16)
        for r0 in range(0, out, step):
            r1 = min(out, r0 + step)
            rr = -(-(r1 - r0) // 16) * 16
            t0 = r0 // 16
            if kind == 16:
                pad = torch.zeros(rr, npad, dtype=torch.float16, device=dev)
                pad[:r1 - r0, :n] = layer.outlier_weight[r0:r1]
                f = _frag_order(pad, rr, nch, 1)  # [nch, nt, 32, 8] fp16
                q[:, t0:t0 + rr // 16] = f.contiguous().view(torch.int32)
            else:
                K = 32 // kind
                pad = torch.zeros(rr, npad, dtype=torch.int64, device=dev)
                pad[:r1 - r0, :n] = _indices(layer, kind, r0, r1)
                f = _frag_order(pad, rr, nch, KS[kind])  # [nch, nt, 32, ks*8]
                nf = KS[kind] * 8
                if nf < 4 * K:
                    f = torch.cat([f, f.new_zeros(*f.shape[:3], 4 * K - nf)], -1)
                shifts = torch.arange(K, device=dev, dtype=torch.int64) * kind
                words = (f.reshape(*f.shape[:3], 4, K) << shifts).sum(-1)
                words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
                q[:, t0:t0 + rr // 16] = words
        qs.append(q)
        if kind != 16:
            V = 1 << kind
            cb = torch.zeros(npad, V, dtype=torch.float16, device=dev)
            cb[:n] = layer.group(kind)[2]
            # [chunk, s, h, t, e, V] -> slot order t + 4e + 8h: [chunk, s, h, e, t, V]
            tbls.append(cb.reshape(nch, KS[kind], 2, 4, 2, V).permute(0, 1, 2, 4, 3, 5).reshape(-1))
    q = torch.cat(qs) if qs else torch.zeros(0, ntiles, 32, 4, dtype=torch.int32, device=dev)
    tbl = torch.cat(tbls) if tbls else torch.zeros(8, dtype=torch.float16, device=dev)
    chl = torch.cat(chls) if chls else torch.zeros(16, dtype=torch.int32, device=dev)
    lay = MmaLayout(key=key, q=q.contiguous(), tbl=tbl.contiguous(), chl=chl.contiguous(), cs=tuple(cs),
                    ntiles=ntiles, cuda=cd.repack(layer))
    layer._mma_layout = lay
    return lay


def unrepack_indices(lay: MmaLayout, kind: int, n: int, out: int) -> torch.Tensor:
    """Inverse of the index layout for one kind (tests): int64 ``[out, n]`` (fp16 kind: the weights)."""
    k = KINDS.index(kind)
    q = lay.q[lay.cs[k]:lay.cs[k + 1]]
    nch, nt = q.shape[:2]
    ks = KS[kind]
    if kind == 16:
        f = q.contiguous().view(torch.float16).reshape(nch, nt, 32, 8).double()
    else:
        K = 32 // kind
        w = q.to(torch.int64) & 0xFFFFFFFF
        sh = torch.arange(K, device=q.device, dtype=torch.int64) * kind
        f = ((w.unsqueeze(-1) >> sh) & ((1 << kind) - 1)).reshape(nch, nt, 32, 4 * K)[..., :ks * 8]
    f = f.reshape(nch, nt, 8, 4, ks, 2, 2, 2).permute(1, 6, 2, 0, 4, 5, 3, 7)  # inverse of _frag_order
    return f.reshape(nt * 16, nch * ks * 16)[:out, :n]


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
        # ~BLOCKS_PER_SM blocks per SM, each warp >= 2 chunks
        S = max(1, min(-(-sms * BLOCKS_PER_SM // rb), NC // (2 * cstride)))
        while S < NC and smem_layout(cs, S, ntl, tpb)[0] > SM_SMEM // BLOCKS_PER_SM - 1024:
            S += 1
    else:
        S = max(1, min(splits, NC))
    smem, offs = smem_layout(cs, S, ntl, tpb)
    if smem > MAX_SMEM:
        return None
    return rb, S, smem, offs, tpb


def _params(layer, lay: MmaLayout, ntl: int, splits: int | None, tpb: int | None):
    k = (ntl, splits, tpb)
    if k in lay.plans:
        return lay.plans[k]
    pl = plan(lay.cs, lay.ntiles, ntl, cd._num_sms(lay.q.device), splits, tpb)
    if pl is None:
        lay.plans[k] = None
        return None
    rb, S, smem, (red_off, tbl_off, xf_off), tpb = pl
    c = lay.cuda
    p = _PM()
    p.q, p.tbl, p.chl = lay.q.data_ptr(), lay.tbl.data_ptr(), lay.chl.data_ptr()
    p.crow, p.scol, p.corr = c.sparse_crow.data_ptr(), c.sparse_col.data_ptr(), c.sparse_corr.data_ptr()
    p.bias = c.bias.data_ptr() if c.bias is not None else None
    for i, v in enumerate(lay.cs):
        p.cs[i] = v
    p.ntiles, p.out, p.S, p.tpb = lay.ntiles, layer.out_features, S, tpb
    p.red_off, p.tbl_off, p.xf_off = red_off, tbl_off, xf_off
    lay.plans[k] = (p, rb, S, smem)
    return lay.plans[k]


def decode(layer, x: torch.Tensor, splits: int | None = None, tpb: int | None = None) -> torch.Tensor | None:
    """``layer(x)`` for 1..16 tokens on CUDA (tensor cores); None when this kernel does not apply."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or not supported(layer):
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], layer.out_features
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T == 0 or T > 16:
        return None
    lib = library()
    if lib is None:
        return None
    lay = repack(layer)
    if lay.cs[-1] == 0:
        return None
    ntl = 1 if T <= 8 else 2
    pp = _params(layer, lay, ntl, splits, tpb)
    if pp is None:
        return None
    p, rb, S, smem = pp
    part, cnt = cd._workspace(x.device, out * 8 * ntl, rb)
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.T = x2.stride(0), T
    err = lib.cmpq_mma_launch(ctypes.byref(p), ntl, int(x.dtype == torch.bfloat16), rb, S, smem,
                              torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq mma decode kernel failed: {lib.cmpq_mma_error_string(err).decode()}")
    return y.reshape(*lead, out)
