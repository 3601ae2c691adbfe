"""The compensated algorithm's parts: the whole-model allocator (cmpq.algorithm.budget) and GPTQ-order
codebook quantization (cmpq.algorithm.compensated)."""

import itertools

import pytest
import torch

from cmpq.algorithm.budget import FP16, BudgetError, LayerOptions, channel_cost_bits, solve, total_cost, total_loss
from cmpq.algorithm.compensated import quantize_compensated
from cmpq.algorithm.distortion import layer_options
from cmpq.nn.linear import CMPQLinear, pack_linear

from tiny_models import one_thread  # noqa: F401


def _random_layers(seed: int, shapes: list[tuple[int, int]]) -> list[LayerOptions]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out_f, n in shapes:
        widths = (2, 3, 4, FP16)
        cost = torch.tensor([channel_cost_bits(b, out_f, n) for b in widths], dtype=torch.float64)
        # loss falls with width, convexly on average, with noise: like k-means distortion
        base = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10
        loss = base * torch.tensor([1.0, 0.3, 0.08, 0.0], dtype=torch.float64) * (
            1 + 0.5 * torch.rand(n, 4, generator=g, dtype=torch.float64))
        loss[:, -1] = 0
        layers.append(LayerOptions(widths, cost, loss, fixed=float(g.seed() % 7)))
    return layers


def _brute_force(layers: list[LayerOptions], budget: float) -> float:
    best = float("inf")
    per_layer = [list(itertools.product(range(len(l.widths)), repeat=l.loss.shape[0])) for l in layers]
    for combo in itertools.product(*per_layer):
        ch = [torch.tensor(c) for c in combo]
        if total_cost(layers, ch) <= budget:
            best = min(best, total_loss(layers, ch))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocator_meets_budget_and_is_near_brute_force(seed):
    layers = _random_layers(seed, [(32, 3), (64, 3)])
    least = total_cost(layers, [torch.zeros(3, dtype=torch.long)] * 2)
    most = total_cost(layers, [torch.full((3,), 3)] * 2)
    g = torch.Generator().manual_seed(100 + seed)
    for frac in torch.rand(4, generator=g).tolist():
        budget = least + frac * (most - least)
        choice = solve(layers, budget)
        assert total_cost(layers, choice) <= budget
        got, opt = total_loss(layers, choice), _brute_force(layers, budget)
        assert got >= opt - 1e-9
        # the Lagrangian bound: within the largest single-channel loss step of the optimum
        step = max(float((l.loss[:, :-1] - l.loss[:, 1:]).max()) for l in layers)
        assert got <= opt + step + 1e-9


def test_allocator_is_exact_on_hull_vertices_and_refuses_impossible_budgets():
    layers = _random_layers(0, [(32, 3), (64, 3)])
    for lam in (0.0, 1e-4, 1e-3, 1e-2, 1.0):  # the relaxation's own solutions are optimal at their cost
        ch = [torch.argmin(l.loss + lam * l.cost, dim=1) for l in layers]
        budget = total_cost(layers, ch)
        assert total_loss(layers, solve(layers, budget)) == pytest.approx(_brute_force(layers, budget))
    least = total_cost(layers, [torch.zeros(3, dtype=torch.long)] * 2)
    with pytest.raises(BudgetError, match="below the smallest"):
        solve(layers, least - 1)


def test_allocator_spends_the_whole_budget_on_a_large_model():
    layers = _random_layers(1, [(576, 576)] * 4 + [(1536, 576), (576, 1536)])
    least = total_cost(layers, [torch.zeros(l.loss.shape[0], dtype=torch.long) for l in layers])
    budget = least * 1.4
    got = total_cost(layers, solve(layers, budget))
    assert budget - channel_cost_bits(FP16, 1536, 576) <= got <= budget


