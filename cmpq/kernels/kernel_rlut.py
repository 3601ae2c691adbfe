"""Decode kernel "rlut" (1..16 tokens): ``kernel_rlut.cu`` behind ctypes; load-time layout, planner, launch.

Standalone (not in ``cmpq.kernels.dispatch``): ``y = linear(x, prepare(layer))``.

- ``prepare(layer)``: once per layer (cached as ``layer._rlut_layout``, rebuilt when a buffer
  changes, never saved). Channels of each width are cut into units of 32 (fp16 outlier columns:
  8), kinds in order 2, 3, 4, 16 bits, so each width is one contiguous K range; rows in tile groups
  of 128. ``rec``: one block per (unit, tile group) with every lane's selectors in fragment order
  (field order in kernel_rlut.cu); ``lut16``/``lutbf``: each unit channel's entries as a low-byte
  and a high-byte plane (FP16, or rounded to BF16 for bf16 inputs); ``ofr16``/``ofrbf``: the outlier
  columns as ready A fragments; ``chan``: the input channel of every slot (x gather); sparse
  outliers as ``sparse_val - W_q`` corrections (fp32), added in the kernel's epilogue.
- 3-bit indices are stored as a 2-bit plane + a 1-bit plane (3 bits a weight, like the format),
  not as nibbles (4 bits): forming a selector costs ~0.5 instruction a weight more, but the kernel
  aims at the byte floor, where nibbles would cost a third more index bytes.
- ``linear(x, lay, splits=None)``: ``layer(x)`` for 1..16 tokens of fp16/bf16 on CUDA, None when
  the kernel does not apply (no nvcc, other widths, more tokens).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from cmpq.kernels import cuda_decode as cd
from cmpq.kernels.layout import _quantized_values, stamp

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_rlut.cu")
NWARPS, RING_D, MAXS = 4, 2, 512  # kernel_rlut.cu (RING_D 3 lost to 2: rlut-rings-h100.json)
NTHREADS = 32 * NWARPS
# tile groups (128 rows each) per block, per NTL; the first is the default. At 5-8 tokens (NTL 2) the
# kernel is built both ways: one group is what was measured (H100, 2026-12-07: 2.0-2.4x the 4-token time
# on the 70B MLP shapes at 8 tokens), two halve the blocks, the x gathers and
# the LUT loads per weight at 149 registers (3 blocks per SM instead of 4). `rlut_bench.py --groups` times both.
GROUPS = {1: (2,), 2: (1, 2), 4: (1,)}
MAX_SMEM = 200 << 10
SM_SMEM = 227 << 10
XS_MAX = 32 << 10  # a block's gathered x; more splits when a split's channels would need more
KINDS = (2, 3, 4, 16)
KU = (4, 4, 4, 1)  # k-steps (8 channels each) per unit
RB = (1024, 1536, 2048, 2048)  # bytes per (unit, tile group) record block
LB = (256, 512, 1024, 0)  # LUT bytes per unit
COST = (1.0, 1.25, 1.8, 0.6)  # relative time of a unit per tile group (split balancing), a guess
ROWS_PER_STEP = 1024


def blocks_per_sm(ntl: int, groups: int) -> int:
    """The kernel's ``__launch_bounds__`` (kernel_rlut.cu ``blocks_per_sm``): 64 accumulators a lane
    (16 tokens, or 8 over two tile groups) leave room for 3 blocks of 128 threads per SM, else 4."""
    return 3 if groups * ntl >= 4 else 4


class _PR(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("rec", "ofr", "lut", "chan", "x", "y", "part", "cnt", "crow", "scol", "corr", "bias")] + [
                ("recbase", ctypes.c_longlong * 4), ("lutbase", ctypes.c_longlong * 4), ("chbase", ctypes.c_int * 4),
                ("cs", ctypes.c_int * 5)] + [(n, ctypes.c_int) for n in
                ("ntg", "out", "ldx", "T", "S", "slot", "lutmax", "recmax", "xs_off", "red_off", "pad0", "pad1")] + [
                ("usplit", ctypes.c_int * (MAXS + 1))]


_LIBRARY = cd.KernelLibrary(SRC, "cmpq_rlut", _PR, n_int_args=6)


def library():
    return _LIBRARY.get()


def library_error() -> str | None:
    return _LIBRARY.error


# -- layout ----------------------------------------------------------------------------------------
@dataclass
class RlutLayout:
    key: tuple
    out: int
    in_features: int
    ntg: int  # tile groups of 128 rows
    cs: tuple  # first unit of each kind, + number of units
    recbase: tuple  # first int4 of each kind in rec (kind 16: in ofr)
    lutbase: tuple  # first int4 of each kind in lut
    chbase: tuple  # first channel slot of each kind
    rec: torch.Tensor  # int32: record blocks of kinds 2, 3, 4
    lut16: torch.Tensor  # uint8: byte planes of fp16 entries
    lutbf: torch.Tensor  # uint8: byte planes of bf16-rounded entries
    ofr16: torch.Tensor  # int32: outlier columns as A fragments (fp16 pairs)
    ofrbf: torch.Tensor  # int32: the same in bf16
    chan: torch.Tensor  # int32 [slots]: input channel, -1 = padding
    sparse_crow: torch.Tensor
    sparse_col: torch.Tensor
    sparse_corr: torch.Tensor  # fp32: sparse_val - W_q
    bias: torch.Tensor | None  # fp32 (divided by the row scales, when the layer has them)
    row_scale: torch.Tensor | None  # fp16 [out] or None: the output is scaled by it after the kernel
    lutmax: int
    recmax: int
    plans: dict = field(default_factory=dict)


def supported(layer) -> bool:
    return all(b in (2, 3, 4) for b in layer.bit_widths if layer.group(b)[0].numel())


def _tiles(v: torch.Tensor, ku: int) -> torch.Tensor:
    """``[rows(=128*tg), units*ku*8]`` -> ``[unit, tg, k, lane, tile, j]``: row 16*mh + 2*g + e of
    tile, channel slot 4*ph + t of k-step k; lane 4*g + t, nibble j = 4*ph + 2*mh + e."""
    tg = v.shape[0] // 128
    nu = v.shape[1] // (ku * 8)
    v = v.reshape(tg, 4, 2, 8, 2, nu, ku, 2, 4)  # tg, tile, mh, g, e, u, k, ph, t
    v = v.permute(5, 0, 6, 3, 8, 1, 7, 2, 4)  # u, tg, k, g, t, tile, ph, mh, e
    return v.reshape(nu, tg, ku, 32, 4, 8)


def _nibbles(v: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Sum over the last dim (8 fields j) of ``v << (4j + shift)``: int64 words."""
    sh = torch.arange(8, device=v.device, dtype=torch.int64) * 4 + shift
    return (v << sh).sum(-1)


