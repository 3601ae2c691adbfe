import numpy as np
import pytest
import torch

from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d, uniform_codebook


def sse(x, c):
    return ((x - c.gather(1, assign_nearest(x, c))) ** 2).sum(dim=1)


def optimal_sse(row, k):
    """Exact 1-D k-means: dynamic programming over all splits of the sorted values into k runs."""
    v = np.sort(row.numpy().astype(np.float64))
    n = len(v)
    p1, p2 = np.concatenate([[0], np.cumsum(v)]), np.concatenate([[0], np.cumsum(v * v)])
    m, i = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    cost = p2[i] - p2[m] - (p1[i] - p1[m]) ** 2 / np.maximum(i - m, 1)  # SSE of v[m:i]
    cost = np.where(i > m, cost, np.inf)
    best = cost[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[n])


def lloyd_reference(row, k, iters=200):
    """Plain per-row Lloyd with the same mid-quantile start, written with loops."""
    v = sorted(row.tolist())
    n = len(v)
    c = [v[min(int((j + 0.5) / k * n), n - 1)] for j in range(k)]
    for _ in range(iters):
        groups = [[] for _ in range(k)]
        for s in v:
            j = min(range(k), key=lambda j: (abs(s - c[j]), j))
            groups[j].append(s)
        new = sorted(sum(g) / len(g) if g else c[j] for j, g in enumerate(groups))
        if new == c:
            break
        c = new
    return torch.tensor(c)


def test_matches_loop_reference_on_small_inputs():
    x = torch.randn(40, 9, generator=torch.Generator().manual_seed(0))
    for k in (2, 3, 4):
        got = kmeans_1d(x, k)
        ref = torch.stack([lloyd_reference(x[r], k) for r in range(x.shape[0])])
        # the quantile start is one of ours; we keep the better of two starts, never worse
        assert (sse(x, got) <= sse(x, ref) * (1 + 1e-4) + 1e-6).all()
        assert torch.isclose(sse(x, got), sse(x, ref), rtol=1e-4, atol=1e-6).float().mean() > 0.5


