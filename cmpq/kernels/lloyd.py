"""k-means' Lloyd iterations (``cmpq.algorithm.kmeans._lloyd``) in one Triton launch.

On a GPU the 1-D k-means of the compensated algorithm is launch-bound: each Lloyd iteration over a
batch of sorted rows is ~20 ATen calls (midpoints, ``searchsorted``, gathers from the prefix sums),
each doing microseconds of work, and every lazy block of the walk, every width of the allocation and
every merge-and-split move runs such a loop (``docs/results.md``: on a 7B-shaped model the walk's
compensated pass is ~2.1 s a block and the allocation 28 s, both mostly k-means).

Here one program owns one (row, start): its ``k`` centroids in registers, and it walks the
iterations itself: binary searches of the ``k - 1`` midpoints in the sorted row, cluster sums from the
float64 prefix sums, and at every ``CHECK_EVERY``-th iteration the same re-seed of one empty cluster
and the same convergence test as the PyTorch loop. A row stops at its own fixed point instead of
waiting for every row of the batch; after a fixed point an iteration changes nothing, so the
centroids are the same. Only the SSE's float64 sum over the ``k`` clusters may differ in its last
bits (another summation order).

``lloyd`` needs Triton; the tests run it on CPU tensors under ``TRITON_INTERPRET=1`` against
``kmeans._lloyd``. The default for CUDA tensors (``kmeans.FUSED_LLOYD``): on an H100 it halved one
7B-shaped block's compensated pass and allocation (3.55 -> 1.71 s; docs/results.md).
"""

from __future__ import annotations

import torch


def lloyd(xs: torch.Tensor, csum: torch.Tensor, cw: torch.Tensor, nvalid: torch.Tensor, cent: torch.Tensor,
          max_iter: int, check_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmeans._lloyd(xs, csum, cw, nvalid, cent, max_iter)``: (centroids ``[rows, S, k]`` float32,
    SSE minus a row constant ``[rows, S]`` float64)."""
    import triton

    rows, n = xs.shape
    S, k = cent.shape[1], cent.shape[2]
    out = cent.float().contiguous().clone()
    sse = torch.zeros(rows, S, dtype=torch.float64, device=xs.device)
    if rows == 0 or S == 0:
        return out, sse
    steps = max(1, int(n).bit_length())  # binary search over n + 1 insertion points
    _kernel()[(rows * S,)](
        xs.contiguous(), csum.contiguous(), cw.contiguous(), nvalid.contiguous().long(), out, sse,
        n, S, k, max_iter, check_every,
        KP=triton.next_power_of_2(max(k, 2)), STEPS=steps, num_warps=1)
    return out, sse


def _kernel():
    from cmpq.kernels import lloyd_jit  # imports Triton

    return lloyd_jit.kernel