def _words(b: int, n: torch.Tensor) -> torch.Tensor:
    """Selector fields ``[u, tg, k, lane, tile, j]`` -> record blocks ``[u, tg, words]`` (int64 < 2^32)."""
    nu, tg, ku = n.shape[:3]
    if b == 4:
        return _nibbles(n).reshape(nu, tg, -1)  # [k][lane][tile]
    lo = n & 3
    a = torch.stack([_nibbles(lo[..., 0, :]) | _nibbles(lo[..., 1, :], 2),
                     _nibbles(lo[..., 2, :]) | _nibbles(lo[..., 3, :], 2)], -1)  # [u, tg, k, lane, 2]
    if b == 2:
        return a.reshape(nu, tg, -1)
    hi = n >> 2
    c = (_nibbles(hi[..., 0, :], 2) | _nibbles(hi[..., 1, :], 3) | _nibbles(hi[..., 2, :], 0)
         | _nibbles(hi[..., 3, :], 1))  # [u, tg, k, lane]
    return torch.cat([a.reshape(nu, tg, -1), c.reshape(nu, tg, -1)], -1)


def _i32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _planes(cb: torch.Tensor) -> torch.Tensor:
    """Entries ``[n, V]`` (fp16 or bf16) -> ``[n, 2V]`` uint8: low bytes, then high bytes."""
    bits = cb.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.cat([bits & 0xFF, bits >> 8], 1).to(torch.uint8)


