"""Vectorized 1-D k-means, one codebook per row, all rows of a batch at once.

In one dimension the clusters of Lloyd's algorithm are contiguous runs of the sorted values,
bounded by the midpoints between neighbouring centroids. So after one sort per row, each
iteration is a ``searchsorted`` of ``K-1`` midpoints plus gathers from prefix sums: O(K log N)
per row instead of O(K N), and no Python loop over rows. Masked values (weight outliers that
will be stored exactly) are pushed to ``+inf`` so they sort last and never pull a centroid.

Initialisation is deterministic: two starts (mid-quantiles, and their average with evenly spaced
levels), the better kept per row; on Gaussian and Laplacian rows of 576 to 1,536 values with K=16
this lowers the error of the fixed point from 12-90% above the exact optimum to 3-20% (measured
against an exact dynamic program). A cluster that runs empty is re-seeded at the value farthest
from its centroid, which is always the first or last value of some cluster's run, so this too
needs only gathers; with it, data holding K distinct values is recovered exactly.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from cmpq.kernels.dispatch import triton_available

CHUNK_ELEMENTS = 1 << 25  # rows are processed in chunks of about this many values to bound memory


def mean_one_weights(raw: torch.Tensor, n: int, device: torch.device, name: str = "weight") -> torch.Tensor:
    """k-means weights ``[n]`` (float32, mean 1, none zero) from raw non-negative ones, e.g. a layer's
    per-output-row gradient energy: the scale is irrelevant to a fit, and mean 1 keeps weighted
    distortions in the units of unweighted ones."""
    if raw.shape != (n,) or not torch.isfinite(raw).all() or (raw < 0).any():
        raise ValueError(f"{name}: row weights must be {n} finite non-negative values")
    w = raw.to(device=device, dtype=torch.float32)
    return w / w.mean().clamp(min=1e-30) + 1e-6


def stacked_row_weights(parts: list[tuple[int, torch.Tensor | None]], n: int,
                        device: torch.device) -> torch.Tensor | None:
    """k-means weights ``[sum of rows, n]`` for the rows of several layers stacked into one
    ``kmeans_1d`` call: ``parts`` holds each layer's (rows, ``[n]`` weights or None). None becomes
    ones, which weigh exactly as no weights do; None if no layer has weights."""
    if all(w is None for _, w in parts):
        return None
    return torch.cat([(w if w is not None else torch.ones(n, device=device)).expand(rows, -1) for rows, w in parts])


def kmeans_1d(
    x: torch.Tensor, k: int, keep: torch.Tensor | None = None, max_iter: int = 100,
    init: torch.Tensor | None = None, weight: torch.Tensor | None = None, swaps: int = 0,
    ks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centroids ``[rows, k]`` (float32, ascending) of each row of ``x`` ``[rows, n]``.

    ``keep`` (bool, same shape) marks the values that take part; the others are ignored.
    ``weight`` (``[n]``, shared by the rows, or ``[rows, n]``; positive) makes it weighted k-means:
    each value pulls its centroid in proportion to its weight (weighted prefix sums, same cost).
    Rows with fewer distinct kept values than ``k`` get repeated centroids; rows with none get zeros.
    ``init`` (``[rows, k]``) replaces the two default starts by one warm start: CMPQ's second pass
    starts from the first pass's codebooks, since removing 0.05% of the values moves them little.
    A ``+inf`` in ``init`` is an absent centroid (it stays ``+inf`` and is never re-seeded), so rows
    with smaller codebooks share one run with larger ones: each row's run is the one it would have
    alone, and one run costs the kernel launches of one.
    ``ks`` (``[rows]``, each in ``1..k``) does the same for cold starts: row ``i`` gets ``ks[i]``
    centroids and ``+inf`` in the other slots, exactly what a call with ``k = ks[i]`` gives it, so
    the widths of a layer share one run (starts and moves included).
    ``swaps`` rounds of merge-and-split moves (``_swap_starts``) follow the cold start: Lloyd stops at
    the first fixed point, which at 16 entries is often a poor one (on SmolLM2-135M columns its
    squared error was 1.089x the global optimum's at k=16, 1.016x at k=8; after 9 rounds, 1.016x
    at k=16, and 1.013x after 15 moves batched three at a time: ``studies/kmeans_gap.py``). Each
    move is a warm-started Lloyd run per row, kept only where it lowers the error, so the result is
    never worse than Lloyd's; ``SWAP_BATCH`` moves from the same fixed point run side by side, so 15
    moves cost five Lloyd runs' kernel launches.
    """
    if init is not None and init.shape != (x.shape[0], k):
        raise ValueError(f"init must have shape {(x.shape[0], k)}, got {tuple(init.shape)}")
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects [rows, n], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, n = x.shape
    if ks is not None:
        if init is not None:
            raise ValueError("ks is for cold starts; a warm start marks absent centroids with +inf")
        if ks.shape != (rows,) or (rows and (int(ks.min()) < 1 or int(ks.max()) > k)):
            raise ValueError(f"ks must hold {rows} codebook sizes in 1..{k}")
        ks = ks.to(x.device).long()
    if weight is not None:
        if weight.shape == (n,):
            weight = weight.expand(rows, n)
        if weight.shape != x.shape:
            raise ValueError(f"weight must have shape ({n},) or {tuple(x.shape)}, got {tuple(weight.shape)}")
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    out = [
        _kmeans_chunk(x[i : i + step], k, None if keep is None else keep[i : i + step], max_iter,
                      None if init is None else init[i : i + step], None if weight is None else weight[i : i + step],
                      swaps, None if ks is None else ks[i : i + step])
        for i in range(0, rows, step)
    ]
    return torch.cat(out) if out else x.new_zeros(0, k, dtype=torch.float32)