def test_near_the_global_optimum():
    """Lloyd finds a local optimum; from mid-quantile starts it is within a few percent of the exact one on average."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(8, 400, generator=g), torch.randn(8, 400, generator=g).sign() * torch.rand(8, 400, generator=g).log()])
    for k, mean_gap in ((4, 1.03), (8, 1.06), (16, 1.25)):  # more clusters per value: more fixed points
        ratio = sse(x, kmeans_1d(x, k)) / torch.tensor([optimal_sse(r, k) for r in x])
        assert ratio.min() >= 1 - 1e-4  # never better than optimal: the reference is right
        assert ratio.mean() < mean_gap, (k, ratio)


def test_optimal_on_data_with_k_distinct_values():
    g = torch.Generator().manual_seed(1)
    for k in (4, 8, 16):
        levels = torch.randn(32, k, generator=g)
        # very unequal counts: most values on one level, so mid-quantile starts collide
        pick = torch.where(torch.rand(32, 300, generator=g) < 0.9, 0, torch.randint(0, k, (32, 300), generator=g))
        pick[:, :k] = torch.arange(k)  # every level present
        x = levels.gather(1, pick)
        c = kmeans_1d(x, k)
        assert torch.allclose(sse(x, c), torch.zeros(32), atol=1e-8)


def test_error_decreases_as_k_grows():
    x = torch.randn(64, 500, generator=torch.Generator().manual_seed(2))
    errs = [sse(x, kmeans_1d(x, k)) for k in (2, 4, 8, 16)]
    for a, b in zip(errs, errs[1:]):
        assert (b <= a + 1e-6).all()


def test_degenerate_rows():
    x = torch.zeros(5, 50)
    x[1] = 3.0  # constant
    x[2, :3] = torch.tensor([1.0, 2.0, 2.0])  # fewer distinct values than k
    x[3] = torch.linspace(-1, 1, 50)
    c = kmeans_1d(x, 8)
    assert torch.isfinite(c).all() and (c[:, 1:] >= c[:, :-1]).all()
    assert torch.allclose(sse(x, c)[:3], torch.zeros(3))
    assert torch.equal(kmeans_1d(torch.zeros(3, 0), 4), torch.zeros(3, 4))


def test_masked_values_do_not_pull_centroids():
    x = torch.randn(8, 200, generator=torch.Generator().manual_seed(3))
    x[:, 0] = 1000.0
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[:, 0] = False
    c = kmeans_1d(x, 4, keep)
    assert c.max() < 10
    assert torch.allclose(c, kmeans_1d(x[:, 1:], 4))
    none = kmeans_1d(x, 4, torch.zeros_like(keep))
    assert torch.equal(none, torch.zeros(8, 4))


def test_uniform_codebook_is_min_max_grid():
    x = torch.tensor([[0.0, 1.0, 3.0], [-1.0, -1.0, -1.0]])
    cb = uniform_codebook(x, 4)
    assert torch.allclose(cb[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.allclose(cb[1], torch.full((4,), -1.0))


def test_bad_shapes():
    with pytest.raises(ValueError):
        kmeans_1d(torch.zeros(3), 4)


def test_warm_start_reaches_a_lloyd_fixed_point_near_its_start():
    from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 700, generator=g)
    keep = torch.rand(64, 700, generator=g) > 0.01
    cold = kmeans_1d(x, 8)
    warm = kmeans_1d(x, 8, keep=keep, init=cold)
    # fixed point: every centroid is the mean of the kept values assigned to it
    idx = assign_nearest(x, warm)
    for r in range(0, 64, 9):
        for j in range(8):
            sel = (idx[r] == j) & keep[r]
            if sel.any():
                assert torch.allclose(warm[r, j], x[r][sel].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans_1d(x, 8, init=cold[:, :4])


def test_exact_kmeans_matches_brute_force_and_bounds_lloyd():
    """The DP oracle equals brute force over every contiguous partition; Lloyd's result is never
    better than it (on real columns it is 0-12% above at k = 4..16: studies/kmeans_gap.py)."""
    import itertools

    from cmpq.algorithm.kmeans import kmeans_1d, kmeans_1d_exact

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = 9, 1 + trial % 4
        x = torch.randn(n, generator=g, dtype=torch.float64) * (1 + trial)
        xs = torch.sort(x).values
        best = float("inf")
        for cuts in itertools.combinations(range(1, n), k - 1):
            b = (0, *cuts, n)
            best = min(best, sum(float(((xs[lo:hi] - xs[lo:hi].mean()) ** 2).sum()) for lo, hi in zip(b[:-1], b[1:])))
        cent, sse = kmeans_1d_exact(x, k)
        assert sse == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert (cent[1:] >= cent[:-1]).all()
    x = torch.randn(8, 300, generator=g) * (0.5 + torch.rand(8, 300, generator=g))  # a scale mixture: heavier tails
    for k in (4, 8, 16):
        lloyd = kmeans_1d(x, k)
        for r in range(x.shape[0]):
            _, opt = kmeans_1d_exact(x[r], k)
            got = float(((x[r, :, None] - lloyd[r, None, :]) ** 2).min(dim=1).values.double().sum())
            assert opt <= got * (1 + 1e-6)
            assert got <= opt * 1.5, (k, r, got, opt)  # a loose regression bound: see studies/kmeans_gap.py


def test_weighted_kmeans_equals_repeated_values():
    """Integer weights mean repeated values: weighted k-means on x with weight m must give the
    centroids of plain k-means on x with each value repeated m times (same warm start)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, generator=g)
    m = torch.randint(1, 5, (40,), generator=g)
    rep = torch.repeat_interleave(x, m, dim=1)
    init = torch.sort(torch.randn(5, 4, generator=g), 1).values
    w = kmeans_1d(x, 4, weight=m.float(), init=init, max_iter=50)
    r = kmeans_1d(rep, 4, init=init, max_iter=50)
    torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kmeans_1d(x, 4, weight=m.float()), kmeans_1d(x, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        kmeans_1d(x, 4, weight=torch.ones(3))


def _sse(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    err = (x[:, :, None] - c[:, None, :]).pow(2).min(dim=2).values.double()
    return (err if w is None else err * w.double()).sum(dim=1)


def test_swaps_never_worse_and_closer_to_the_optimum():
    """Merge-and-split rounds keep a row's result only where it lowers the error, so no row gets
    worse than Lloyd's; on heavy-tailed columns (Student-t, 3 degrees of freedom: many Lloyd fixed
    points at 16 entries) they must close most of the gap to the exact DP optimum."""
    from cmpq.algorithm.kmeans import kmeans_1d_exact

    torch.manual_seed(0)
    x = torch.distributions.StudentT(torch.tensor(3.0)).sample((24, 300)).float()
    plain, swapped = kmeans_1d(x, 16), kmeans_1d(x, 16, swaps=9)
    assert (_sse(x, swapped) <= _sse(x, plain) * (1 + 1e-6)).all()
    opt = torch.tensor([kmeans_1d_exact(r, 16)[1] for r in x], dtype=torch.float64)
    gap_plain = (_sse(x, plain) / opt).mean() - 1
    gap_swapped = (_sse(x, swapped) / opt).mean() - 1
    assert gap_plain > 0.01, "the data should leave Lloyd a gap to close"
    assert gap_swapped < 0.5 * gap_plain, (gap_plain, gap_swapped)


def test_starts_run_side_by_side_as_they_would_alone():
    """``_lloyd`` runs S starts per row in one pass (shared searchsorted and gathers); each start's
    result must be the one it reaches alone, re-seeds of empty clusters included."""
    from cmpq.algorithm import kmeans as km

    torch.manual_seed(3)
    x = torch.cat([torch.randn(6, 90), torch.randint(0, 3, (2, 90)).float()])  # 3 distinct values: re-seeds
    xs = torch.sort(x, dim=1).values.double()
    zero = torch.zeros(8, 1, dtype=torch.float64)
    csum, cw = torch.cat([zero, xs.cumsum(1)], 1), torch.cat([zero, torch.ones_like(xs).cumsum(1)], 1)
    nvalid = torch.full((8,), 90)
    starts = torch.sort(torch.randn(8, 3, 8), dim=2).values
    cent, sse = km._lloyd(xs.float(), csum, cw, nvalid, starts, 30)
    for s in range(3):
        c1, e1 = km._lloyd(xs.float(), csum, cw, nvalid, starts[:, s : s + 1], 30)
        assert torch.allclose(cent[:, s], c1[:, 0]) and torch.allclose(sse[:, s], e1[:, 0])


def test_swaps_respect_masks_and_weights():
    torch.manual_seed(1)
    x = torch.randn(8, 200)
    keep = torch.rand(8, 200) > 0.3
    x_far = torch.where(keep, x, torch.full_like(x, 1e4))  # masked values must not pull anything
    w = torch.rand(8, 200) + 0.1
    c = kmeans_1d(x_far, 8, keep, weight=w, swaps=6)
    assert torch.isfinite(c).all() and (c.abs() < 100).all()
    assert (c[:, 1:] >= c[:, :-1]).all()
    base = kmeans_1d(x_far, 8, keep, weight=w)
    wk = torch.where(keep, w, 0.0)
    assert (_sse(x, c, wk) <= _sse(x, base, wk) * (1 + 1e-6)).all()


def test_swaps_on_small_k_and_degenerate_rows():
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    for k in (2, 3, 4, 8):
        c = kmeans_1d(x, k, swaps=5)
        assert c.shape == (2, k) and torch.isfinite(c).all()


def test_inf_in_a_warm_start_is_an_absent_centroid():
    """Rows with smaller codebooks share a run with larger ones (the compensated pass refits every
    width of a lazy block at once): each row's result equals its own run, and pads stay +inf."""
    g = torch.Generator().manual_seed(7)
    x = torch.distributions.StudentT(4.0).sample((12, 300)) * torch.rand(12, 1, generator=g)
    keep = torch.rand(12, 300, generator=g) > 0.02
    ks = [4, 8, 16] * 4
    alone = [kmeans_1d(x[i : i + 1], k, keep[i : i + 1], max_iter=30) for i, k in enumerate(ks)]
    init = torch.full((12, 16), torch.inf)
    for i, (k, c) in enumerate(zip(ks, alone)):
        init[i, :k] = c + 0.01 * c.abs().mean()  # a start near, not at, the fixed point
    together = kmeans_1d(x, 16, keep, max_iter=30, init=init)
    for i, k in enumerate(ks):
        own = kmeans_1d(x[i : i + 1], k, keep[i : i + 1], max_iter=30, init=init[i : i + 1, :k])
        torch.testing.assert_close(together[i, :k], own[0])
        assert torch.isinf(together[i, k:]).all()


def test_rows_with_their_own_codebook_size_match_separate_calls():
    """``ks``: the widths of a layer share one cold-started run, moves included; each row must get
    exactly what a call with its own ``k`` gives, and +inf in the other slots."""
    g = torch.Generator().manual_seed(11)
    x = torch.distributions.StudentT(3.0).sample((30, 257)) * (torch.rand(30, 1, generator=g) + 0.1)
    x[5, :] = 0.25  # a constant row: empty clusters everywhere
    x[6, 100:] = x[6, :157].clone()  # repeated values
    keep = torch.rand(30, 257, generator=g) > 0.03
    w = torch.rand(257, generator=g) + 0.5
    ks = torch.tensor([2, 4, 8, 16, 3, 1] * 5)
    for swaps in (0, 7):
        together = kmeans_1d(x, 16, keep, max_iter=40, weight=w, swaps=swaps, ks=ks)
        for k in ks.unique().tolist():
            r = (ks == k).nonzero().squeeze(1)
            alone = kmeans_1d(x[r], k, keep[r], max_iter=40, weight=w, swaps=swaps)
            assert torch.equal(together[r, :k], alone), (swaps, k)
            assert torch.isinf(together[r, k:]).all()
    with pytest.raises(ValueError, match="ks"):
        kmeans_1d(x, 4, ks=torch.full((30,), 5))


def test_moves_side_by_side_equal_one_at_a_time():
    """``_swap_starts`` builds several moves from one fixed point in the same calls; each is exactly
    the start it builds alone (mixed codebook sizes, ties, a row too small to move)."""
    from cmpq.algorithm import kmeans

    g = torch.Generator().manual_seed(3)
    x = torch.distributions.StudentT(4.0).sample((40, 50))
    x[:5, :20] = x[:5, :1]
    xs, _ = torch.sort(x, dim=1)
    xz = xs.double()
    zero = torch.zeros(40, 1, dtype=torch.float64)
    csum, cw = torch.cat([zero, xz.cumsum(1)], 1), torch.cat([zero, torch.ones_like(xz).cumsum(1)], 1)
    c2 = torch.cat([zero, (xz * xz).cumsum(1)], 1)
    kr = torch.randint(2, 9, (40,), generator=g)
    cent = kmeans_1d(x, 8, ks=kr)
    nvalid = torch.full((40,), 50)
    together = kmeans._swap_starts(cent, xs, csum, cw, c2, nvalid, range(4, 10), kr)
    assert together.shape == (40, 6, 8)
    for s, r in enumerate(range(4, 10)):
        alone = kmeans._swap_starts(cent, xs, csum, cw, c2, nvalid, [r], kr)[:, 0]
        assert torch.equal(together[:, s], alone)
    assert torch.equal(together[kr < 3], cent[kr < 3, None].expand(-1, 6, -1))  # too small to move
    moved = together[kr >= 3]
    assert (moved.diff(dim=2).nan_to_num(0.0) >= 0).all()  # ascending, pads (+inf) last
