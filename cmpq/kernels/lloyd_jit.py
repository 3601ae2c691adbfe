"""The Triton kernel behind ``cmpq.kernels.lloyd`` (a module of its own: it imports Triton at import,
and Triton's interpreter resolves the helper ``runs`` from module globals)."""

import triton
import triton.language as tl


@triton.jit
def runs(xs_row, cs_row, cw_row, c, lane, k, n, nv, STEPS: tl.constexpr):
    """Boundaries (``searchsorted(xs, mids, right=True)`` clamped to ``nv``), run starts and ends,
    sums and weights of the clusters of centroids ``c``."""
    cn = tl.where(lane + 1 < k, tl.gather(c, tl.minimum(lane + 1, k - 1), 0), c)
    mid = (c + cn) * 0.5  # lane j: midpoint between j and j + 1 (lanes >= k - 1 unused)
    lo_b = tl.zeros_like(lane)
    hi_b = tl.zeros_like(lane) + n
    for _ in range(STEPS):
        m = (lo_b + hi_b) // 2
        active = lo_b < hi_b
        v = tl.load(xs_row + tl.minimum(m, n - 1), mask=active, other=0.0)
        right = active & (v <= mid)
        lo_b = tl.where(right, m + 1, lo_b)
        hi_b = tl.where(active & ~right, m, hi_b)
    bnd = tl.minimum(lo_b, nv)
    lo = tl.where(lane == 0, 0, tl.gather(bnd, tl.maximum(lane - 1, 0), 0))
    hi = tl.where(lane + 1 < k, bnd, nv)
    valid = lane < k
    sums = tl.load(cs_row + hi, mask=valid, other=0.0) - tl.load(cs_row + lo, mask=valid, other=0.0)
    wts = tl.load(cw_row + hi, mask=valid, other=0.0) - tl.load(cw_row + lo, mask=valid, other=0.0)
    return bnd, lo, hi, sums, wts

@triton.jit
def kernel(XS, CS, CW, NV, C, SSE, n, S, k, max_iter, check_every,
           KP: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // S
    lane = tl.arange(0, KP)
    valid = lane < k
    xs_row = XS + row.to(tl.int64) * n
    cs_row = CS + row.to(tl.int64) * (n + 1)
    cw_row = CW + row.to(tl.int64) * (n + 1)
    nv = tl.load(NV + row).to(tl.int32)
    cptr = C + pid.to(tl.int64) * k + lane
    c = tl.load(cptr, mask=valid, other=float("inf"))
    prev = tl.zeros_like(lane) - 1
    it = 0
    done = 0
    while (it < max_iter) & (done == 0):
        bnd, lo, hi, sums, wts = runs(xs_row, cs_row, cw_row, c, lane, k, n, nv, STEPS)
        filled = wts > 0
        new = tl.where(filled, (sums / tl.maximum(wts, 1e-300)).to(tl.float32), c)
        if (it % check_every == check_every - 1) | (it == max_iter - 1):
            first = tl.load(xs_row + tl.minimum(lo, n - 1), mask=valid, other=0.0)
            last = tl.load(xs_row + tl.maximum(hi - 1, 0), mask=valid, other=0.0)
            d_first = tl.abs(first - new)
            d_last = tl.abs(last - new)
            d = tl.where(filled & valid, tl.maximum(d_first, d_last), -1.0)
            far_d = tl.max(d, 0)
            far_j = tl.argmax(d, 0, tie_break_left=True)
            at = lane == far_j
            pick_first = tl.sum(tl.where(at & (d_first >= d_last), 1, 0), 0) > 0
            far = tl.sum(tl.where(at, tl.where(pick_first, first, last), 0.0), 0)
            empty = valid & ~filled & (nv > 0) & (new == new) & (tl.abs(new) < float("inf"))
            reseed = (tl.max(empty.to(tl.int32), 0) > 0) & (far_d > 0)
            slot = tl.argmax(empty.to(tl.int32), 0, tie_break_left=True)
            new = tl.where(reseed & (lane == slot), far, new)
            new = tl.sort(tl.where(valid, new, float("inf")), 0)
            same = tl.sum(tl.where((lane < k - 1) & (bnd != prev), 1, 0), 0) == 0
            done = ((it > 0) & same & ~reseed).to(tl.int32)
        c = new
        prev = bnd
        it += 1
    bnd, lo, hi, sums, wts = runs(xs_row, cs_row, cw_row, c, lane, k, n, nv, STEPS)
    tl.store(cptr, c, mask=valid)
    tl.store(SSE + pid, -tl.sum(tl.where(valid, sums * sums / tl.maximum(wts, 1e-300), 0.0), 0))