def share_runs(device: torch.device) -> bool:
    """Whether the widths of a layer should share one k-means run (``ks``) on ``device``. The result
    is the same either way; the cost is not. On a GPU the runs are launch-bound and sharing cuts the
    ATen calls (one SmolLM2 ``down_proj``, CPU-counted 2026-12-06: allocation 22,670 -> 8,130). On a
    CPU the work binds, and sharing pads every row to the widest codebook: a SmolLM2-shaped block
    took 5.8 -> 6.6 s (allocation) and 5.1 -> 6.9 s (compensated pass) on 2 cores, so it stays off."""
    return torch.device(device).type == "cuda"


def _kmeans_chunk(x: torch.Tensor, k: int, keep: torch.Tensor | None, max_iter: int,
                  init: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                  swaps: int = 0, ks: torch.Tensor | None = None) -> torch.Tensor:
    rows, n = x.shape
    dev = x.device
    if n == 0:
        return torch.zeros(rows, k, dtype=torch.float32, device=dev)
    x = x.float()
    if keep is None:
        keep = torch.ones_like(x, dtype=torch.bool)
    xs, order = torch.sort(torch.where(keep, x, torch.inf), dim=1)
    nvalid = keep.sum(dim=1)  # [rows]
    valid = torch.arange(n, device=dev) < nvalid[:, None]
    xz = torch.where(valid, xs, 0.0).double()
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=dev)
    if weight is None:
        wz = valid.double()
    else:
        wz = torch.where(valid, weight.to(dev).double().gather(1, order), 0.0)
    csum = torch.cat([zero, (wz * xz).cumsum(dim=1)], dim=1)  # prefix sums of (weighted) kept values
    cw = torch.cat([zero, wz.cumsum(dim=1)], dim=1)  # and of their weights (counts when unweighted)
    if k == 1:
        return (csum[:, -1:] / cw[:, -1:].clamp(min=1e-300)).float()
    kr = torch.full((rows,), k, dtype=torch.long, device=dev) if ks is None else ks
    real = torch.arange(k, device=dev)[None, :] < kr[:, None]  # slots past a row's codebook are +inf
    if init is not None:
        return _run_lloyd(xs, csum, cw, nvalid, torch.sort(init.float(), dim=1).values[:, None], max_iter)[0][:, 0]

    # Finite samples have many Lloyd fixed points; which one we reach depends on the start. Start from
    # the mid-quantiles (equal mass per cluster) and from their average with evenly spaced levels
    # (more centroids in the tails), keep the better result per row. Sorting and prefix sums are shared.
    q = (torch.arange(k, device=dev, dtype=torch.float64)[None, :] + 0.5) / kr[:, None].double()
    pos = (q * nvalid[:, None]).long().clamp(max=n - 1)
    quantiles = torch.where(nvalid[:, None] > 0, xs.gather(1, pos), 0.0)
    lo_v = quantiles.new_zeros(rows).where(nvalid == 0, xs[:, 0])
    hi_v = quantiles.new_zeros(rows).where(nvalid == 0, xs.gather(1, (nvalid - 1).clamp(min=0)[:, None]).squeeze(1))
    even = lo_v[:, None] + (hi_v - lo_v)[:, None] * q.float()
    starts = torch.stack([quantiles, 0.5 * (quantiles + even)], dim=1)
    cent, sse = _run_lloyd(xs, csum, cw, nvalid, torch.where(real[:, None], starts, torch.inf), max_iter)
    best, best_sse = _best_start(cent, sse)
    if k >= 3 and swaps > 0:
        c2 = torch.cat([zero, (wz * xz * xz).cumsum(dim=1)], dim=1)
        for r0 in range(0, swaps, SWAP_BATCH):
            starts = _swap_starts(best, xs, csum, cw, c2, nvalid, range(r0, min(r0 + SWAP_BATCH, swaps)), kr)
            cent, sse = _best_start(*_run_lloyd(xs, csum, cw, nvalid, starts, max_iter))
            better = sse < best_sse
            best = torch.where(better[:, None], cent, best)
            best_sse = torch.where(better, sse, best_sse)
    return best


