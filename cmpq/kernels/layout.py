"""The runtime layout of a ``CMPQLinear``: the one form of its data that every kernel reads.

The stored form (docs/format.md) is packed for disk: indices as bit planes per channel, ids in the
narrowest integer type, codebooks as 8-bit codes. The kernels want other orders, so each layer
transforms its data once, at load time (``CMPQLinear.prepare_runtime``, which ``cmpq.load`` and
``from_pretrained`` call for layers on a GPU), and keeps the result as non-persistent buffers
``rt_*``: never saved (``state_dict`` is the stored form alone), moved by ``.to()``, and passed to
``torch.ops.cmpq.linear`` like any other tensor, so ``torch.compile`` and ``torch.export`` see
them. One layout instead of one private cache per kernel (there were three copies of the indices).

What it holds (docs/format.md, "Runtime layout"):

- per bit-width group with channels, the *quads*: indices as contiguous b-bit fields, ``32 // b``
  per int32 word, 4 words per row per quad, stored ``[nq, out, 4]`` so that one 16-byte load gives
  a row its next ``4 * 32 // b`` indices, and all rows of a quad are one contiguous run. The
  one-token CUDA kernels (v4s, v3b), the CUDA and Triton dequantizers (prefill) and the Triton
  decode kernel all read this. Codebooks (FP16) and channel ids (int32) are zero-padded to whole
  quads: padding fields hold index 0 of an all-zero codebook, so kernels need no bounds checks.
- the FP16 outlier columns transposed, ``[n_act, out]`` (rows contiguous, as the quads).
- the sparse outliers as int32 CSR with ``corr = sparse_val - W_q`` (fp32) at each position: the
  decode kernels add every quantized weight, then ``corr * x``, so a sparse outlier replaces the
  quantized value without a per-weight test.
- ``sparse_flat`` (positions of the sparse outliers in the transposed dense weight ``[in, out]``),
  for prefill; ``bias`` in fp32.
- optionally the tensor-core kernel's fragment order (``mma``, 2..16 tokens): a second copy of
  the indices, in the order one lane's m16n8k16 A fragments need. It stays separate because
  folding it into the quads means rewriting ``kernel_mma.cu``, which needs a GPU to test.

Pure PyTorch; no kernel library is needed to build or read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from cmpq.storage.packing import BLOCK

KERNEL_BITS = (2, 3, 4)  # widths the kernels take; other layers run the reference path
MAX_GROUPS = 3
QUAD_WORDS = 4
ROWS_PER_STEP = 2048  # build this many output rows at a time (bounds the int64 temporaries)

# tensor-core fragment layout: kinds are the bit widths plus 16 (the FP16 outlier columns), each in
# chunks of 16 * MMA_KS[kind] channels (MMA_KS k16-steps per chunk)
MMA_KINDS = (2, 3, 4, 16)
MMA_KS = {2: 8, 3: 5, 4: 4, 16: 1}

_COMMON = ("och", "owt", "crow", "scol", "corr", "bias", "sflat")
_MMA = ("mma_q", "mma_tbl", "mma_chl")


@dataclass(frozen=True)
class Group:
    """One bit-width group in quads: ``q`` int32 ``[nq, out, 4]``, ``codebook`` FP16 ``[npad, 2**b]``
    and ``channels`` int32 ``[npad]`` (``npad = nq * 4 * 32 // b >= n``, zero-padded)."""

    bits: int
    n: int
    q: torch.Tensor
    codebook: torch.Tensor
    channels: torch.Tensor

    @property
    def nq(self) -> int:
        return self.q.shape[0]


@dataclass(frozen=True)
class Mma:
    """The tensor-core kernel's layout: ``q`` int32 ``[NC, ntiles, 32, 4]`` (the 16 bytes lane ``l``
    needs for its A fragments of one (chunk, 16-row tile)), ``tbl`` FP16 codebooks per (chunk,
    k-step) in bank-conflict-free slot order, ``chl`` int32 input channel of every MMA k position;
    ``cs``: first chunk of each kind in ``MMA_KINDS``, then the chunk count."""

    q: torch.Tensor
    tbl: torch.Tensor
    chl: torch.Tensor
    cs: tuple[int, ...]
    ntiles: int


@dataclass(frozen=True)
class Runtime:
    """A layer's runtime layout as the kernels take it (views of its ``rt_*`` buffers)."""

    out: int
    n_in: int
    groups: tuple[Group, ...]  # groups with channels only
    outlier_channels: torch.Tensor  # int32 [n_act]
    outlier_weight_t: torch.Tensor  # fp16 [n_act, out]
    sparse_crow: torch.Tensor  # int32 [out + 1]
    sparse_col: torch.Tensor  # int32 [nnz]
    sparse_corr: torch.Tensor  # fp32 [nnz]: sparse_val - W_q at that position
    sparse_val: torch.Tensor  # fp16 [nnz] (the stored buffer)
    bias: torch.Tensor | None  # fp32 [out]
    sparse_flat: torch.Tensor  # int64 [nnz]: column * out + row
    mma: Mma | None

    @property
    def device(self) -> torch.device:
        return self.sparse_crow.device

    @cached_property
    def key(self) -> tuple:
        """Addresses and shapes of every tensor the kernels read: launch parameters are a pure
        function of these (plus options), so they can be memoised under this key without ever
        going stale (cmpq/kernels/cuda_decode.py, ``PlanCache``)."""
        ts = [t for g in self.groups for t in (g.q, g.codebook, g.channels)]
        ts += [self.outlier_channels, self.outlier_weight_t, self.sparse_crow, self.sparse_col, self.sparse_corr,
               self.sparse_val, self.sparse_flat]
        ts += [] if self.bias is None else [self.bias]
        ts += [] if self.mma is None else [self.mma.q, self.mma.tbl, self.mma.chl]
        return (self.device, tuple(g.bits for g in self.groups),
                tuple((t.data_ptr(), tuple(t.shape)) for t in ts))

    @staticmethod
    def from_tensors(tensors: Sequence[torch.Tensor], bits: Sequence[int], counts: Sequence[int], out: int,
                     n_in: int, sparse_val: torch.Tensor) -> "Runtime | None":
        """The layout from the flat tensor list ``names()`` orders (as ``cmpq::linear`` receives it),
        or None when there is none or it does not fit (another device, a dtype changed by
        ``.half()``/``.float()``): the caller then runs the reference path."""
        present = [(b, n) for b, n in zip(bits, counts) if n]
        ng = 3 * len(present)
        if len(tensors) not in (ng + len(_COMMON), ng + len(_COMMON) + len(_MMA)):
            return None
        if any(b not in KERNEL_BITS for b, _ in present) or len(present) > MAX_GROUPS:
            return None
        if any(t.device != sparse_val.device for t in tensors):
            return None
        groups = []
        for i, (b, n) in enumerate(present):
            q, cb, ch = tensors[3 * i: 3 * i + 3]
            if q.dtype != torch.int32 or cb.dtype != torch.float16 or ch.dtype != torch.int32:
                return None
            if q.dim() != 3 or q.shape[1:] != (out, QUAD_WORDS) or cb.shape != (q.shape[0] * QUAD_WORDS * (32 // b), 1 << b):
                return None
            groups.append(Group(b, n, q, cb, ch))
        och, owt, crow, scol, corr, bias, sflat = tensors[ng: ng + len(_COMMON)]
        wanted = ((och, torch.int32), (owt, torch.float16), (crow, torch.int32), (scol, torch.int32),
                  (corr, torch.float32), (bias, torch.float32), (sflat, torch.int64))
        if any(t.dtype != dt for t, dt in wanted) or crow.numel() != out + 1:
            return None
        if sum(n for _, n in present) + och.numel() != n_in:  # every input channel in a group or an FP16 column
            return None
        mma = None
        if len(tensors) > ng + len(_COMMON):
            mq, tbl, chl = tensors[ng + len(_COMMON):]
            if mq.dtype != torch.int32 or tbl.dtype != torch.float16 or chl.dtype != torch.int32:
                return None
            mma = Mma(mq, tbl, chl, mma_chunk_starts(dict(zip(bits, counts)), och.numel()), -(-out // 16))
        return Runtime(out, n_in, tuple(groups), och, owt, crow, scol, corr, sparse_val,
                       bias if bias.numel() else None, sflat, mma)


def names(bits_present: Sequence[int], mma: bool) -> list[str]:
    """Buffer names of the runtime layout, in the order ``Runtime.from_tensors`` reads them."""
    out = [f"rt_{k}{b}" for b in bits_present for k in ("q", "cb", "ch")]
    return out + [f"rt_{k}" for k in _COMMON + (_MMA if mma else ())]


def supported(layer) -> bool:
    """Whether the kernels take this layer (widths 2-4, at most three groups with channels)."""
    present = [b for b, n in layer.counts().items() if n]
    return len(present) <= MAX_GROUPS and all(b in KERNEL_BITS for b in present)


def stamp(layer) -> tuple:
    """Identity and version of every stored buffer: the runtime layout built from them is current
    while this is unchanged (a buffer replaced, modified in place or moved changes it)."""
    return tuple((n, t.data_ptr(), t._version, t.device, t.dtype) for n, t in layer._buffers.items()
                 if t is not None and not n.startswith("rt_"))


# -- quads ------------------------------------------------------------------------------------------
def quads(layer, bits: int, rows_per_step: int = ROWS_PER_STEP) -> torch.Tensor:
    """The layer's b-bit group (stored bit planes) as quads ``[nq, out, 4]`` int32 (module doc)."""
    n, out = layer.counts()[bits], layer.out_features
    dev = layer.outlier_weight.device
    K = 32 // bits
    nq = -(-n // (QUAD_WORDS * K))
    res = torch.empty(nq, out, QUAD_WORDS, dtype=torch.int32, device=dev)
    shifts = torch.arange(K, device=dev, dtype=torch.int64) * bits
    for r0 in range(0, out, rows_per_step):
        r1 = min(out, r0 + rows_per_step)
        pad = torch.zeros(r1 - r0, nq * QUAD_WORDS * K, dtype=torch.int64, device=dev)
        pad[:, :n] = layer.group_indices(bits, r0, r1)
        words = (pad.view(r1 - r0, nq, QUAD_WORDS, K) << shifts).sum(-1)  # < 2**32
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        res[:, r0:r1] = words.permute(1, 0, 2)
    return res


def unquads(q: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`quads` (tests): int64 ``[out, n]``."""
    K = 32 // bits
    nq, out, _ = q.shape
    w = q.permute(1, 0, 2).to(torch.int64) & 0xFFFFFFFF  # [out, nq, 4]
    shifts = torch.arange(K, device=q.device, dtype=torch.int64) * bits
    idx = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [out, nq, 4, K]
    return idx.reshape(out, nq * QUAD_WORDS * K)[:, :n]


# -- tensor-core fragments ----------------------------------------------------------------------------
def mma_chunk_starts(counts: dict[int, int], n_act: int) -> tuple[int, ...]:
    """First chunk of each kind in ``MMA_KINDS``, then the chunk count."""
    cs = [0]
    for kind in MMA_KINDS:
        n = n_act if kind == 16 else counts.get(kind, 0)
        cs.append(cs[-1] + -(-n // (16 * MMA_KS[kind])))
    return tuple(cs)


def _frag_order(v: torch.Tensor, rows: int, nch: int, ks: int) -> torch.Tensor:
    """``v [rows(=16*ntiles), nch*ks*16]`` -> ``[nch, ntiles, 32 lanes, ks*8]``: element (row g + 8*rowhi,
    k = 2t + e + 8h) of k-step s at lane 4g + t, field s*8 + e + 2*rowhi + 4*h."""
    nt = rows // 16
    v = v.reshape(nt, 2, 8, nch, ks, 2, 4, 2)  # tile, rowhi, g, chunk, s, h, t, e
    v = v.permute(3, 0, 2, 6, 4, 5, 1, 7)  # chunk, tile, g, t, s, h, rowhi, e
    return v.reshape(nch, nt, 32, ks * 8)


def mma_fragments(layer, rows_per_step: int = ROWS_PER_STEP) -> dict[str, torch.Tensor]:
    """``rt_mma_q``, ``rt_mma_tbl``, ``rt_mma_chl`` of the layer (see ``Mma``; field order in kernel_mma.cu)."""
    out = layer.out_features
    dev = layer.outlier_weight.device
    ntiles = -(-out // 16)
    counts = layer.counts()
    qs, tbls, chls = [], [], []
    for kind in MMA_KINDS:
        if kind == 16:
            ch, n = layer.outlier_channels.to(torch.int32), layer.outlier_channels.numel()
        else:
            n = counts.get(kind, 0)
            ch = layer.group(kind)[0] if n else None
        CH = 16 * MMA_KS[kind]
        nch = -(-n // CH)
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
                pad[:r1 - r0, :n] = layer.group_indices(kind, r0, r1)
                f = _frag_order(pad, rr, nch, MMA_KS[kind])  # [nch, nt, 32, ks*8]
                nf = MMA_KS[kind] * 8
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
            tbls.append(cb.reshape(nch, MMA_KS[kind], 2, 4, 2, V).permute(0, 1, 2, 4, 3, 5).reshape(-1))
    q = torch.cat(qs) if qs else torch.zeros(0, ntiles, 32, 4, dtype=torch.int32, device=dev)
    tbl = torch.cat(tbls) if tbls else torch.zeros(8, dtype=torch.float16, device=dev)
    chl = torch.cat(chls) if chls else torch.zeros(16, dtype=torch.int32, device=dev)
    return {"rt_mma_q": q.contiguous(), "rt_mma_tbl": tbl.contiguous(), "rt_mma_chl": chl.contiguous()}


def mma_unpack(mma: Mma, kind: int, n: int, out: int) -> torch.Tensor:
    """Inverse of the fragment order for one kind (tests): int64 ``[out, n]`` (kind 16: the weights)."""
    k = MMA_KINDS.index(kind)
    q = mma.q[mma.cs[k]:mma.cs[k + 1]]
    nch, nt = q.shape[:2]
    ks = MMA_KS[kind]
    if kind == 16:
        f = q.contiguous().view(torch.float16).reshape(nch, nt, 32, 8).double()
    else:
        K = 32 // kind
        w = q.to(torch.int64) & 0xFFFFFFFF
        sh = torch.arange(K, device=q.device, dtype=torch.int64) * kind
        f = ((w.unsqueeze(-1) >> sh) & ((1 << kind) - 1)).reshape(nch, nt, 32, 4 * K)[..., :ks * 8]
    f = f.reshape(nch, nt, 8, 4, ks, 2, 2, 2).permute(1, 6, 2, 0, 4, 5, 3, 7)  # inverse of _frag_order
    return f.reshape(nt * 16, nch * ks * 16)[:out, :n]


# -- the whole layout ------------------------------------------------------------------------------
def _quantized_values(layer, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """W_hat before sparse replacement at (rows, cols), fp32, without building the dense weight."""
    dev = cols.device
    val = torch.zeros(cols.numel(), dtype=torch.float32, device=dev)
    where = torch.full((layer.in_features,), -1, dtype=torch.int64, device=dev)
    for b in layer.bit_widths:
        ch, pk, cb = layer.group(b)
        if ch.numel() == 0:
            continue
        where[ch.long()] = torch.arange(ch.numel(), device=dev)
        sel = torch.isin(cols, ch.long())
        j = where[cols[sel].long()]
        r = rows[sel]
        idx = torch.zeros_like(j)
        for p in range(b):
            word = pk[j, (r // BLOCK) * b + p].long() & 0xFFFFFFFF
            idx |= ((word >> (r % BLOCK)) & 1) << p
        val[sel] = cb[j, idx].float()
    if layer.outlier_channels.numel():
        where[layer.outlier_channels.long()] = torch.arange(layer.outlier_channels.numel(), device=dev)
        sel = torch.isin(cols, layer.outlier_channels.long())
        val[sel] = layer.outlier_weight[rows[sel], where[cols[sel].long()]].float()
    return val


@torch.no_grad()
def build(layer, mma: bool = True) -> dict[str, torch.Tensor]:
    """The runtime layout of ``layer`` (on its device), named as ``names`` orders it. ``mma``: also
    the tensor-core kernel's copy of the indices (2..16 tokens; without it they run on v3b)."""
    if not supported(layer):
        raise ValueError(f"no kernel takes widths {layer.bit_widths}; the reference path serves this layer")
    out, dev = layer.out_features, layer.outlier_weight.device
    counts = layer.counts()
    t: dict[str, torch.Tensor] = {}
    for b in layer.bit_widths:
        n = counts[b]
        if not n:
            continue
        ch, _, cb = layer.group(b)
        q = quads(layer, b)
        npad = q.shape[0] * QUAD_WORDS * (32 // b)
        chp = torch.zeros(npad, dtype=torch.int32, device=dev)
        chp[:n] = ch
        cbp = torch.zeros(npad, 2**b, dtype=torch.float16, device=dev)
        cbp[:n] = cb
        t[f"rt_q{b}"], t[f"rt_cb{b}"], t[f"rt_ch{b}"] = q, cbp, chp
    crow, col = layer.sparse_crow, layer.sparse_col
    rows = torch.repeat_interleave(torch.arange(out, device=dev), (crow[1:] - crow[:-1]).long(),
                                   output_size=col.numel())
    t["rt_och"] = layer.outlier_channels.to(torch.int32).contiguous()
    t["rt_owt"] = layer.outlier_weight.t().contiguous()
    t["rt_crow"] = crow.to(torch.int32).contiguous()
    t["rt_scol"] = col.to(torch.int32).contiguous()
    t["rt_corr"] = (layer.sparse_val.float() - _quantized_values(layer, rows, col.long())).contiguous()
    bias = None if layer.bias is None else layer.bias.float()
    if bias is not None and getattr(layer, "row_scale", None) is not None:
        bias = bias / layer.row_scale.float()  # the kernels compute x @ (W / s)^T + bias / s; the op scales by s
    t["rt_bias"] = (bias.contiguous() if bias is not None else torch.zeros(0, dtype=torch.float32, device=dev))
    t["rt_sflat"] = col.long() * out + rows
    if mma:
        t.update(mma_fragments(layer))
    assert list(t) == names([b for b in layer.bit_widths if counts[b]], mma)
    return t
