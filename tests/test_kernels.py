"""Kernels vs the PyTorch reference (``layer.dequantize()`` + linear in float64).

On a machine without CUDA the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before Triton is first imported); shapes stay small so CI is fast.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from cmpq.kernels import dispatch, force  # noqa: E402
from cmpq.kernels.dequant import prefill  # noqa: E402
from cmpq.kernels.lut_gemv import decode  # noqa: E402
from cmpq.kernels.testing import random_layer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

MIXES = {  # out=67, in=300 (not multiples of any tile)
    "2bit": {2: 300},
    "4bit": {4: 300},
    "mixed": {2: 97, 3: 101, 4: 102},
    "empty-group": {2: 0, 3: 150, 4: 150},
    "one-channel": {2: 1, 3: 200, 4: 99},
}


def _layer(mix: str, outliers: bool, seed: int, out: int = 67):
    counts = dict(MIXES[mix])
    n_act, n_sparse = (7, 23) if outliers else (0, 0)
    if n_act:  # take the outlier columns from the largest group
        b = max(counts, key=counts.get)
        counts[b] -= n_act
    gen = torch.Generator().manual_seed(seed)
    return random_layer(out, 300, counts, n_act, n_sparse, bias=outliers, device=DEV, generator=gen)


def _check(y: torch.Tensor, layer, x: torch.Tensor) -> None:
    w = layer.dequantize(torch.float32).double()
    ref = x.double() @ w.T
    if layer.bias is not None:
        ref = ref + layer.bias.double()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[x.dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_decode(mix, outliers, dtype):
    layer = _layer(mix, outliers, seed=hash((mix, outliers)) % 1000)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, 300, device=DEV).to(dtype)
        _check(decode(layer.runtime(), x), layer, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", ["mixed", "one-channel"])
def test_prefill(mix, dtype):
    layer = _layer(mix, True, seed=7)
    x = torch.randn(2, 17, 300, device=DEV).to(dtype)
    y = prefill(layer.runtime(), x)
    _check(y.reshape(-1, 67), layer, x.reshape(-1, 300))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("out", [67, 1028])  # the CUDA kernel's scalar path, and its 4-row vector path
def test_dequantize_t_exact(mix, outliers, dtype, out):
    """Both dequantizers (CUDA and Triton, both from the runtime layout's quads) give exactly the
    reference weight, transposed; on CPU only the Triton one runs."""
    from cmpq.kernels import dequant

    layer = _layer(mix, outliers, seed=11, out=out)
    rt = layer.runtime()
    ref = layer.dequantize(dtype)
    cuda_wt = dequant._dequantize_cuda(rt, dtype)
    if DEV == "cuda":
        assert cuda_wt is not None, dequant._LIBRARY.error
        assert torch.equal(cuda_wt, ref.T)
    else:
        assert cuda_wt is None
    wt = dequant.dequantize_t(rt, dtype, cuda=False)
    assert wt.is_contiguous()
    if dtype == torch.float16:
        assert torch.equal(wt, ref.T)
    else:  # Triton's interpreter truncates fp16 -> bf16 where torch rounds: one bf16 step apart at most
        torch.testing.assert_close(wt, ref.T, rtol=2**-7, atol=0)


def test_decode_splits_and_batch_dims():
    layer = _layer("mixed", True, seed=3)
    x = torch.randn(2, 2, 300, device=DEV).half()
    for splits in (1, 3, 20):  # 20 splits > channel blocks: some programs get nothing
        y = decode(layer.runtime(), x, block_n=32, splits=splits)
        _check(y.reshape(4, 67), layer, x.reshape(4, 300))


def test_buffers_change_rebuilds_runtime_layout():
    layer = _layer("mixed", True, seed=5)
    x = torch.randn(1, 300, device=DEV).half()
    first = layer.runtime()
    decode(first, x)
    assert layer.runtime() is not None and layer.runtime_tensors()[0] is first.groups[0].q  # built once
    layer.q3_codebook.mul_(2)
    _check(decode(layer.runtime(), x), layer, x)
    layer.q3_codebook = layer.q3_codebook.clone()  # replaced, same values
    assert not layer.runtime_current()
    _check(decode(layer.runtime(), x), layer, x)


def test_runtime_layout_is_not_saved_and_moves_with_the_layer():
    layer = _layer("mixed", True, seed=5)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare_runtime()
    names = [n for n, _ in layer.named_buffers() if n.startswith("rt_")]
    assert names and set(layer.state_dict()) == set(sd)  # non-persistent: never saved
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in sd.items())
    layer.half()  # stored fp16 tensors stay, but the fp32 sparse corrections would turn fp16: dropped
    assert not layer.runtime_tensors() and not layer.runtime_current()
    assert layer.runtime() is not None  # rebuilt on demand
    layer.to("meta")  # moved along with the stored buffers: still current, nothing rebuilt
    assert layer.runtime_current() and all(t.is_meta for t in layer.runtime_tensors())
    layer.release_runtime()
    assert not [n for n, _ in layer.named_buffers() if n.startswith("rt_")]


def test_dispatch_table_and_force():
    """The measured table picks by token count and layer size; force() overrides it, nests, and
    refuses names that are not kernels (the deleted variants among them)."""
    from cmpq.kernels import KERNELS, TABLE, choose, force, forced

    assert {name for *_, name in TABLE} <= set(KERNELS)
    assert choose(1, 4096 * 11008) == "v4s" and choose(1, 8192 * 8192) == "v4s"
    assert choose(1, 28672 * 8192) == "v3b"  # 70B MLP shapes
    assert choose(2, 4096 * 4096) == "mma" and choose(16, 28672 * 8192) == "mma"
    assert choose(17, 4096 * 4096) == "prefill" and choose(2048, 10) == "prefill"
    assert forced() is None
    with force("triton"):
        assert choose(1, 10) == "triton" and forced() == "triton"
        with force("reference"):
            assert choose(2048, 10) == "reference"
        assert forced() == "triton"
    assert forced() is None and choose(1, 10) == "v4s"
    for gone in ("v4p", "v4h", "v4s5", "auto"):
        with pytest.raises(ValueError, match="unknown cmpq kernel"):
            with force(gone):
                pass


def test_dispatch_falls_back_along_the_chain(monkeypatch):
    """A kernel that does not apply hands the call on (mma -> v3b -> triton -> reference)."""
    calls = []

    def runner(name, result):
        def f(rt, x):
            calls.append(name)
            return result
        return f

    y = torch.zeros(1)
    monkeypatch.setattr(dispatch, "RUNNERS", {"v4s": runner("v4s", None), "mma": runner("mma", None),
                                              "v3b": runner("v3b", None), "triton": runner("triton", y),
                                              "prefill": runner("prefill", None)})
    assert dispatch.serve("mma", None, y) is y and calls == ["mma", "v3b", "triton"]
    calls.clear()
    assert dispatch.serve("prefill", None, y) is None and calls == ["prefill"]
    assert dispatch.serve("reference", None, y) is None


def test_dispatch_run_on_this_device():
    layer = _layer("mixed", True, seed=1)
    rt = layer.runtime()
    x = torch.randn(3, 300, device=DEV).half()
    assert dispatch.run(x.float(), rt) is None  # fp32: reference path
    assert dispatch.run(x[:0], rt) is None  # no rows
    for tokens in (1, 3, 40):  # the Triton fallbacks, decode and prefill (CPU: interpreter)
        xt = torch.randn(tokens, 300, device=DEV).half()
        _check(dispatch.serve("triton", rt, xt), layer, xt)
    if DEV == "cpu":
        assert dispatch.run(x, rt) is None  # CPU: reference path
        return
    from cmpq.kernels import KERNELS, force

    with force("reference"):
        assert dispatch.run(x, rt) is None
    for name in KERNELS[:-1]:
        with force(name):
            for tokens in (1, 2, 16, 40):
                xt = torch.randn(tokens, 300, device=DEV).half()
                _check(dispatch.run(xt, rt), layer, xt)
    _check(layer(x), layer, x)
    xl = torch.randn(40, 300, device=DEV).half()  # prefill
    _check(layer(xl), layer, xl)


def test_row_scaled_layer_through_the_kernels():
    """Format v4 row scales: the kernels run on the scaled values with ``bias / s`` in the runtime
    layout and the operator multiplies by ``s``; every path must still give ``x @ W_hat^T + bias``."""
    from cmpq.algorithm.budget import FP16
    from cmpq.algorithm.compensated import quantize_compensated
    from cmpq.nn.linear import pack_linear

    g = torch.Generator().manual_seed(3)
    W = torch.randn(67, 300, generator=g) * 0.05 * torch.exp(torch.randn(67, 1, generator=g))
    widths = torch.tensor([2, 3, 4] * 99 + [FP16] * 3)
    parts = quantize_compensated(W, torch.eye(300), widths, n_sparse=20, kmeans_iters=5, row_scale=True)
    layer = pack_linear(parts, torch.randn(67, generator=g) * 0.1).to(DEV)
    layer.prepare_runtime()
    rt = layer.runtime()
    s = layer.row_scale
    assert s is not None and not torch.allclose(s.float(), torch.ones_like(s.float()), atol=0.05)
    torch.testing.assert_close(rt.bias * s.float(), layer.bias.float(), rtol=1e-3, atol=1e-6)
    for tokens in (1, 3, 40):  # the Triton paths (CPU: interpreter), scaled as the operator scales them
        xt = torch.randn(tokens, 300, device=DEV).half()
        _check(dispatch.serve("triton", rt, xt) * s, layer, xt)
        _check(layer(xt), layer, xt)
    if DEV == "cpu":
        return
    from cmpq.kernels import KERNELS

    for name in KERNELS[:-1]:
        with force(name):
            for tokens in (1, 2, 16, 40):
                xt = torch.randn(tokens, 300, device=DEV).half()
                _check(layer(xt), layer, xt)


# -- v3: CUDA C++ decode kernel (cmpq/kernels/cuda_decode.py) ------------------------------------
from cmpq.kernels import cuda_decode  # noqa: E402


@pytest.mark.parametrize("mix", list(MIXES))
def test_quads_roundtrip(mix):
    """The quads hold exactly the stored indices (CPU, no kernel needed)."""
    from cmpq.kernels import layout

    layer = _layer(mix, True, seed=11)
    lay = layer.runtime()
    for g in lay.groups:
        assert g.q.shape == (-(-g.n // (4 * (32 // g.bits))), 67, 4)
        assert torch.equal(layout.unquads(g.q, g.bits, g.n), layer.group_indices(g.bits))
    # emulate the kernel's sum: sum_c cb[c, idx] * x[ch_c] + outliers + sparse corrections == ref
    layer = layer.cpu()
    lay = layer.runtime()
    x = torch.randn(2, 300, dtype=torch.float64)
    y = torch.zeros(2, 67, dtype=torch.float64)
    for g in lay.groups:
        idx = layout.unquads(g.q, g.bits, g.n)
        w = g.codebook[:g.n].double().gather(1, idx.t()).t()  # [out, n]
        y += x[:, g.channels[:g.n].long()] @ w.T
    y += x[:, lay.outlier_channels.long()] @ lay.outlier_weight_t.double()
    rows = torch.repeat_interleave(torch.arange(67), (lay.sparse_crow[1:] - lay.sparse_crow[:-1]).long())
    y.index_add_(1, rows, lay.sparse_corr.double() * x[:, lay.sparse_col.long()])
    ref = x @ layer.dequantize(torch.float32).double().T
    # the reference is dequantized in float32: its rounding over 300 channels is ~sqrt(300) * 2**-24
    # ~ 1e-6 relative (1.35e-6 measured on an H200, 2026-12-05); a layout bug gives O(1)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_plan_fits_shared_memory():
    layer = _layer("mixed", False, seed=2)
    lay = layer.runtime()
    for nt in cuda_decode.NT_CHOICES:
        rb, S, smem, offs = cuda_decode.plan(lay.groups, 67, nt, sms=132)
        assert rb == 1 and 1 <= S and smem <= 200 << 10
        assert all(lut % 512 == 0 for lut, _ in offs)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel needs a GPU")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_cuda_decode(mix, outliers, dtype):
    assert cuda_decode.available(), cuda_decode.library_error()
    layer = _layer(mix, outliers, seed=hash((mix, outliers, 1)) % 1000)
    for tokens in (1, 2, 3, 5, 8, 16):
        x = torch.randn(tokens, 300, device=DEV).to(dtype)
        y = cuda_decode.decode(layer.runtime(), x)
        _check(y, layer, x)
        y2 = cuda_decode.decode(layer.runtime(), x)  # accumulator and counters reset: a second call agrees
        torch.testing.assert_close(y, y2, rtol=2e-3, atol=1e-3)


@cuda_only
def test_cuda_decode_splits_big_and_graph():
    from cmpq.kernels.testing import mix_counts, random_layer

    counts, n_act = mix_counts(1100, 3.0)
    gen = torch.Generator().manual_seed(4)
    layer = random_layer(700, 1100, counts, n_act, 400, bias=True, device=DEV, generator=gen)
    for splits in (None, 1, 3, 13):  # 50 > quads of some groups: some blocks get no channels
        for tokens in (1, 4, 16):
            x = torch.randn(tokens, 1100, device=DEV).half()
            _check(cuda_decode.decode(layer.runtime(), x, splits=splits), layer, x)
    x = torch.randn(1, 1, 1100, device=DEV).half()
    y0 = layer(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = layer(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(yg.reshape(1, 700), layer, x.reshape(1, 1100))
    assert y0.shape == (1, 1, 700)


# -- v4s (cmpq/kernels/kernel_v4.cu, one token) ------------------------------------------------
def test_v4_plan_fits():
    from cmpq.kernels import kernel_v4

    for mix in MIXES:
        lay = _layer(mix, True, seed=2).runtime()
        for splits in (None, 1, 2, 7):
            rb, S, smem, (ring, tbl) = kernel_v4.plan(lay.groups, 67, 132, splits)
            assert rb == 1 and 1 <= S and smem <= kernel_v4.MAX_SMEM
            assert tbl % 256 == 0 and ring == 0 and tbl >= kernel_v4.RING_DEPTH * 256 * 16
            assert smem >= tbl + kernel_v4.table_bytes(lay.groups, S)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_cuda_decode_v4s(mix, outliers, dtype):
    from cmpq.kernels import kernel_v4

    layer = _layer(mix, outliers, seed=hash((mix, outliers, 2)) % 1000)
    x = torch.randn(1, 300, device=DEV).to(dtype)
    y = kernel_v4.decode(layer.runtime(), x)
    assert y is not None, kernel_v4.library_error()
    _check(y, layer, x)
    y2 = kernel_v4.decode(layer.runtime(), x)  # accumulator and counters reset
    torch.testing.assert_close(y, y2, rtol=2e-3, atol=1e-3)
    for tokens in (2, 3, 16):  # more tokens: v3b behind the same entry point
        xt = torch.randn(tokens, 300, device=DEV).to(dtype)
        with force("v4s"):  # more tokens: v3b behind the same name
            _check(dispatch.run(xt, layer.runtime()), layer, xt)


@cuda_only
def test_cuda_decode_v4s_big_splits_graph():
    from cmpq.kernels import kernel_v4
    from cmpq.kernels.testing import mix_counts, random_layer

    for bits, (out, n_in) in [(3.0, (700, 1100)), (2.5, (300, 4100)), (3.5, (2100, 900))]:
        counts, n_act = mix_counts(n_in, bits)
        gen = torch.Generator().manual_seed(4)
        layer = random_layer(out, n_in, counts, n_act, 400, bias=True, device=DEV, generator=gen)
        for splits in (None, 1, 3, 13, 50):
            x = torch.randn(1, n_in, device=DEV).half()
            y = kernel_v4.decode(layer.runtime(), x, splits=splits)
            if y is None and splits is not None:  # a forced split whose tables exceed a block's shared memory
                assert kernel_v4.plan(layer.runtime().groups, out, 132, splits) is None
                continue
            _check(y, layer, x)
        xb = (torch.randn(1, n_in, device=DEV) * 3e6).bfloat16()  # x*cb beyond fp16 range: fp32 tables
        _check(kernel_v4.decode(layer.runtime(), xb), layer, xb)
    x = torch.randn(1, 1, n_in, device=DEV).half()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        with force("v4s"):
            yg = dispatch.run(x, layer.runtime())
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(yg.reshape(1, out), layer, x.reshape(1, n_in))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_v4_group_launch_equals_separate(dtype):
    """q/k/v-like (same out) and gate/up-like (different mixes) groups in one launch give what each
    layer gives alone; run twice (workspaces self-zero), and inside a CUDA graph."""
    from cmpq.kernels import kernel_v4
    from cmpq.kernels.testing import mix_counts, random_layer

    gen = torch.Generator().manual_seed(5)
    for shapes in ([(700, 1100, 3.0), (700, 1100, 2.5), (700, 1100, 3.5)], [(2100, 1100, 3.0), (300, 1100, 4.0)]):
        layers = []
        for out, n_in, bits in shapes:
            counts, n_act = mix_counts(n_in, bits)
            layers.append(random_layer(out, n_in, counts, n_act, 300, bias=True, device=DEV, generator=gen))
        x = torch.randn(1, 1100, device=DEV).to(dtype)
        for _ in range(2):
            ys = kernel_v4.decode_group([l.runtime() for l in layers], x)
            assert ys is not None, kernel_v4.library_error()
            for y, layer in zip(ys, layers):
                # the split-K sums run in another order: the same up to one step of the output dtype
                rtol = 1e-3 if dtype == torch.float16 else 2**-7
                torch.testing.assert_close(y, kernel_v4.decode(layer.runtime(), x), rtol=rtol, atol=1e-3)
                _check(y, layer, x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = kernel_v4.decode_group([l.runtime() for l in layers], x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    for y, layer in zip(yg, layers):
        _check(y, layer, x)


@cuda_only
@pytest.mark.parametrize("tokens", [1, 4])
def test_group_operator_equals_each_layer(tokens):
    """``cmpq::linear_group`` on CUDA: one launch at one token (v4s group), each member's own kernel
    at more; row-scaled and plain members; also inside a CUDA graph."""
    from cmpq.kernels.testing import mix_counts, random_layer
    from cmpq.nn import ops

    gen = torch.Generator().manual_seed(6)
    layers = []
    for out, bits, scaled in ((700, 3.0, True), (300, 2.5, False), (900, 4.0, True)):
        counts, n_act = mix_counts(1100, bits)
        layer = random_layer(out, 1100, counts, n_act, 200, bias=True, device=DEV, generator=gen)
        if scaled:
            layer.row_scale = (torch.rand(out, generator=gen) + 0.5).half().to(DEV)
        layers.append(layer)
    for layer in layers:
        layer.prepare_runtime()
    x = torch.randn(1, tokens, 1100, device=DEV).half()
    args = ops.flatten_members([l._op_args_unscaled() if l.row_scale is not None else l._op_args() for l in layers])
    outs = torch.ops.cmpq.linear_group(x, *args)
    for y, layer in zip(outs, layers):
        if layer.row_scale is not None:
            y = y * layer.row_scale.to(y.dtype)
        _check(y.reshape(tokens, -1), layer, x.reshape(tokens, -1))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = torch.ops.cmpq.linear_group(x, *args)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    for y, layer in zip(yg, layers):
        if layer.row_scale is not None:
            y = y * layer.row_scale.to(y.dtype)
        _check(y.reshape(tokens, -1), layer, x.reshape(tokens, -1))


# -- mma: tensor-core kernel for 2..16 tokens (cmpq/kernels/kernel_mma.cu) ------------------------
def _mma_emulate(layer, x: torch.Tensor) -> torch.Tensor:
    """The kernel's sum, from the mma layout only, the way the kernel reads it: fields of the lane
    words, codebook at slot t + 4e + 8h, x at chl[k-step*16 + k], fp16 fragments for the outliers."""
    from cmpq.kernels import kernel_mma as km

    rt = layer.runtime()
    lay = rt.mma
    out, T = layer.out_features, x.shape[0]
    y = torch.zeros(T, lay.ntiles * 16, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    koff = 0
    tb = 0
    for k, kind in enumerate(km.KINDS):
        c0, c1 = lay.cs[k], lay.cs[k + 1]
        nch, ks = c1 - c0, km.KS[kind]
        if nch == 0:
            continue
        q = lay.q[c0:c1].cpu().to(torch.int64) & 0xFFFFFFFF  # [nch, nt, 32, 4]
        if kind == 16:
            vals = lay.q[c0:c1].cpu().contiguous().view(torch.float16).double()  # [nch, nt, 32, 8]
        else:
            K, V = 32 // kind, 1 << kind
            sh = torch.arange(K) * kind
            idx = ((q.unsqueeze(-1) >> sh) & (V - 1)).reshape(*q.shape[:3], 4 * K)[..., :ks * 8]
            tbl = lay.tbl[tb // 2:(tb + nch * km.TB[kind]) // 2].cpu().double().reshape(nch, ks, 16, V)
            tb += nch * km.TB[kind]
        for s in range(ks):
            for j in range(8):
                e, rowhi, h = j & 1, (j >> 1) & 1, j >> 2
                kk = 2 * t + e + 8 * h  # [32]
                ch = lay.chl.cpu()[(koff + torch.arange(nch).unsqueeze(1) * ks + s) * 16 + kk].long()  # [nch, 32]
                if kind == 16:
                    w = vals[..., s * 8 + j]  # [nch, nt, 32]
                else:
                    slot = (t + 4 * e + 8 * h)
                    w = tbl[torch.arange(nch)[:, None, None], s, slot[None, None, :], idx[..., s * 8 + j]]
                rows = torch.arange(lay.ntiles)[None, :, None] * 16 + g[None, None, :] + 8 * rowhi
                xv = x.double()[:, ch]  # [T, nch, 32]
                contrib = w.unsqueeze(0) * xv.unsqueeze(2)  # [T, nch, nt, 32]
                y.index_add_(1, rows.expand(nch, -1, -1).reshape(-1), contrib.reshape(T, -1))
        koff += nch * ks
    y = y[:, :out]
    c = rt
    rows = torch.repeat_interleave(torch.arange(out), (c.sparse_crow[1:] - c.sparse_crow[:-1]).long().cpu())
    y.index_add_(1, rows, c.sparse_corr.cpu().double() * x.double()[:, c.sparse_col.cpu().long()])
    if c.bias is not None:
        y += c.bias.cpu().double()
    return y


@pytest.mark.parametrize("mix", list(MIXES))
def test_mma_layout_emulated(mix):
    """The mma layout holds the stored indices and, read as the kernel reads it, gives layer(x) (CPU)."""
    from cmpq.kernels import layout

    layer = _layer(mix, True, seed=21).cpu()
    lay = layer.runtime().mma
    for b in layer.bit_widths:
        n = layer.group(b)[0].numel()
        if n:
            assert torch.equal(layout.mma_unpack(lay, b, n, 67), layer.group_indices(b))
    assert torch.equal(layout.mma_unpack(lay, 16, layer.outlier_channels.numel(), 67).half(), layer.outlier_weight)
    x = torch.randn(5, 300, dtype=torch.float64)
    ref = x @ layer.dequantize(torch.float32).double().T + layer.bias.double()
    y = _mma_emulate(layer, x)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-6


def test_mma_plan_fits():
    from cmpq.kernels import kernel_mma as km
    from cmpq.kernels.testing import mix_counts

    for n_in, bits in [(300, 3.0), (4096, 2.5), (11008, 3.0), (28672, 3.5), (8192, 4.0)]:
        counts, n_act = mix_counts(n_in, bits)
        cs = [0]
        for kind in km.KINDS:
            n = n_act if kind == 16 else counts.get(kind, 0)
            cs.append(cs[-1] + -(-n // (16 * km.KS[kind])))
        for ntiles in (5, 256, 1792):
            for ntl in (1, 2):
                for tpb in (None, 4, 2):
                    pl = km.plan(tuple(cs), ntiles, ntl, 132, None, tpb)
                    assert pl is not None
                    rb, S, smem, (red, tbl, xf), _ = pl
                    assert 1 <= S <= max(1, cs[-1]) and smem <= km.MAX_SMEM and tbl % 256 == 0


def test_mma_plan_cuts_a_small_tail_wave():
    """The 7B shapes' grids spilled 5-9% past one wave (416 / 430 blocks where 396 fit) and ran 11-22%
    faster cut to one wave (H100, mma-splits-h100.json); 8192x8192's 13% spill stays (one wave was slower)."""
    from cmpq.kernels import kernel_mma as km
    from cmpq.kernels.testing import mix_counts

    def blocks(out, n_in):
        counts, n_act = mix_counts(n_in, 3.0)
        cs = [0]
        for kind in km.KINDS:
            n = n_act if kind == 16 else counts.get(kind, 0)
            cs.append(cs[-1] + -(-n // (16 * km.KS[kind])))
        rb, S = km.plan(tuple(cs), -(-out // 16), 1, 132)[:2]
        return rb * S

    wave = 132 * km.BLOCKS_PER_SM
    assert blocks(4096, 4096) <= wave and blocks(4096, 11008) <= wave and blocks(11008, 4096) <= wave
    assert blocks(4096, 4096) > wave - 32 and blocks(11008, 4096) > wave - 86  # one wave, not less
    assert blocks(8192, 8192) > wave * 1.10


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_cuda_decode_mma(mix, outliers, dtype):
    from cmpq.kernels import kernel_mma

    layer = _layer(mix, outliers, seed=hash((mix, outliers, 3)) % 1000)
    for tokens in range(1, 17):
        x = torch.randn(tokens, 300, device=DEV).to(dtype)
        y = kernel_mma.decode(layer.runtime(), x)
        assert y is not None, kernel_mma.library_error()
        _check(y, layer, x)
        y2 = kernel_mma.decode(layer.runtime(), x)  # accumulator and counters reset
        torch.testing.assert_close(y, y2, rtol=2e-3, atol=1e-3)
        with force("mma"):
            _check(dispatch.run(x, layer.runtime()), layer, x)


@cuda_only
def test_cuda_decode_mma_big_splits_graph():
    from cmpq.kernels import kernel_mma
    from cmpq.kernels.testing import mix_counts, random_layer

    for bits, (out, n_in) in [(3.0, (700, 1100)), (2.5, (300, 4100)), (3.5, (2100, 900)), (2.0, (33, 2000)),
                              (4.0, (1000, 1000))]:
        counts, n_act = mix_counts(n_in, bits)
        gen = torch.Generator().manual_seed(4)
        layer = random_layer(out, n_in, counts, n_act, 400, bias=True, device=DEV, generator=gen)
        for splits, tpb in [(None, None), (1, None), (3, 4), (13, 2), (50, 1), (None, 8)]:
            for tokens in (2, 7, 9, 16):
                x = torch.randn(tokens, n_in, device=DEV).half()
                y = kernel_mma.decode(layer.runtime(), x, splits=splits, tpb=tpb)
                if y is None and (splits, tpb) != (None, None):
                    # a forced split that needs more shared memory than a block has is refused (H200
                    # run 2026-11-30: 300x4100 at 1 split); the default plan must always apply
                    continue
                _check(y, layer, x)
        xb = (torch.randn(4, n_in, device=DEV) * 3e6).bfloat16()  # beyond fp16 range: bf16 MMA
        _check(kernel_mma.decode(layer.runtime(), xb), layer, xb)
    x = torch.randn(1, 4, n_in, device=DEV).half()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        with force("mma"):
            yg = dispatch.run(x, layer.runtime())
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _check(yg.reshape(4, out), layer, x.reshape(4, n_in))
    xs = torch.randn(12, n_in, device=DEV).half()  # two n8 tiles, straight through kernel_mma in a graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = kernel_mma.decode(layer.runtime(), xs)
    xs.copy_(torch.randn_like(xs))
    g.replay()
    torch.cuda.synchronize()
    _check(yg, layer, xs)


@pytest.mark.parametrize("struct", ["DQ", "DQL"])
def test_dequant_params_match_the_cuda_struct(struct):
    """The ctypes mirrors of ``struct DQ`` and ``struct DQL`` name the same fields in the same order
    as the CUDA source, arrays with the same length (padding can make a wrong mirror the same size,
    so the library's size check alone misses it)."""
    import re

    from cmpq.kernels import dequant

    src = open(dequant.SRC).read()
    body = re.search(r"struct %s \{(.*?)\};" % struct, src, re.S).group(1)
    names = []
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        decl = decl.strip()
        if decl:
            names += [n.strip().lstrip("*") for n in re.sub(r"^(const\s+)?\w+\*?\s+\*?", "", decl).split(",")]
    names = [re.sub(r"\[MAXG\]", "[%s]" % re.search(r"#define MAXG (\d+)", src).group(1), n) for n in names]
    mirror = getattr(dequant, "_" + struct)._fields_
    assert names == [f if not hasattr(t, "_length_") else f"{f}[{t._length_}]" for f, t in mirror]
