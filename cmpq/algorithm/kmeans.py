"""Vectorized 1-D k-means, one codebook per row, all rows of a batch at once.

In one dimension the clusters of Lloyd's algorithm are contiguous runs of the sorted values,
bounded by the midpoints between neighbouring centroids. So after one sort per row, each
iteration is a ``searchsorted`` of ``K-1`` midpoints plus gathers from prefix sums: O(K log N)
per row instead of O(K N), and no Python loop over rows. Masked values (weight outliers that
will be stored exactly) are pushed to ``+inf`` so they sort last and never pull a centroid.

Initialisation is deterministic (mid-quantiles of the kept values). A cluster that runs empty is
re-seeded at the value farthest from its centroid, which is always the first or last value of
some cluster's run, so this too needs only gathers; with it, data holding K distinct values is
recovered exactly.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 25  # rows are processed in chunks of about this many values to bound memory


def kmeans_1d(
    x: torch.Tensor, k: int, keep: torch.Tensor | None = None, max_iter: int = 100
) -> torch.Tensor:
    """Centroids ``[rows, k]`` (float32, ascending) of each row of ``x`` ``[rows, n]``.

    ``keep`` (bool, same shape) marks the values that take part; the others are ignored.
    Rows with fewer distinct kept values than ``k`` get repeated centroids; rows with none get zeros.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects [rows, n], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, n = x.shape
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    out = [
        _kmeans_chunk(x[i : i + step], k, None if keep is None else keep[i : i + step], max_iter)
        for i in range(0, rows, step)
    ]
    return torch.cat(out) if out else x.new_zeros(0, k, dtype=torch.float32)


def _kmeans_chunk(x: torch.Tensor, k: int, keep: torch.Tensor | None, max_iter: int) -> torch.Tensor:
    rows, n = x.shape
    dev = x.device
    if n == 0:
        return torch.zeros(rows, k, dtype=torch.float32, device=dev)
    x = x.float()
    if keep is None:
        keep = torch.ones_like(x, dtype=torch.bool)
    xs, _ = torch.sort(torch.where(keep, x, torch.inf), dim=1)
    nvalid = keep.sum(dim=1)  # [rows]
    valid = torch.arange(n, device=dev) < nvalid[:, None]
    xz = torch.where(valid, xs, 0.0).double()
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=dev)
    csum = torch.cat([zero, xz.cumsum(dim=1)], dim=1)  # prefix sums of kept values, [rows, n+1]

    # Mid-quantile initialisation over the kept values.
    q = (torch.arange(k, device=dev, dtype=torch.float64) + 0.5) / k
    pos = (q[None, :] * nvalid[:, None]).long().clamp(max=max(n - 1, 0))
    cent = torch.where(nvalid[:, None] > 0, xs.gather(1, pos), 0.0)
    if k == 1:
        return (csum[:, -1:] / nvalid[:, None].clamp(min=1)).float()

    last = torch.full((rows, 1), 0, dtype=torch.long, device=dev)
    prev = None
    for _ in range(max_iter):
        mids = (cent[:, 1:] + cent[:, :-1]) * 0.5
        bnd = torch.searchsorted(xs, mids.contiguous(), right=True).clamp(max=nvalid[:, None])
        lo = torch.cat([last, bnd], dim=1)  # [rows, k]
        hi = torch.cat([bnd, nvalid[:, None]], dim=1)
        cnt = hi - lo
        sums = csum.gather(1, hi) - csum.gather(1, lo)
        new = torch.where(cnt > 0, (sums / cnt.clamp(min=1)).float(), cent)

        # Re-seed one empty cluster per row at the kept value farthest from its centroid.
        empty = (cnt == 0) & (nvalid[:, None] > 0)
        reseeded = torch.zeros(rows, dtype=torch.bool, device=dev)
        if bool(empty.any()):
            first = xs.gather(1, lo.clamp(max=n - 1))
            lastv = xs.gather(1, (hi - 1).clamp(min=0))
            d = torch.maximum((first - new).abs(), (lastv - new).abs())
            d = torch.where(cnt > 0, d, -1.0)
            best = d.argmax(dim=1, keepdim=True)
            far = torch.where(
                (first - new).abs().gather(1, best) >= (lastv - new).abs().gather(1, best),
                first.gather(1, best),
                lastv.gather(1, best),
            )
            reseeded = empty.any(dim=1) & (d.gather(1, best).squeeze(1) > 0)
            slot = empty.float().argmax(dim=1, keepdim=True)  # first empty cluster of the row
            new = torch.where(reseeded[:, None], new.scatter(1, slot, far), new)
        new, _ = torch.sort(new, dim=1)
        done = prev is not None and torch.equal(bnd, prev) and not bool(reseeded.any())
        cent, prev = new, bnd
        if done:
            break
    return cent.float()


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