SWAP_BATCH = 3  # merge-and-split moves tried side by side from the same fixed point (one Lloyd run)


def _best_start(cent: torch.Tensor, sse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest-error start per row: (centroids ``[rows, k]``, SSE ``[rows]``) from ``[rows, S, k]``."""
    best_sse, j = sse.min(dim=1)
    return cent.gather(1, j[:, None, None].expand(-1, 1, cent.shape[2])).squeeze(1), best_sse


def _swap_starts(cent: torch.Tensor, xs: torch.Tensor, csum: torch.Tensor, cw: torch.Tensor, c2: torch.Tensor,
                 nvalid: torch.Tensor, moves: Sequence[int], kr: torch.Tensor) -> torch.Tensor:
    """New starts ``[rows, len(moves), k]``, each one move away from ``cent`` (a Lloyd fixed point):
    two neighbouring clusters merge into one centroid and the freed centroid splits a high-error
    cluster in two (at its quartiles). Move ``r`` tries the ``r // 3``-th cheapest merge with the
    ``r % 3``-th largest cluster, so successive moves differ; all rows move at once. ``kr``
    ``[rows]``: each row's codebook size (its other slots are +inf and take no part); rows of fewer
    than 3 entries keep ``cent``. Stable sorts, so a row's move does not depend on how many pad slots
    it has. The moves share every step that does not depend on ``r`` (the runs, their costs, the
    merge order) and take the rest side by side: on a GPU these calls are launches, and one move at
    a time cost three times as many (the k-means around Lloyd's loop is what the compensated pass
    and the allocation launch most, docs/results.md)."""
    rows, k = cent.shape
    n, S = xs.shape[1], len(moves)
    dev = xs.device
    slot = torch.arange(k, device=dev)[None, :]
    mids = (cent[:, 1:] + cent[:, :-1]) * 0.5
    bnd = torch.searchsorted(xs, mids.contiguous(), right=True).clamp(max=nvalid[:, None])
    lo = torch.cat([torch.zeros(rows, 1, dtype=torch.long, device=dev), bnd], dim=1)
    hi = torch.cat([bnd, nvalid[:, None]], dim=1)

    def cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # weighted SSE of the sorted run a..b-1
        s = csum.gather(1, b) - csum.gather(1, a)
        return (c2.gather(1, b) - c2.gather(1, a)) - s * s / (cw.gather(1, b) - cw.gather(1, a)).clamp(min=1e-300)

    r = torch.tensor(list(moves), dtype=torch.long, device=dev)[None, :]  # [1, S]
    own = cost(lo, hi)
    merge = cost(lo[:, :-1], hi[:, 1:]) - own[:, :-1] - own[:, 1:]
    merge = merge.masked_fill(slot[:, 1:] >= kr[:, None], torch.inf)  # no merges with a pad slot
    pick = (r // 3) % (kr - 1).clamp(min=1)[:, None]  # [rows, S]
    m = merge.argsort(dim=1, stable=True).gather(1, pick)  # move s merges clusters m[:, s] and m[:, s] + 1
    pair = torch.zeros(rows, S, k, dtype=torch.bool, device=dev)
    pair.scatter_(2, m[..., None], True).scatter_(2, m[..., None] + 1, True)
    # split a real cluster outside the pair (pads rank below real clusters, the pair below pads, so a
    # row too small to move still finds three distinct slots and keeps its shape)
    rank = own.masked_fill(slot >= kr[:, None], -1.0)[:, None, :].expand(rows, S, k).masked_fill(pair, -2.0)
    which = torch.minimum(r % 3, (kr - 3).clamp(min=0)[:, None])  # [rows, S]
    split = rank.argsort(dim=2, descending=True, stable=True).gather(2, which[..., None]).squeeze(2)  # [rows, S]
    a, b = lo.gather(1, m), hi.gather(1, m + 1)
    merged = ((csum.gather(1, b) - csum.gather(1, a)) / (cw.gather(1, b) - cw.gather(1, a)).clamp(min=1e-300)).float()
    merged = torch.where(b > a, merged, cent.gather(1, m))
    sa, sb = lo.gather(1, split), hi.gather(1, split)
    q1 = xs.gather(1, (sa + (sb - sa) // 4).clamp(max=n - 1))
    q3 = xs.gather(1, (sa + 3 * (sb - sa) // 4).clamp(max=n - 1))
    gone = pair.scatter(2, split[..., None], True)
    rest = cent[:, None, :].expand(rows, S, k)[~gone].view(rows, S, k - 3)  # the other centroids, pads among them
    moved = torch.stack([merged, q1, q3], dim=2)
    moved = torch.where(torch.isfinite(moved), moved, cent.gather(1, split)[..., None].expand_as(moved))
    new = torch.sort(torch.cat([rest, moved], dim=2), dim=2).values
    return torch.where((kr >= 3)[:, None, None], new, cent[:, None, :])


CHECK_EVERY = 4  # Lloyd iterations between convergence checks (each check is a host sync)
# The Lloyd loop in one Triton launch (``cmpq.kernels.lloyd``: the same centroids, per-row early stop).
# "cuda": for CUDA tensors (default); "always": also CPU tensors under TRITON_INTERPRET=1 (how the
# tests check it without a GPU); "off": the PyTorch loop everywhere. Measured on 2026-12-07 (H100,
# studies/results/groups-7b-{torch,fused}-h100.json): one 7B-shaped block's compensated pass and
# allocation 3.55 -> 1.71 s; the 7B default 242.6 -> 215.6 s (docs/results.md).
FUSED_LLOYD = "cuda"


def _run_lloyd(xs: torch.Tensor, csum: torch.Tensor, cw: torch.Tensor, nvalid: torch.Tensor, cent: torch.Tensor,
               max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lloyd``, or the fused loop where ``FUSED_LLOYD`` allows it and Triton can run it."""
    if FUSED_LLOYD not in ("cuda", "always", "off"):
        raise ValueError(f"kmeans.FUSED_LLOYD must be 'cuda', 'always' or 'off', got {FUSED_LLOYD!r}")
    use = xs.is_cuda if FUSED_LLOYD == "cuda" else (
        FUSED_LLOYD == "always" and (xs.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))
    if use and triton_available():
        return _fused_lloyd(xs, csum, cw, nvalid, cent, max_iter)
    return _lloyd(xs, csum, cw, nvalid, cent, max_iter)


def _fused_lloyd(xs, csum, cw, nvalid, cent, max_iter):
    from cmpq.kernels.lloyd import lloyd

    return lloyd(xs, csum, cw, nvalid, cent, max_iter, CHECK_EVERY)


def _lloyd(xs: torch.Tensor, csum: torch.Tensor, cw: torch.Tensor, nvalid: torch.Tensor, cent: torch.Tensor,
           max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on sorted rows from ``S`` starts per row at once (``cent`` ``[rows, S, k]``,
    ascending); returns (centroids ``[rows, S, k]``, within-cluster (weighted) SSE minus a row constant
    ``[rows, S]``). ``csum``/``cw``: prefix sums of the weighted values and of the weights.

    The starts share one ``searchsorted`` and one set of gathers per iteration (their boundaries are
    concatenated), so S starts cost the kernel launches of one: on a GPU this loop is launch-bound.
    Means of contiguous runs stay in order, so centroids are re-sorted only after a re-seed, and
    re-seeding (the only step that needs more than a gather per cluster) runs at the convergence checks.
    """
    rows, n = xs.shape
    S, k = cent.shape[1], cent.shape[2]
    nv = nvalid[:, None, None]
    zeros = torch.zeros(rows, S, 1, dtype=torch.long, device=xs.device)

    def runs(c: torch.Tensor) -> tuple[torch.Tensor, ...]:  # boundaries, run starts/ends, sums, weights
        mids = ((c[..., 1:] + c[..., :-1]) * 0.5).reshape(rows, S * (k - 1))
        bnd = torch.searchsorted(xs, mids, right=True).view(rows, S, k - 1).clamp(max=nv)
        lo = torch.cat([zeros, bnd], dim=2).view(rows, S * k)
        hi = torch.cat([bnd, nv.expand(rows, S, 1)], dim=2).view(rows, S * k)
        sums = csum.gather(1, hi) - csum.gather(1, lo)
        wts = cw.gather(1, hi) - cw.gather(1, lo)
        return bnd, lo, hi, sums.view(rows, S, k), wts.view(rows, S, k)

    prev = None
    for it in range(max_iter):
        bnd, lo, hi, sums, wts = runs(cent)
        filled = wts > 0
        new = torch.where(filled, (sums / wts.clamp(min=1e-300)).float(), cent)
        if it % CHECK_EVERY != CHECK_EVERY - 1 and it != max_iter - 1:
            cent, prev = new, bnd
            continue
        # Re-seed one empty cluster per (row, start) at the kept value farthest from its centroid:
        # the first or last value of some cluster's run.
        first = xs.gather(1, lo.clamp(max=n - 1)).view(rows, S, k)
        last = xs.gather(1, (hi - 1).clamp(min=0)).view(rows, S, k)
        d_first, d_last = (first - new).abs(), (last - new).abs()
        d = torch.where(filled, torch.maximum(d_first, d_last), -1.0)
        far_d, far_j = d.max(dim=2, keepdim=True)
        far = torch.where(d_first.gather(2, far_j) >= d_last.gather(2, far_j), first.gather(2, far_j),
                          last.gather(2, far_j))
        empty = ~filled & (nv > 0) & torch.isfinite(new)  # +inf: an absent centroid (see kmeans_1d)
        reseed = empty.any(dim=2, keepdim=True) & (far_d > 0)
        slot = empty.float().argmax(dim=2, keepdim=True)  # first empty cluster
        new = torch.sort(torch.where(reseed, new.scatter(2, slot, far), new), dim=2).values
        done = prev is not None and bool(((bnd == prev).all() & ~reseed.any()).item())
        cent, prev = new, bnd
        if done:
            break
    # SSE = sum x^2 - sum_j S_j^2 / n_j; the first term is the same for every start, so drop it.
    *_, sums, wts = runs(cent)
    return cent.float(), -(sums**2 / wts.clamp(min=1e-300)).sum(dim=2)


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index ``[rows, n]`` of the nearest centroid (centroids ascending per row)."""
    k = centroids.shape[1]
    if k == 1:
        return torch.zeros_like(x, dtype=torch.long)
    c = centroids.float()
    mids = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
    return torch.searchsorted(mids, x.float().contiguous(), right=True).clamp(max=k - 1)


def uniform_codebook(x: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row min-max uniform levels ``[rows, k]`` (the paper's Appendix A.2 RTN variant)."""
    x = x.float()
    if keep is None:
        keep = torch.ones_like(x, dtype=torch.bool)
    lo = torch.where(keep, x, torch.inf).amin(dim=1)
    hi = torch.where(keep, x, -torch.inf).amax(dim=1)
    none = ~keep.any(dim=1)
    lo, hi = torch.where(none, 0.0, lo), torch.where(none, 0.0, hi)
    t = torch.linspace(0, 1, k, device=x.device)
    return lo[:, None] + (hi - lo)[:, None] * t[None, :]


def kmeans_1d_exact(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Globally optimal 1-D k-means of one vector ``x`` ``[n]``: (centroids ``[k]`` ascending, SSE).

    Dynamic programming over the sorted values (optimal clusters are contiguous runs): ``D[c][i]``,
    the least SSE of the first ``i`` values in ``c`` clusters, is ``min_j D[c-1][j] + SSE(j, i)``, with
    ``SSE`` of a run from prefix sums. O(k n^2) time and O(n^2) memory in float64, vectorized per
    cluster count: an oracle for tests and studies (Wu 1991; Ckmeans.1d.dp is the O(k n) form with
    monotone split points), not the production path, which is Lloyd's iteration in ``kmeans_1d``.
    """
    xs = torch.sort(x.detach().double().reshape(-1)).values
    n = xs.numel()
    if n == 0 or k < 1:
        raise ValueError(f"need values and k >= 1, got n={n}, k={k}")
    k_eff = min(k, n)
    s1 = torch.cat([xs.new_zeros(1), xs.cumsum(0)])
    s2 = torch.cat([xs.new_zeros(1), (xs * xs).cumsum(0)])
    j = torch.arange(n + 1, dtype=torch.float64)
    cnt = (j[None, :] - j[:, None]).clamp(min=1)  # [j, i]: values j..i-1
    sum1 = s1[None, :] - s1[:, None]
    cost = (s2[None, :] - s2[:, None]) - sum1 * sum1 / cnt
    cost = torch.where(j[None, :] > j[:, None], cost.clamp(min=0), torch.inf)
    D = cost[0].clone()  # one cluster: values 0..i-1
    arg = []
    for _ in range(1, k_eff):
        tot = D[:, None] + cost
        D, a = tot.min(dim=0)
        arg.append(a)
    # walk back the split points
    bounds, i = [n], n
    for a in reversed(arg):
        i = int(a[i])
        bounds.append(i)
    bounds.append(0)
    bounds = bounds[::-1]
    cent = torch.stack([xs[lo:hi].mean() for lo, hi in zip(bounds[:-1], bounds[1:])])
    if k_eff < k:  # fewer distinct slots than k: repeat the last centroid, as kmeans_1d does
        cent = torch.cat([cent, cent[-1:].expand(k - k_eff)])
    return cent.float(), float(D[n])