def _correlated_inputs(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    mix = torch.randn(d // 4, d, generator=g)
    x = torch.randn(n, d // 4, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)
    return x * (torch.rand(d, generator=g) * 3 + 0.2)  # uneven channel scales


def test_compensation_lowers_held_out_output_error():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 96, 64
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    calib, held = _correlated_inputs(8192, in_f, g).split(4096)  # one distribution, two samples
    H = calib.T @ calib / calib.shape[0]
    widths = torch.tensor([2, 3] * (in_f // 2))
    err = {}
    for comp in (False, True):
        Q = quantize_compensated(W, H, widths, n_sparse=8, kmeans_iters=30, compensate=comp).dequantize()
        err[comp] = float((held @ (W - Q).T).pow(2).mean())
    assert err[True] < 0.8 * err[False], err


def test_compensated_parts_pack_and_keep_fp16_columns_and_sparse_exact():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 48, generator=g)
    x = _correlated_inputs(1024, 48, g)
    widths = torch.tensor([2, 3, 4, FP16] * 12)
    parts = quantize_compensated(W, x.T @ x, widths, n_sparse=10, kmeans_iters=20)
    assert sorted(parts.groups) == [2, 3, 4]
    assert torch.equal(parts.outlier_channels, (widths == FP16).nonzero().squeeze(1))
    assert parts.sparse_vals.numel() == 10
    for b, (ch, idx, cb) in parts.groups.items():
        assert (cb[:, 1:] >= cb[:, :-1]).all() and int(idx.max()) < 2**b
    layer = pack_linear(parts, None)
    assert isinstance(layer, CMPQLinear)
    torch.testing.assert_close(layer.dequantize(torch.float32), parts.dequantize().half().float())


def test_compensated_refuses_bad_input():
    W = torch.randn(8, 4)
    with pytest.raises(ValueError, match="NaN"):
        quantize_compensated(W.clone().fill_(float("nan")), torch.eye(4), torch.full((4,), 2), 0)
    with pytest.raises(ValueError, match="Hessian has shape"):
        quantize_compensated(W, torch.eye(3), torch.full((4,), 2), 0)
    with pytest.raises(ValueError, match="channel widths"):
        quantize_compensated(W, torch.eye(4), torch.full((3,), 2), 0)


def test_layer_options_loss_falls_with_width():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 32, generator=g)
    opts = layer_options(W, torch.rand(32, generator=g) + 0.1, (2, 3, 4), n_sparse=0, iters=20)
    assert opts.widths == (2, 3, 4, FP16)
    assert (opts.loss[:, :-1] >= opts.loss[:, 1:]).all()
    assert (opts.loss[:, -1] == 0).all()


def test_row_weighting_lowers_the_weighted_output_error():
    """Rows that matter more (``row_weight``) get codebooks fitted to them: the output error weighted
    the same way falls on held-out inputs, and the plain error may rise."""
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 128, 32
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[: out_f // 8] *= 4  # a few large rows, which plain k-means would favour...
    calib, held = _correlated_inputs(8192, in_f, g).split(4096)
    H = calib.T @ calib / calib.shape[0]
    rw = torch.ones(out_f)
    rw[out_f // 8:] = 50.0  # ...but the loss says the small ones matter
    widths = torch.full((in_f,), 2)
    err = {}
    for name, w in (("plain", None), ("weighted", rw)):
        # without error feedback, so the codebooks alone decide (feedback shrinks both errors ~10x here)
        Q = quantize_compensated(W, H, widths, n_sparse=0, kmeans_iters=30, row_weight=w, compensate=False).dequantize()
        err[name] = float(((held @ (W - Q).T).pow(2) * rw).mean())
    assert err["weighted"] < 0.6 * err["plain"], err
    with pytest.raises(ValueError, match="row weights"):
        quantize_compensated(W, H, widths, 0, row_weight=torch.ones(3))


def test_row_scales_lower_the_output_error_of_rows_of_different_size():
    """Rows of very different magnitude share every channel's codebook; scaling rows to one spread
    (``row_scale``) lets the codebook serve them all: lower held-out output error at the same widths,
    with the scales stored in FP16 and the parts equal to ``diag(s) @ (scaled parts)``."""
    g = torch.Generator().manual_seed(5)
    out_f, in_f = 128, 32
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W *= torch.exp(torch.randn(out_f, 1, generator=g))  # log-normal row sizes, as attention heads have
    calib, held = _correlated_inputs(8192, in_f, g).split(4096)
    H = calib.T @ calib / calib.shape[0]
    widths = torch.full((in_f,), 3)
    err, parts = {}, {}
    for on in (False, True):
        parts[on] = quantize_compensated(W, H, widths, n_sparse=4, kmeans_iters=30, row_scale=on)
        err[on] = float((held @ (W - parts[on].dequantize()).T).pow(2).mean())
    assert err[True] < 0.8 * err[False], err
    s = parts[True].row_scale
    assert parts[False].row_scale is None and s.dtype == torch.float16 and (s > 0).all()
    layer = pack_linear(parts[True], None)
    torch.testing.assert_close(layer.dequantize(torch.float32), parts[True].dequantize().half().float(),
                               rtol=2e-3, atol=1e-6)
    assert layer.storage_bytes()["row_scales"] == 2 * out_f


def test_row_scale_cost_is_in_the_layer_options():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 32, generator=g)
    hd = torch.rand(32, generator=g) + 0.1
    plain = layer_options(W, hd, (2, 3), n_sparse=0, iters=10)
    scaled = layer_options(W, hd, (2, 3), n_sparse=0, iters=10, row_scale=True)
    assert scaled.fixed - plain.fixed == 16 * 64
    torch.testing.assert_close(scaled.cost, plain.cost)


def test_allocation_and_quantization_take_their_own_kmeans_moves(tiny_llama, calib_ids, monkeypatch):
    """``alloc_kmeans_swaps`` reaches the allocation's distortion estimates, ``kmeans_swaps`` the
    codebooks that are stored; None makes the allocation follow ``kmeans_swaps``."""
    import cmpq
    from cmpq.algorithm import compensated
    from cmpq.config import CMPQConfig
    from cmpq.model import planning

    seen = {"alloc": set(), "quant": set()}
    real_options, real_quant = planning.layer_options_group, compensated.quantize_compensated_group

    def options(*args, **kw):
        seen["alloc"].add(args[8])
        return real_options(*args, **kw)

    def quant(*args, **kw):
        seen["quant"].add(kw["kmeans_swaps"])
        return real_quant(*args, **kw)

    monkeypatch.setattr(planning, "layer_options_group", options)
    monkeypatch.setattr(compensated, "quantize_compensated_group", quant)
    cfg = CMPQConfig(bits=4.5, kmeans_swaps=3, alloc_kmeans_swaps=0, finetune_epochs=0)
    cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids[:4, :32], device="cpu", log=None)
    assert seen == {"alloc": {0}, "quant": {3}}
    assert CMPQConfig(kmeans_swaps=5).alloc_kmeans_swaps == 5


def test_widths_sharing_one_kmeans_run_change_nothing():
    """On a GPU the widths of a layer share one k-means run (``kmeans.share_runs``); the codebooks
    and distortions must be exactly those of one run per width (the CPU path)."""
    from cmpq.algorithm.compensated import initial_codebooks
    from cmpq.algorithm.distortion import channel_sse

    g = torch.Generator().manual_seed(5)
    W = torch.distributions.StudentT(4.0).sample((48, 90)) * 0.02
    widths = torch.tensor([1, 2, 3, 4, FP16, 3] * 15)
    rw = torch.rand(48, generator=g) + 0.5
    rw = rw / rw.mean()
    a = initial_codebooks(W, widths, 30, rw, swaps=7, shared=True)
    b = initial_codebooks(W, widths, 30, rw, swaps=7, shared=False)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    assert torch.equal(channel_sse(W, [1, 2, 3, 4], 20, rw, 7, shared=True),
                       channel_sse(W, [1, 2, 3, 4], 20, rw, 7, shared=False))
    x = torch.randn(512, 90, generator=g)
    p = [quantize_compensated(W, x.T @ x, widths, 9, 30, row_weight=rw, row_scale=True, kmeans_swaps=7,
                              shared_runs=s) for s in (True, False)]
    assert torch.equal(p[0].dequantize(), p[1].dequantize())


def _parts_equal(a, b) -> bool:
    same = lambda x, y: (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))  # noqa: E731
    return (sorted(a.groups) == sorted(b.groups)
            and all(all(torch.equal(u, v) for u, v in zip(a.groups[k], b.groups[k])) for k in a.groups)
            and all(same(getattr(a, f), getattr(b, f)) for f in
                    ("outlier_channels", "outlier_weight", "sparse_rows", "sparse_cols", "sparse_vals", "row_scale")))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("row_scale", [True, False])
def test_layers_quantized_together_equal_each_alone(shared, row_scale):
    """``quantize_compensated_group`` merges the k-means runs of layers of one shape; every layer's
    parts must be exactly those it gets alone: different widths (and largest widths), row weights,
    Hessians and sparse counts per layer, one layer without row weights."""
    from cmpq.algorithm.compensated import LayerJob, quantize_compensated_group

    g = torch.Generator().manual_seed(11)
    jobs = []
    for j, (mix, n_sparse) in enumerate([([2, 3, 4, FP16, 3], 9), ([1, 2, 2, 3, 2], 0), ([3, 4, FP16, 4, 2], 5)]):
        W = torch.randn(40, 70, generator=g) * (0.02 + 0.01 * j)
        x = torch.randn(300, 70, generator=g) * (torch.rand(70, generator=g) + 0.2)
        rw = None if j == 1 else torch.rand(40, generator=g) + 0.5
        jobs.append(LayerJob(W, x.T @ x, torch.tensor(mix * 14), n_sparse, f"layer {j}", rw))
    kw = dict(kmeans_iters=25, block_size=32, row_scale=row_scale, kmeans_swaps=4, shared_runs=shared)
    together = quantize_compensated_group(jobs, **kw)
    for job, got in zip(jobs, together):
        alone = quantize_compensated(job.weight, job.H, job.widths, job.n_sparse, name=job.name,
                                     row_weight=job.row_weight, **kw)
        assert _parts_equal(got, alone), job.name
    with pytest.raises(ValueError, match="different shapes"):
        quantize_compensated_group([jobs[0], LayerJob(torch.randn(41, 70), jobs[0].H, jobs[0].widths, 0)])


def test_layer_groups_by_shape_under_one_kmeans_chunk(monkeypatch):
    """Same-shape linears are grouped in block order; a group's weights stay within one k-means chunk."""
    from torch import nn

    from cmpq.algorithm import kmeans
    from cmpq.algorithm.compensated import layer_groups

    lins = {"q": nn.Linear(64, 64), "k": nn.Linear(64, 32), "v": nn.Linear(64, 32), "o": nn.Linear(64, 64),
            "gate": nn.Linear(64, 128), "up": nn.Linear(64, 128), "down": nn.Linear(128, 64)}
    assert layer_groups(lins) == [["q", "o"], ["k", "v"], ["gate", "up"], ["down"]]
    monkeypatch.setattr(kmeans, "CHUNK_ELEMENTS", 64 * 128)  # room for one gate/up, two q/o
    assert layer_groups(lins) == [["q", "o"], ["k", "v"], ["gate"], ["up"], ["down"]]
    monkeypatch.setattr(kmeans, "CHUNK_ELEMENTS", 10)  # smaller than any layer: one layer a group
    assert layer_groups(lins) == [[n] for n in lins]


@pytest.mark.parametrize("shared", [True, False])
def test_layer_options_together_equal_each_alone(shared, monkeypatch):
    """The allocation's distortion of same-shape layers in merged k-means runs (``layer_options_group``)
    equals each layer's alone; also when the widths' copies overflow one chunk (one run per width)."""
    from cmpq.algorithm import kmeans
    from cmpq.algorithm.distortion import layer_options_group

    monkeypatch.setattr(kmeans, "share_runs", lambda device: shared)
    g = torch.Generator().manual_seed(12)
    W = [torch.randn(30, 50, generator=g) * (0.02 + 0.01 * j) for j in range(3)]
    hd = [torch.rand(50, generator=g) + 0.1 for _ in W]
    rw = [torch.rand(30, generator=g) + 0.5, None, torch.rand(30, generator=g) + 0.5]
    for chunk in (1 << 25, 30 * 50 * 2):  # all widths in one run; then one run per width
        monkeypatch.setattr(kmeans, "CHUNK_ELEMENTS", chunk)
        together = layer_options_group(W, hd, (2, 3, 4), [5, 0, 9], 15, True, rw, True, 3)
        for j, got in enumerate(together):
            alone = layer_options(W[j], hd[j], (2, 3, 4), [5, 0, 9][j], 15, True, rw[j], True, 3)
            assert got.widths == alone.widths and got.fixed == alone.fixed
            assert torch.equal(got.cost, alone.cost) and torch.equal(got.loss, alone.loss), (chunk, j)


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_walk_and_allocation_change_no_stored_value(tiny_llama, calib_ids, monkeypatch, shared):
    """Quantizing a model with same-shape layers grouped (allocation and walk) stores exactly what
    quantizing them one by one stores: every buffer of every CMPQLinear, bit for bit."""
    import copy

    import cmpq
    from cmpq.algorithm import compensated, kmeans
    from cmpq.config import CMPQConfig
    from cmpq.model import planning

    monkeypatch.setattr(kmeans, "share_runs", lambda device: shared)
    monkeypatch.setattr(compensated, "share_runs", lambda device: shared)
    cfg = CMPQConfig(bits=3.3, finetune_epochs=0)
    grouped = cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids[:4, :32], device="cpu", log=None)
    singles = lambda linears, copies=1: [[n] for n in linears]  # noqa: E731
    monkeypatch.setattr(compensated, "layer_groups", singles)
    monkeypatch.setattr(planning, "layer_groups", singles)
    alone = cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids[:4, :32], device="cpu", log=None)
    a, b = grouped.state_dict(), alone.state_dict()
    assert a.keys() == b.keys() and any("codebook" in k or "idx" in k or "packed" in k for k in a), list(a)[:20]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    shapes = [tuple(m.weight.shape) for m in tiny_llama.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    assert len(set(shapes)) < len(shapes)  # the tiny model has same-shape layers, so groups were formed


def test_codebooks_rounded_together_equal_each_rounded_alone():
    """A group's codebooks go through ``storable`` in one call (``_round_together``): padded to the
    widest by repeating each row's last entry, every row must round exactly as it does alone, for
    rows of any width, empty requests, and rows whose range is tiny next to their values (the ones
    ``storable`` needs more than one round for)."""
    from cmpq.algorithm.compensated import _round_together
    from cmpq.storage.codebook import storable

    g = torch.Generator().manual_seed(5)
    books = [[torch.randn(7, 16, generator=g).sort(1).values, torch.randn(0, 8)],
             [torch.randn(5, 4, generator=g).sort(1).values * 1e-3 + 3.0],
             [torch.randn(9, 8, generator=g).sort(1).values, torch.randn(3, 2, generator=g).sort(1).values + 1e4]]
    got = _round_together(books)
    for layer, rounded in zip(books, got):
        for cb, r in zip(layer, rounded):
            assert r.shape == cb.shape and torch.equal(r, storable(cb))
    assert _round_together([[], []]) == [[], []]  # a lazy block of FP16 columns only: nothing to round
