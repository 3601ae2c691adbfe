"""The rlut kernel (cmpq/kernels/kernel_rlut.cu): its load-time layout emulated on the CPU, and on a GPU
the compiled kernel, both against the PyTorch reference (``layer.dequantize()`` + linear).

The emulation reads ``prepare(layer)`` the way the kernel does and repeats its integer and fragment
math: selector words from the record planes (same shifts and masks), PRMT on the byte planes (an
exact ``__byte_perm``), A registers at their m16n8k16 positions, B from the gathered x by the row-pair
rule, C back to (row, token) by the epilogue's rule. The A fragments must equal ``W_q`` bit for bit.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmpq.kernels import kernel_rlut as kr
from cmpq.kernels.layout import _quantized_values
from cmpq.kernels.testing import mix_counts, random_layer

MIXES = {  # in = 300 unless given: not a multiple of any unit
    "2bit": {2: 300},
    "3bit": {3: 300},
    "4bit": {4: 300},
    "mixed": {2: 97, 3: 101, 4: 102},
    "empty-group": {2: 0, 3: 150, 4: 150},
    "one-channel": {2: 1, 3: 200, 4: 99},
}


def _layer(mix: str, outliers: bool, seed: int, out: int = 67, device: str = "cpu"):
    counts = dict(MIXES[mix])
    n_act, n_sparse = (7, 23) if outliers else (0, 0)
    if n_act:
        b = max(counts, key=counts.get)
        counts[b] -= n_act
    gen = torch.Generator().manual_seed(seed)
    return random_layer(out, 300, counts, n_act, n_sparse, bias=outliers, device=device, generator=gen)


# -- emulation -------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF


def byte_perm(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``__byte_perm(x, y, s)`` on int64 tensors holding uint32: byte i = byte (s >> 4i) & 7 of {y:x},
    or its sign replicated when bit 3 of that nibble is set."""
    x, y, s = torch.broadcast_tensors(x, y, s)
    b = torch.stack([(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)], -1)
    res = torch.zeros_like(x)
    for i in range(4):
        n = (s >> (4 * i)) & 0xF
        v = torch.gather(b, -1, (n & 7).unsqueeze(-1)).squeeze(-1)
        v = torch.where((n & 8) != 0, torch.where((v & 0x80) != 0, 0xFF, 0), v)
        res |= v << (8 * i)
    return res


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & M32