@torch.no_grad()
def prepare(layer) -> RlutLayout:
    """The layer's rlut layout (cached on the layer; rebuilt after its buffers change)."""
    key = stamp(layer)
    cached = getattr(layer, "_rlut_layout", None)
    if cached is not None and cached.key == key:
        return cached
    out, dev = layer.out_features, layer.outlier_weight.device
    ntg = -(-out // 128)
    rows = ntg * 128
    cs, recs, luts16, lutsbf, chans, recbase, lutbase, chbase = [0], [], [], [], [], [], [], []
    ofr16 = ofrbf = torch.zeros(4, dtype=torch.int32, device=dev)
    nrec = nlut = nch = 0
    for kind, ku, rb, lb in zip(KINDS, KU, RB, LB):
        recbase.append(nrec // 4 if kind != 16 else 0)
        lutbase.append(nlut // 16)
        chbase.append(nch)
        if kind == 16:
            ch = layer.outlier_channels.to(torch.int32)
        else:
            ch = layer.group(kind)[0] if kind in layer.bit_widths else torch.zeros(0, dtype=torch.int32, device=dev)
        n = ch.numel()
        per = ku * 8
        nu = -(-n // per)
        cs.append(cs[-1] + nu)
        if nu == 0:
            continue
        npad = nu * per
        chp = torch.full((npad,), -1, dtype=torch.int32, device=dev)
        chp[:n] = ch
        chans.append(chp)
        nch += npad
        if kind == 16:
            o16 = torch.empty(nu, ntg, 4, 32, 4, dtype=torch.int32, device=dev)
            obf = torch.empty_like(o16)
            for r0 in range(0, rows, ROWS_PER_STEP):
                r1 = min(rows, r0 + ROWS_PER_STEP)
                w = torch.zeros(r1 - r0, npad, dtype=torch.float16, device=dev)
                w[:max(0, min(out, r1) - r0), :n] = layer.outlier_weight[r0:r1]
                for dst, v in ((o16, w), (obf, w.to(torch.bfloat16))):
                    # tg, tile, mh, g, e, u, ph, t -> u, tg, tile, g, t, ph, mh, e: a0..a3 = (mh + 2 ph), halves e
                    f = v.reshape(-1, 4, 2, 8, 2, nu, 2, 4).permute(5, 0, 1, 3, 7, 6, 2, 4).contiguous()
                    dst[:, r0 // 128:r1 // 128] = f.view(torch.int32).reshape(nu, -1, 4, 32, 4)
            ofr16, ofrbf = o16.reshape(-1), obf.reshape(-1)
            continue
        rec = torch.empty(nu, ntg, rb // 4, dtype=torch.int32, device=dev)
        for r0 in range(0, rows, ROWS_PER_STEP):
            r1 = min(rows, r0 + ROWS_PER_STEP)
            idx = torch.zeros(r1 - r0, npad, dtype=torch.int64, device=dev)
            if r0 < out:
                idx[:min(out, r1) - r0, :n] = layer.group_indices(kind, r0, min(out, r1))
            rec[:, r0 // 128:r1 // 128] = _i32(_words(kind, _tiles(idx, ku)))
        recs.append(rec.reshape(-1))
        nrec += rec.numel()
        cb = torch.zeros(npad, 1 << kind, dtype=torch.float16, device=dev)
        cb[:n] = layer.group(kind)[2]
        luts16.append(_planes(cb).reshape(-1))
        lutsbf.append(_planes(cb.to(torch.bfloat16)).reshape(-1))
        nlut += npad * 2 * (1 << kind)
    present = [k for k in range(3) if cs[k + 1] > cs[k]]
    crow, col = layer.sparse_crow, layer.sparse_col
    srows = torch.repeat_interleave(torch.arange(out, device=dev), (crow[1:] - crow[:-1]).long())
    corr = layer.sparse_val.float() - _quantized_values(layer, srows, col.long())
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(16, dtype=dt, device=dev)  # noqa: E731
    lay = RlutLayout(
        key=key, out=out, in_features=layer.in_features, ntg=ntg, cs=tuple(cs), recbase=tuple(recbase),
        lutbase=tuple(lutbase), chbase=tuple(chbase),
        rec=cat(recs, torch.int32), lut16=cat(luts16, torch.uint8), lutbf=cat(lutsbf, torch.uint8),
        ofr16=ofr16, ofrbf=ofrbf, chan=cat(chans, torch.int32),
        sparse_crow=crow.to(torch.int32).contiguous(), sparse_col=col.to(torch.int32).contiguous(),
        sparse_corr=corr.contiguous(), bias=_bias(layer), row_scale=getattr(layer, "row_scale", None),
        lutmax=max([LB[k] for k in present], default=0),
        recmax=max([RB[k] for k in range(4) if cs[k + 1] > cs[k]], default=16),
    )
    layer._rlut_layout = lay
    return lay


# -- plan ------------------------------------------------------------------------------------------
def ntl_of(T: int) -> int:
    return 1 if T <= 4 else (2 if T <= 8 else 4)


def unit_kinds(cs) -> np.ndarray:
    return np.concatenate([np.full(cs[k + 1] - cs[k], k) for k in range(4)]).astype(np.int64)


def _ch_off(cs, chbase, u: np.ndarray) -> np.ndarray:
    k = np.searchsorted(np.asarray(cs[1:4]), u, side="right")
    return np.asarray(chbase)[k] + (u - np.asarray(cs)[k]) * np.asarray(KU)[k] * 8


def x_splits(channels: int, T: int) -> int:
    """The fewest splits whose gathered x (``channels`` x the token tile, fp16) fits ``XS_MAX``."""
    return max(1, -(-channels * 4 * ntl_of(T) * 2 // XS_MAX))


def plan(lay: RlutLayout, T: int, sms: int, splits: int | None = None, groups: int | None = None):
    """(rb, S, smem, slot, xs_off, red_off, usplit, groups): row blocks, splits of the unit list balanced by
    COST, and a grid of whole waves: as many blocks as the SMs hold at once (``resident`` from the
    plan's own shared memory), or a whole multiple of that when a split's gathered x needs more splits.

    Why whole waves: the ncu profile of 4096x11008 at one token (H100, 2026-12-06,
    ``benchmarks/results/ncu-rlut-h100.txt``) showed 400 blocks where 3 x 132 = 396 fit, the split
    count having been rounded up: 4 blocks ran in a second wave, each as long as a block of the first
    (the kernel is latency-bound, 0.26 instructions issued per scheduler cycle).

    ``groups``: tile groups per block, one of ``GROUPS[ntl]`` (None: the first)."""
    ntl = ntl_of(T)
    Q = GROUPS[ntl][0] if groups is None else groups
    if Q not in GROUPS[ntl]:
        raise ValueError(f"rlut at {T} tokens takes {GROUPS[ntl]} tile groups per block, not {groups}")
    TP = 4 * ntl
    rb = -(-lay.ntg // Q)
    NU = lay.cs[-1]
    slot = lay.lutmax + Q * lay.recmax
    ring = NWARPS * RING_D * slot
    red = Q * 128 * TP * 4
    cost = np.cumsum(np.asarray(COST)[unit_kinds(lay.cs)])

    def layout(S: int):
        S = max(1, min(S, NU, MAXS))
        bounds = np.searchsorted(cost, cost[-1] * np.arange(1, S) / S, side="left") + 1 if NU else np.zeros(S - 1, int)
        usplit = np.concatenate([[0], np.minimum(bounds, NU), [NU]]).astype(np.int64)
        usplit = np.maximum.accumulate(usplit)
        choff = _ch_off(lay.cs, lay.chbase, usplit)
        xs_bytes = int((np.diff(choff).max() if S else 0) * TP * 2)
        xs_off = -(-ring // 16) * 16
        red_off = xs_off + -(-xs_bytes // 16) * 16
        return S, red_off + red + 128, xs_off, red_off, usplit  # + 128: the kernel aligns its base

    if splits is None:
        S_x = x_splits(lay.chan.numel(), T)
        S = max(S_x, min(sms // rb, NU // NWARPS) or 1)
        for _ in range(4):  # the smem, hence the residency, depends on S: settle in a few rounds
            S, smem = layout(S)[:2]
            resident = max(1, min(blocks_per_sm(ntl, Q), SM_SMEM // (smem + 1024)))
            wave = sms * resident
            waves = max(1, -(-rb * S_x // wave))  # one wave unless the x gather forces more
            S_new = max(S_x, min(waves * wave // rb, NU // NWARPS or 1))
            if S_new == S:
                break
            S = S_new
    else:
        S = splits
    S, smem, xs_off, red_off, usplit = layout(S)
    if smem > MAX_SMEM:
        return None
    return rb, S, smem, slot, xs_off, red_off, usplit, Q


def _params(lay: RlutLayout, T: int, bf: bool, splits: int | None, groups: int | None = None):
    k = (ntl_of(T), bf, splits, groups)
    if k in lay.plans:
        return lay.plans[k]
    pl = plan(lay, T, cd._num_sms(lay.rec.device), splits, groups)
    if pl is None:
        lay.plans[k] = None
        return None
    rb, S, smem, slot, xs_off, red_off, usplit, Q = pl
    p = _PR()
    p.rec, p.chan = lay.rec.data_ptr(), lay.chan.data_ptr()
    p.ofr = (lay.ofrbf if bf else lay.ofr16).data_ptr()
    p.lut = (lay.lutbf if bf else lay.lut16).data_ptr()
    p.crow, p.scol, p.corr = lay.sparse_crow.data_ptr(), lay.sparse_col.data_ptr(), lay.sparse_corr.data_ptr()
    p.bias = lay.bias.data_ptr() if lay.bias is not None else None
    for i in range(4):
        p.recbase[i], p.lutbase[i], p.chbase[i] = lay.recbase[i], lay.lutbase[i], lay.chbase[i]
    for i, v in enumerate(lay.cs):
        p.cs[i] = v
    for i, v in enumerate(usplit):
        p.usplit[i] = int(v)
    p.ntg, p.out, p.S = lay.ntg, lay.out, S
    p.slot, p.lutmax, p.recmax, p.xs_off, p.red_off = slot, lay.lutmax, lay.recmax, xs_off, red_off
    lay.plans[k] = (p, rb, S, smem, Q)
    return lay.plans[k]


def _bias(layer) -> torch.Tensor | None:
    """The bias the kernel adds: divided by the row scales where the layer has them (format v4), since
    the kernel computes ``x @ (W / s)^T`` and ``linear`` scales by ``s`` afterwards."""
    if layer.bias is None:
        return None
    b = layer.bias.float()
    s = getattr(layer, "row_scale", None)
    return (b if s is None else b / s.float()).contiguous()


def linear(x: torch.Tensor, lay: RlutLayout, splits: int | None = None, groups: int | None = None) -> torch.Tensor | None:
    """``layer(x)`` for 1..16 tokens (fp16/bf16, CUDA) from ``prepare(layer)``; None if it does not apply.
    ``splits`` and ``groups`` override the plan (benchmarks and tests)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != lay.in_features:
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], lay.out
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T == 0 or T > 16 or lay.cs[-1] == 0:
        return None
    lib = library()
    if lib is None:
        return None
    bf = x.dtype == torch.bfloat16
    pp = _params(lay, T, bf, splits, groups)
    if pp is None:
        return None
    p, rb, S, smem, Q = pp
    ntl = ntl_of(T)
    part, cnt = cd._workspace(x.device, out * 4 * ntl, rb)
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.T = x2.stride(0), T
    err = lib.cmpq_rlut_launch(ctypes.byref(p), ntl, Q, int(bf), rb, S, smem,
                               torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq rlut kernel failed: {lib.cmpq_rlut_error_string(err).decode()}")
    if lay.row_scale is not None:
        y = y * lay.row_scale.to(y.dtype)
    return y.reshape(*lead, out)
