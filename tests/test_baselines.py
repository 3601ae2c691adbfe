"""Tests of the baseline quantizers (cmpq.baselines): RTN, GPTQ, AWQ, LLM-MQ allocation."""

from __future__ import annotations

import itertools

import pytest
import torch

from cmpq.baselines import (
    HessianAccumulator,
    allocate_layer_bits,
    awq_quantize,
    awq_quantize_layers,
    awq_search_clip,
    awq_search_scale,
    first_order_sensitivity,
    gptq_quantize,
    proxy_sensitivity,
    rtn_bits_per_weight,
    rtn_quantize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_x(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * (torch.rand(d, generator=g) * 3 + 0.2)


def _out_err(x: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return (x @ (W - W_hat).T).pow(2).sum().item()


# ---------------------------------------------------------------- RTN


@pytest.mark.parametrize("group_size", [128, 64, None])
def test_rtn_error_decreases_with_bits(group_size):
    W = torch.randn(64, 200, generator=_gen(1))
    errs = [(rtn_quantize(W, b, group_size) - W).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # error bound of round-to-nearest: half a step per element
    step = (W.amax(1) - W.amin(1)) / 15
    assert ((rtn_quantize(W, 4, None) - W).abs() <= step[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_exact_round_trip(bits):
    """A weight whose groups each hold all 2^b levels of a zero-containing uniform grid is reproduced."""
    out, n, gs = 8, 200, 64
    g = _gen(2)
    maxq = 2**bits - 1
    ngroups = -(-n // gs)
    scale = 2.0 ** torch.randint(-6, 2, (out, ngroups), generator=g).float()
    zero = torch.randint(0, maxq + 1, (out, ngroups), generator=g).float()
    q = torch.randint(0, maxq + 1, (out, n), generator=g).float()
    gid = torch.arange(n) // gs
    for j in range(ngroups):  # make sure both ends of the grid occur in every group
        c = int((gid == j).nonzero()[0])
        q[:, c], q[:, c + 1] = 0, maxq
    W = scale[:, gid] * (q - zero[:, gid])
    torch.testing.assert_close(rtn_quantize(W, bits, gs), W, rtol=0, atol=0)


def test_rtn_ragged_last_group():
    W = torch.randn(16, 200, generator=_gen(3))
    W[:, 128:] *= 1e-4  # ragged tail 128..199 must get its own (tiny) grid
    Wq = rtn_quantize(W, 3, 128)
    tail_err = (Wq[:, 128:] - W[:, 128:]).abs().max().item()
    assert tail_err <= W[:, 128:].abs().max().item() * 2 / 7 / 2 + 1e-9
    assert tail_err < 1e-4 * 0.5
    # and the full group is unaffected by the tail
    torch.testing.assert_close(Wq[:, :128], rtn_quantize(W[:, :128], 3, 128))


def test_rtn_dtype_and_bits_per_weight():
    W = torch.randn(4, 576, generator=_gen(4)).to(torch.bfloat16)
    assert rtn_quantize(W, 4).dtype == torch.bfloat16
    assert rtn_bits_per_weight(4096, 4, 128) == pytest.approx(4.25)
    assert rtn_bits_per_weight(576, 3, 128) == pytest.approx(3 + 5 * 32 / 576)  # 4.5 groups -> 5
    assert rtn_bits_per_weight(576, 3, None, 16, 3) == pytest.approx(3 + 19 / 576)


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(bits, act_order):
    n_in, out, gs = 200, 48, 64  # ragged last group (200 = 3*64 + 8)
    x = _correlated_x(1024, n_in, seed=5)
    W = torch.randn(out, n_in, generator=_gen(6))
    acc = HessianAccumulator(n_in)
    for chunk in x.split(300):
        acc.add(chunk.view(-1, 3, n_in) if chunk.shape[0] % 3 == 0 else chunk)
    assert acc.count == 1024
    torch.testing.assert_close(acc.H, 2 / 1024 * x.T @ x, rtol=1e-4, atol=1e-3)
    Wg = gptq_quantize(W, acc.H, bits, gs, block_size=32, act_order=act_order)
    Wr = rtn_quantize(W, bits, gs)
    assert _out_err(x, W, Wg) < 0.97 * _out_err(x, W, Wr)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_block_size_is_only_a_speed_knob(act_order):
    """Lazy batch updates are exact: any block size (also ones where groups straddle blocks) gives
    the same result as column-by-column updates."""
    x = _correlated_x(256, 100, seed=19)
    W = torch.randn(16, 100, generator=_gen(20))
    ref = gptq_quantize(W, x.T @ x, 3, 32, block_size=1, act_order=act_order)
    for bs in (24, 32, 128):
        got = gptq_quantize(W, x.T @ x, 3, 32, block_size=bs, act_order=act_order)
        assert (got - ref).abs().gt(1e-4).float().mean() < 0.01  # rare rounding-tie flips only


def test_gptq_scale_invariant_and_dead_inputs():
    n_in, out = 96, 16
    x = _correlated_x(512, n_in, seed=7)
    x[:, 5] = 0
    W = torch.randn(out, n_in, generator=_gen(8))
    H = x.T @ x
    a = gptq_quantize(W, H, 3, 32)
    b = gptq_quantize(W, H * 1e-3, 3, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (a[:, 5] == 0).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, None])
def test_gptq_identity_hessian_is_rtn(group_size, act_order):
    """With H = I there is nothing to compensate: GPTQ reduces to RTN."""
    W = torch.randn(32, 200, generator=_gen(9))
    Wg = gptq_quantize(W, torch.eye(200), 3, group_size, block_size=48, act_order=act_order)
    torch.testing.assert_close(Wg, rtn_quantize(W, 3, group_size), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- AWQ


def _outlier_x(n: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:4]] *= 30.0  # a few large-magnitude activation channels
    return x


def test_awq_scale_search_improves_on_rtn():
    d = 256
    x = _outlier_x(512, d, seed=10)
    Ws = [torch.randn(64, d, generator=_gen(11)), torch.randn(32, d, generator=_gen(12))]
    s, losses = awq_search_scale(Ws, x, 3, 128, grid=20)
    assert s.shape == (d,) and losses.shape == (20,)
    assert losses.min() < losses[0]  # strictly better than scale 1 (alpha = 0)
    err_awq = sum(_out_err(x, W, awq_quantize(W, s, 3, 128)) for W in Ws)
    err_rtn = sum(_out_err(x, W, rtn_quantize(W, 3, 128)) for W in Ws)
    assert err_awq < err_rtn
    # the returned loss table is the actual output MSE
    n_out = sum(W.shape[0] for W in Ws)
    assert losses.min().item() == pytest.approx(err_awq / (x.shape[0] * n_out), rel=1e-3)


def test_awq_never_worse_than_rtn_and_clip():
    d = 200  # ragged groups; few tokens -> direct (non-Gram) error path
    x = torch.randn(64, d, generator=_gen(13))
    W = torch.randn(24, d, generator=_gen(14))
    s, losses = awq_search_scale([W], x, 4, 128)
    assert losses.min() <= losses[0]
    assert torch.equal(awq_search_scale([W], x, 4, 128, grid=1)[0], torch.ones(d))
    cm = awq_search_clip(W, x, s, 4, 128)
    assert cm.shape == (24, 2)
    e_noclip = _out_err(x, W, awq_quantize(W, s, 4, 128))
    e_clip = _out_err(x, W, awq_quantize(W, s, 4, 128, cm))
    assert e_clip <= e_noclip * (1 + 1e-5)
    (Wq,), s2 = awq_quantize_layers([W.half()], x, 4, 128)
    assert Wq.dtype == torch.float16 and torch.equal(s2, s)


# ---------------------------------------------------------------- LLM-MQ


def _brute_force(sens, sizes, budget, choices):
    names = list(sizes)
    total = sum(sizes.values())
    best = float("inf")
    for combo in itertools.product(choices, repeat=len(names)):
        if sum(b * sizes[l] for b, l in zip(combo, names)) <= budget * total + 1e-9:
            best = min(best, sum(sens[l][b] for b, l in zip(combo, names)))
    return best


def _random_sens(names, g):
    out = {}
    for l in names:
        v = sorted(torch.rand(3, generator=g).tolist(), reverse=True)  # decreasing in bits
        out[l] = {2: v[0] * 10, 3: v[1], 4: v[2] * 0.1}
    return out


def test_llmmq_meets_budget_exactly():
    g = _gen(15)
    names = [f"l{i}" for i in range(4)]
    sizes = {l: 1000 for l in names}
    alloc = allocate_layer_bits(_random_sens(names, g), sizes, 3.0)
    assert sum(alloc.values()) / 4 == 3.0
    alloc = allocate_layer_bits(_random_sens(names, g), sizes, 2.5)
    assert sum(alloc.values()) / 4 == 2.5
    assert allocate_layer_bits(_random_sens(names, g), sizes, 4.7) == {l: 4 for l in names}
    with pytest.raises(ValueError):
        allocate_layer_bits(_random_sens(names, g), sizes, 1.9)


@pytest.mark.parametrize("seed", range(12))
def test_llmmq_matches_brute_force(seed):
    g = _gen(100 + seed)
    L = int(torch.randint(2, 7, (1,), generator=g))
    names = [f"l{i}" for i in range(L)]
    sizes = {l: int(torch.randint(1, 9, (1,), generator=g)) * 576 * 64 for l in names}
    sens = {l: {b: float(torch.rand(1, generator=g)) for b in (2, 3, 4)} for l in names}  # arbitrary, not monotone
    budget = 2.0 + 2.0 * float(torch.rand(1, generator=g))
    alloc = allocate_layer_bits(sens, sizes, budget)
    total = sum(sizes.values())
    assert sum(alloc[l] * sizes[l] for l in names) <= budget * total + 1e-9
    assert sum(sens[l][alloc[l]] for l in names) == pytest.approx(_brute_force(sens, sizes, budget, (2, 3, 4)))


def test_sensitivities():
    W = torch.randn(8, 16, generator=_gen(16))
    Wq = rtn_quantize(W, 2, 8)
    grad = torch.randn(8, 16, generator=_gen(17))
    assert first_order_sensitivity(W, grad, Wq) == pytest.approx(abs((grad * (Wq - W)).sum().item()), rel=1e-5)
    x = torch.randn(100, 16, generator=_gen(18))
    a = x.pow(2).sum(0)
    assert proxy_sensitivity(W, a, Wq) == pytest.approx((a * (W - Wq).pow(2).sum(0)).sum().item(), rel=1e-5)
    assert proxy_sensitivity(W, a, W) == 0.0


# ---------------------------------------------------------------- GPTQ: the fast column loop is the reference loop


def _gptq_columnwise(W, H, bits, group_size, damp=0.01, block_size=128, act_order=False):
    """cmpq's GPTQ before the speed work (column-major block, rtn.fake_quant, full-width rank-1
    updates: the reference's loop op for op); the fast loop must give bit-identical weights."""
    from cmpq.baselines.gptq import _inverse_hessian_cholesky
    from cmpq.baselines.rtn import _group_size, fake_quant, minmax_params

    n = W.shape[1]
    Wf, H = W.float().clone(), H.float().clone()
    mean_diag = H.diagonal().mean()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        Wf, H = Wf[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, damp, mean_diag)
    grouped = group_size is not None and group_size < n
    g = _group_size(n, group_size)
    scale, zero = minmax_params(Wf, bits)
    Q = torch.empty_like(Wf)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Err1, Hinv1 = Wf[:, i1:i2].clone(), torch.zeros(Wf.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and col % g == 0:
                seg = W1[:, i : i + g]
                if i + g > i2 - i1:
                    seg = torch.cat([seg, Wf[:, i2 : col + g] - Err1[:, :i] @ Hinv[i1:col, i2 : col + g]], 1)
                scale, zero = minmax_params(seg, bits)
            w = W1[:, i]
            q = fake_quant(w.unsqueeze(1), scale, zero, bits).squeeze(1)
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size,block_size", [(2, 64, 64), (3, 32, 48), (4, None, 32), (3, 64, 128)])
def test_gptq_fast_loop_is_bit_identical(bits, group_size, block_size, act_order):
    x = _correlated_x(512, 200, seed=31)
    x[:, 7] = 0  # a dead input
    W = torch.randn(40, 200, generator=_gen(32))
    H = x.T @ x
    got = gptq_quantize(W, H, bits, group_size, block_size=block_size, act_order=act_order)
    want = _gptq_columnwise(W, H, bits, group_size, block_size=block_size, act_order=act_order)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bitwise, signs of zeros included


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rows_are_independent(act_order):
    """Stacking the rows of linears that share H (q/k/v) and solving once = solving each."""
    x = _correlated_x(512, 160, seed=33)
    H = x.T @ x
    Ws = [torch.randn(o, 160, generator=_gen(34 + o)) for o in (24, 8, 40)]
    stacked = gptq_quantize(torch.cat(Ws), H, 3, 64, act_order=act_order)
    for part, W in zip(stacked.split([w.shape[0] for w in Ws]), Ws):
        assert torch.equal(part, gptq_quantize(W, H, 3, 64, act_order=act_order))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_static_groups(act_order):
    W = torch.randn(32, 200, generator=_gen(35))
    # H = I: nothing to compensate, so static groups (grids from the original weights, original column
    # groups even under act_order) give RTN exactly
    got = gptq_quantize(W, torch.eye(200), 3, 64, block_size=48, act_order=act_order, static_groups=True)
    torch.testing.assert_close(got, rtn_quantize(W, 3, 64), rtol=0, atol=1e-6)
    # with a real H every quantized value still lies on the RTN grid of its original group
    x = _correlated_x(512, 200, seed=36)
    got = gptq_quantize(W, x.T @ x, 3, 64, act_order=act_order, static_groups=True)
    from cmpq.baselines.rtn import group_params

    scale, zero = group_params(W, 3, 64)
    gid = torch.arange(200) // 64
    codes = got / scale[:, gid] + zero[:, gid]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 7 + 1e-3
    assert _out_err(x, W, got) < _out_err(x, W, rtn_quantize(W, 3, 64))


def test_hessian_half_matmul_falls_back(monkeypatch):
    """The CUDA half-input path (mm with float32 output) is taken only on CUDA; where it is missing,
    the accumulator falls back to the float32 product and remembers it."""
    x = torch.randn(64, 16, generator=_gen(37)).half()
    acc = HessianAccumulator(16)
    acc.add(x)  # CPU: float32 path
    torch.testing.assert_close(acc.sum, x.float().T @ x.float())
    calls = []

    def no_mm(*a, **k):
        calls.append(k)
        raise RuntimeError("no mm.dtype here")

    acc2 = HessianAccumulator(16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch, "mm", no_mm)
    acc2.add(x)
    acc2.add(x)
    assert len(calls) == 1 and calls[0] == {"out_dtype": torch.float32} and not acc2.half_matmul
    torch.testing.assert_close(acc2.sum, 2 * (x.float().T @ x.float()))


def test_hessian_first_token_weight():
    x = torch.randn(3, 10, 8, generator=_gen(38))
    acc = HessianAccumulator(8, first_token_weight=5.0)
    acc.add(x)
    flat = x.reshape(-1, 8)
    want = flat.T @ flat + 4 * x[:, 0].T @ x[:, 0]
    torch.testing.assert_close(acc.sum, want)
    assert acc.count == 30
    acc2 = HessianAccumulator(8, first_token_weight=5.0)
    acc2.add(flat)  # 2-D input: no sequence axis, no first token
    torch.testing.assert_close(acc2.sum, flat.T @ flat)


def test_gptq_with_token_weighting_runs_and_differs(tiny_llama, calib_ids):
    """GPTQ gets CMPQ's gradient token weighting as an option (the fairness row of issue 10)."""
    import copy

    from cmpq.baselines.runners import quantize_baseline

    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = quantize_baseline(a, None, "gptq", 3, 32, calib=calib_ids, device="cpu", log=None)
    rb = quantize_baseline(b, None, "gptq", 3, 32, calib=calib_ids, device="cpu", log=None, token_weighting="gradient")
    assert rb["token_weighting"] == "gradient" and ra["effective_bits"] == rb["effective_bits"]
    wa = a.model.layers[1].mlp.down_proj.weight
    wb = b.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(wa, wb)
    with pytest.raises(ValueError, match="token_weighting"):
        quantize_baseline(copy.deepcopy(tiny_llama), None, "gptq", 3, 32, calib=calib_ids, device="cpu", log=None,
                          token_weighting="fisher")