def _lut_words(lut: torch.Tensor, off: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` little-endian uint32 words at byte offsets ``off`` of the uint8 LUT."""
    b = lut.to(torch.int64)
    return [b[off + 4 * i] | b[off + 4 * i + 1] << 8 | b[off + 4 * i + 2] << 16 | b[off + 4 * i + 3] << 24
            for i in range(n)]


def emulate_fragments(lay, bf: bool):
    """Yield ``(kind, ks, tile, a [4, nu, ntg, 32])``: the A registers a0..a3 (uint32) every lane builds
    for k-step ``ks`` and tile ``tile`` of every unit of ``kind`` and tile group, as the kernel does."""
    lut = (lay.lutbf if bf else lay.lut16).cpu()
    rec = _u32(lay.rec.cpu())
    ofr = _u32((lay.ofrbf if bf else lay.ofr16).cpu())
    lane = torch.arange(32)
    t = lane % 4
    ntg = lay.ntg
    for k, (kind, ku, rb, lb) in enumerate(zip(kr.KINDS, kr.KU, kr.RB, kr.LB)):
        nu = lay.cs[k + 1] - lay.cs[k]
        if nu == 0:
            continue
        u = torch.arange(nu)
        wpb = rb // 4  # words per record block
        base = lay.recbase[k] * 4 + (u[:, None] * ntg + torch.arange(ntg)[None]) * wpb  # [nu, ntg]
        words = (ofr if kind == 16 else rec)[base[..., None] + torch.arange(wpb)]  # [nu, ntg, wpb]
        lbase = lay.lutbase[k] * 16 + u * lb  # [nu]
        for ks in range(ku):
            if kind == 16:
                w = words.reshape(nu, ntg, 4, 32, 4)
                for tile in range(4):
                    yield kind, ks, tile, w[:, :, tile].permute(3, 0, 1, 2)
                continue
            V = 1 << kind
            # LUT of channel slots t and t + 4 of this k-step: [nu, 1, 32] per word
            lo = [_lut_words(lut, (lbase[:, None] + (ks * 8 + t + 4 * h) * 2 * V)[:, None, :], V // 2)
                  for h in (0, 1)]
            if kind == 2:
                A = words[..., ks * 64 + lane * 2], words[..., ks * 64 + lane * 2 + 1]  # [nu, ntg, 32]
                sel = [A[0] & 0x33333333, (A[0] >> 2) & 0x33333333, A[1] & 0x33333333, (A[1] >> 2) & 0x33333333]
            elif kind == 3:
                A = words[..., ks * 64 + lane * 2], words[..., ks * 64 + lane * 2 + 1]
                C = words[..., ku * 64 + ks * 32 + lane]
                sel = [(A[0] & 0x33333333) | (C & 0x44444444),
                       ((A[0] >> 2) & 0x33333333) | ((C >> 1) & 0x44444444),
                       (A[1] & 0x33333333) | ((C << 2) & M32 & 0x44444444),
                       ((A[1] >> 2) & 0x33333333) | ((C << 1) & M32 & 0x44444444)]
            else:
                sel = [words[..., ks * 128 + lane * 4 + tile] for tile in range(4)]
            for tile in range(4):
                regs = []
                for h in (0, 1):
                    s = sel[tile] >> (16 * h)  # PRMT reads the low 16 bits; the high ones are ignored
                    L = lo[h]
                    if kind == 2:
                        lo_b, hi_b = byte_perm(L[0], L[1], s), byte_perm(L[1], L[0], s)
                    elif kind == 3:
                        lo_b, hi_b = byte_perm(L[0], L[1], s), byte_perm(L[2], L[3], s)
                    else:
                        s7 = s & 0x77777777
                        sel2 = ((s >> 1) & 0x44444444) | (0x32103210 >> (16 * h))
                        lo_b = byte_perm(byte_perm(L[0], L[1], s7), byte_perm(L[2], L[3], s7), sel2)
                        hi_b = byte_perm(byte_perm(L[4], L[5], s7), byte_perm(L[6], L[7], s7), sel2)
                    regs += [byte_perm(lo_b, hi_b, torch.tensor(0x5140)), byte_perm(lo_b, hi_b, torch.tensor(0x7362))]
                yield kind, ks, tile, torch.stack(regs)


def _halves(a: torch.Tensor, bf: bool) -> torch.Tensor:
    """uint32 registers -> float64 [..., 2] (low half first)."""
    h = torch.stack([a & 0xFFFF, a >> 16], -1).to(torch.int32)
    h = torch.where(h >= 2**15, h - 2**16, h).to(torch.int16)
    return h.view(torch.bfloat16 if bf else torch.float16).double()


def a_matrix(a: torch.Tensor, bf: bool) -> torch.Tensor:
    """A registers ``[4, ..., 32 lanes]`` -> A ``[..., 16, 16]`` (m16n8k16 A-fragment layout)."""
    v = _halves(a, bf)  # [4, ..., 32, 2]
    A = torch.zeros(*a.shape[1:-1], 16, 16, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for r, (dm, dk) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        for h in (0, 1):
            A[..., g + dm, 2 * t + h + dk] = v[r, ..., h]
    return A


def emulate_weight(lay, bf: bool = False) -> torch.Tensor:
    """The dense weight [ntg*128, slots] the kernel's A fragments stand for (row 2m + parity)."""
    W = torch.zeros(lay.ntg * 128, lay.chan.numel(), dtype=torch.float64)
    p = torch.arange(16) // 2  # k -> channel slot of the k-step
    par = torch.arange(16) % 2  # k -> row parity
    for kind, ks, tile, a in emulate_fragments(lay, bf):
        k = kr.KINDS.index(kind)
        nu, ku = lay.cs[k + 1] - lay.cs[k], kr.KU[k]
        A = a_matrix(a, bf)  # [nu, ntg, 16(m), 16(k)]
        rows = (torch.arange(lay.ntg)[:, None, None] * 128 + tile * 32 + 2 * torch.arange(16)[None, :, None]
                + par[None, None, :])  # [ntg, 16, 16]
        slots = lay.chbase[k] + torch.arange(nu)[:, None] * ku * 8 + ks * 8 + p[None, :]  # [nu, 16]
        W[rows[None].expand(nu, -1, -1, -1), slots[:, None, None, :].expand(-1, lay.ntg, 16, -1)] = A
    return W


def emulate_linear(lay, x: torch.Tensor) -> torch.Tensor:
    """y [T, out] as the kernel computes it: B fragments from the gathered x (row-pair rule), one
    16x16 @ 16x(8*NTL) product per (unit, tile group, k-step, tile), C scattered by the epilogue rule,
    then the sparse corrections and the bias."""
    bf = x.dtype == torch.bfloat16
    T = x.shape[0]
    ntl = kr.ntl_of(T)
    TP = 4 * ntl
    chan = lay.chan.cpu().long()
    xs = torch.zeros(chan.numel(), TP, dtype=torch.float64)  # the kernel's gathered x
    xs[:, :T] = torch.where(chan[:, None] >= 0, x.cpu().double().T[chan.clamp(min=0)], 0.0)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    y = torch.zeros(T, lay.ntg * 128, dtype=torch.float64)
    for kind, ks, tile, a in emulate_fragments(lay, bf):
        k = kr.KINDS.index(kind)
        nu, ku = lay.cs[k + 1] - lay.cs[k], kr.KU[k]
        A = a_matrix(a, bf)  # [nu, ntg, 16, 16]
        cl = lay.chbase[k] + torch.arange(nu) * ku * 8 + ks * 8  # first slot of the k-step [nu]
        # bfrag: lane (g, t) holds b0 = B[2t + h][g], b1 = B[2t + 8 + h][g], h = half
        B = torch.zeros(nu, ntl, 16, 8, dtype=torch.float64)
        for n in range(ntl):
            for r, dk in enumerate((0, 4)):  # b0: slot t, b1: slot t + 4
                if ntl == 1:
                    v, half = xs[cl[:, None] + t + dk, g % 4], g // 4
                else:
                    v, half = xs[cl[:, None] + t + dk, g + 8 * (n >> 1)], torch.full_like(g, n & 1)
                for h in (0, 1):
                    B[:, n, 2 * t + 8 * r + h, g] = torch.where(half == h, v, 0.0)
        C = torch.einsum("uamk,unkc->uanmc", A, B)  # [nu, ntg, ntl, 16, 8]
        for n in range(ntl):
            for m in range(16):
                for c in range(8):
                    if ntl == 1:
                        e, tok = c >> 2, c & 3
                    else:
                        e, tok = n & 1, c + 8 * (n >> 1)
                    if tok >= T:
                        continue
                    rows = torch.arange(lay.ntg) * 128 + tile * 32 + 2 * m + e
                    y[tok].index_add_(0, rows, C[:, :, n, m, c].sum(0))
    y = y[:, :lay.out]
    crow = lay.sparse_crow.cpu().long()
    rows = torch.repeat_interleave(torch.arange(lay.out), crow[1:] - crow[:-1])
    y.index_add_(1, rows, lay.sparse_corr.cpu().double() * x.cpu().double()[:, lay.sparse_col.cpu().long()])
    if lay.bias is not None:
        y += lay.bias.cpu().double()
    if lay.row_scale is not None:  # format v4: the op scales the kernel's output
        y *= lay.row_scale.cpu().double()
    return y


def _w_quantized(layer) -> torch.Tensor:
    """W_hat before the sparse replacement (what the A fragments hold), fp16 values as float64."""
    w = layer.dequantize(torch.float32).double()
    crow = layer.sparse_crow.long()
    rows = torch.repeat_interleave(torch.arange(layer.out_features), crow[1:] - crow[:-1])
    w[rows, layer.sparse_col.long()] = _quantized_values(layer, rows, layer.sparse_col.long()).double()
    return w


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantize(torch.float32).double().T
    return y + layer.bias.double() if layer.bias is not None else y


# -- CPU tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_fragments_are_the_weights(mix, outliers, bf):
    """Every A fragment the kernel builds equals W_q at its (row, channel), bit for bit (bf16: the
    bf16 rounding of W_q); padding slots are zero."""
    layer = _layer(mix, outliers, seed=hash((mix, outliers)) % 997)
    lay = kr.prepare(layer)
    W = emulate_weight(lay, bf)
    ref = _w_quantized(layer)
    if bf:
        ref = ref.to(torch.bfloat16).double()
    chan = lay.chan.long()
    real = chan >= 0
    assert torch.equal(W[:layer.out_features][:, real], ref[:, chan[real]])
    assert (W[:, ~real] == 0).all()
    assert sorted(chan[real].tolist()) == list(range(layer.in_features))


@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("mix", ["mixed", "3bit", "one-channel"])
def test_emulated_linear(mix, tokens):
    """B from x by the row-pair rule and C back by the epilogue rule give layer(x) (fp64 sums)."""
    layer = _layer(mix, True, seed=tokens)
    lay = kr.prepare(layer)
    x = torch.randn(tokens, 300).half()
    y = emulate_linear(lay, x)
    ref = _reference(layer, x)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-9


@pytest.mark.parametrize("out,n_in,bits", [(33, 2000, 2.0), (129, 700, 3.0), (300, 1100, 3.5), (5, 40, 2.5)])
def test_emulated_odd_shapes(out, n_in, bits):
    counts, n_act = mix_counts(n_in, bits)
    layer = random_layer(out, n_in, counts, n_act, 37, bias=True, generator=torch.Generator().manual_seed(out))
    lay = kr.prepare(layer)
    for tokens, dt in [(1, torch.float16), (7, torch.bfloat16), (12, torch.float16)]:
        x = torch.randn(tokens, n_in).to(dt)
        ref = _reference(layer, x) if dt == torch.float16 else (
            x.double() @ _w_bf16(layer).T + layer.bias.double())
        y = emulate_linear(lay, x)
        assert ((y - ref).norm() / ref.norm()).item() < 1e-9


def _w_bf16(layer) -> torch.Tensor:
    """The weight the bf16 path multiplies: W_q rounded to bf16, sparse outliers exact (fp32 corrections)."""
    wq = _w_quantized(layer)
    w = wq.to(torch.bfloat16).double()
    crow = layer.sparse_crow.long()
    rows = torch.repeat_interleave(torch.arange(layer.out_features), crow[1:] - crow[:-1])
    cols = layer.sparse_col.long()
    corr = layer.sparse_val.float() - wq[rows, cols].float()
    w[rows, cols] += corr.double()
    return w


def test_prepare_cached_and_rebuilt():
    layer = _layer("mixed", True, seed=3)
    lay = kr.prepare(layer)
    assert kr.prepare(layer) is lay
    layer.outlier_weight.mul_(2)
    assert kr.prepare(layer) is not lay


def test_plan_covers_units():
    """Splits cover every unit once, stay in order, and the shared memory fits, on the 7B/70B shapes."""
    for out, n_in in [(4096, 4096), (11008, 4096), (4096, 11008), (5120, 5120), (13824, 5120), (5120, 13824),
                      (8192, 8192), (28672, 8192), (8192, 28672), (67, 300)]:
        for bits in (2.0, 2.5, 3.0, 3.5, 4.0):
            counts, n_act = mix_counts(n_in, bits)
            cs, chbase, nch = [0], [], 0
            for kind, ku in zip(kr.KINDS, kr.KU):
                n = n_act if kind == 16 else counts.get(kind, 0)
                nu = -(-n // (ku * 8))
                cs.append(cs[-1] + nu)
                chbase.append(nch)
                nch += nu * ku * 8
            present = [k for k in range(4) if cs[k + 1] > cs[k]]
            lay = SimpleNamespace(ntg=-(-out // 128), cs=tuple(cs), chbase=tuple(chbase),
                                  chan=torch.empty(nch), lutmax=max(kr.LB[k] for k in present),
                                  recmax=max(kr.RB[k] for k in present))
            for T in (1, 4, 5, 8, 16):
                for groups in kr.GROUPS[kr.ntl_of(T)]:
                    pl = kr.plan(lay, T, 132, groups=groups)
                    assert pl is not None, (out, n_in, bits, T, groups)
                    rb, S, smem, slot, xs_off, red_off, usplit, Q = pl
                    assert Q == groups and rb == -(-lay.ntg // Q) and slot == lay.lutmax + Q * lay.recmax
                    assert smem <= kr.MAX_SMEM and 1 <= S <= kr.MAXS and len(usplit) == S + 1
                    assert usplit[0] == 0 and usplit[-1] == cs[-1] and (np.diff(usplit) >= 0).all()
                    # whole waves: no tail wave of a few blocks (ncu, 2026-12-06: 400 blocks where 396 fit)
                    wave = 132 * min(kr.blocks_per_sm(kr.ntl_of(T), Q), kr.SM_SMEM // (smem + 1024))
                    s_x = kr.x_splits(nch, T)  # splits the gathered x needs
                    assert rb * S <= max(1, -(-rb * s_x // wave)) * wave or S == 1, (out, n_in, bits, T, rb, S, wave)
                assert kr.plan(lay, T, 132)[-1] == kr.GROUPS[kr.ntl_of(T)][0]  # the first is the default
            with pytest.raises(ValueError, match="tile groups"):
                kr.plan(lay, 16, 132, groups=2)


def test_linear_declines_what_it_cannot_serve():
    lay = kr.prepare(_layer("mixed", False, seed=1))
    assert kr.linear(torch.randn(2, 300).half(), lay) is None  # CPU tensor
    if torch.cuda.is_available():
        assert kr.linear(torch.randn(17, 300, device="cuda").half(), lay) is None  # > 16 tokens
        assert kr.linear(torch.randn(2, 300, device="cuda"), lay) is None  # fp32


def test_byte_perm_sign_mode():
    x, y = torch.tensor(0x80FF7F01), torch.tensor(0x04030201)
    assert byte_perm(x, y, torch.tensor(0x7654)).item() == 0x04030201
    assert byte_perm(x, y, torch.tensor(0x3210)).item() == 0x80FF7F01
    assert byte_perm(x, y, torch.tensor(0x8B89)).item() == 0x00FF0000  # sign of 0x7F, 0x80 (byte 3), 0x01


# -- GPU ---------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the rlut kernel needs a GPU")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _check(y, layer, x):
    ref = _reference(layer, x)
    assert y is not None and y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[x.dtype], err


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_gpu_rlut(mix, outliers, dtype):
    layer = _layer(mix, outliers, seed=hash((mix, outliers, 5)) % 997, device="cuda")
    lay = kr.prepare(layer)
    for tokens in range(1, 17):
        x = torch.randn(tokens, 300, device="cuda").to(dtype)
        y = kr.linear(x, lay)
        assert y is not None, kr.library_error()
        _check(y, layer, x)
        torch.testing.assert_close(kr.linear(x, lay), y, rtol=2e-3, atol=1e-3)  # accumulator re-zeroed


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_rlut_every_tile_grouping(dtype):
    """Each tile grouping the kernel is built for (``GROUPS``: 5-8 tokens take one or two) gives the
    reference, forced splits and odd row counts included."""
    for out in (300, 129, 1000):
        layer = _layer("mixed", True, seed=out, out=out, device="cuda")
        lay = kr.prepare(layer)
        for tokens in range(1, 17):
            for groups in kr.GROUPS[kr.ntl_of(tokens)]:
                for splits in (None, 3):
                    x = torch.randn(tokens, 300, device="cuda").to(dtype)
                    y = kr.linear(x, lay, splits=splits, groups=groups)
                    assert y is not None, (out, tokens, groups, splits)
                    _check(y, layer, x)


@cuda_only
def test_gpu_rlut_emulation_matches():
    """The kernel's output equals the emulation's (fp64) up to fp32 accumulation."""
    layer = _layer("mixed", True, seed=8, out=300, device="cuda")
    lay = kr.prepare(layer)
    for tokens in (1, 6, 16):
        x = torch.randn(tokens, 300, device="cuda").half()
        y = kr.linear(x, lay).double().cpu()
        ye = emulate_linear(lay, x.cpu())
        assert ((y - ye).norm() / ye.norm()).item() < 1e-3


@cuda_only
def test_gpu_rlut_big_splits_graph():
    for bits, (out, n_in) in [(3.0, (700, 1100)), (2.5, (300, 4100)), (3.5, (2100, 900)), (2.0, (33, 2000)),
                              (4.0, (1000, 1000))]:
        counts, n_act = mix_counts(n_in, bits)
        layer = random_layer(out, n_in, counts, n_act, 400, bias=True, device="cuda",
                             generator=torch.Generator().manual_seed(4))
        lay = kr.prepare(layer)
        for splits in (None, 1, 3, 13, 50):
            for tokens in (1, 2, 7, 9, 16):
                x = torch.randn(tokens, n_in, device="cuda").half()
                y = kr.linear(x, lay, splits=splits)
                if y is None and splits is not None:
                    continue  # a forced split whose gathered x does not fit is refused
                _check(y, layer, x)
        xb = (torch.randn(4, n_in, device="cuda") * 3e6).bfloat16()  # beyond fp16 range
        _check(kr.linear(xb, lay), layer, xb)
    x = torch.randn(1, 3, n_in, device="cuda").half()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = kr.linear(x, lay)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(yg.reshape(3, out), layer, x.reshape(3, n_in))
