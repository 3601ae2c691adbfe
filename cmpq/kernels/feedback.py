"""The compensated pass's column loop (``cmpq.algorithm.compensated``) in one launch per lazy block.

Inside a lazy block of ``count`` columns, GPTQ-order error feedback is sequential: column ``i`` is
mapped to its codebook, and its error, scaled by ``1 / Hinv[i, i]``, is subtracted from the later
columns of the block through row ``i`` of the inverse Hessian's Cholesky factor. In PyTorch that is
five kernels and about twenty ATen calls (views included) per column, each doing microseconds of
work: on a GPU the loop is bound by launches, not arithmetic (``docs/results.md``: ~21 ATen calls
per column counted on CPU, 2026-12-06). A 7B-shaped block has 35,584 columns across its linears.

Here one Triton program owns ``BLOCK_R`` output rows of the whole block, ``[count, BLOCK_R]``
float32 in registers, and walks the columns itself: read column ``i`` from the tile, count the
midpoints below each value (the nearest-centroid index; codebooks have at most 16 entries at the
kernel's widths), gather the centroid, keep exact weights (sparse outliers, FP16 columns) at their
updated values, and apply the rank-1 update to the tile. Rows never interact, so programs need no
synchronisation. Reading column ``i`` as a masked reduction over the tile costs ``count`` times the
arithmetic of a direct read, which is free next to a launch.

``column_feedback_reference`` is the same loop in PyTorch: the CPU path, and the oracle of the tests
(which run the Triton kernel on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

BLOCK_R = 32  # output rows per program: a 128 x 32 float32 tile is 32 registers a thread at 4 warps
MAX_KERNEL_BLOCK = 256  # columns of a lazy block the register tile holds
MAX_KERNEL_ENTRIES = 16  # codebook entries (4 bits); wider codebooks take the PyTorch loop


def column_feedback_reference(W1: torch.Tensor, EX: torch.Tensor, mids: torch.Tensor, cent: torch.Tensor,
                              Hinv1: torch.Tensor, dinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized ``Q1``, scaled errors ``E1``, indices ``J1`` int64), all ``[count, out]``, of a lazy
    block. ``W1`` ``[count, out]`` (column ``i`` of the layer is row ``i``; updated in place),
    ``EX`` bool ``[count, out]`` (keep the value), ``mids`` ``[count, m]`` ascending midpoints, +inf
    past a column's codebook, ``cent`` ``[count, kmax]``, ``Hinv1`` ``[count, count]`` (upper
    Cholesky factor of the block's inverse Hessian), ``dinv`` ``[count]`` = ``1 / diag(Hinv1)``."""
    count, out_f = W1.shape
    Q1, E1 = torch.empty_like(W1), torch.empty_like(W1)
    J1 = torch.zeros(count, out_f, dtype=torch.long, device=W1.device)
    kmax = cent.shape[1]
    for i in range(count):
        w = W1[i]
        if kmax > 1:
            torch.searchsorted(mids[i], w, right=True, out=J1[i])
        torch.where(EX[i], w, cent[i].gather(0, J1[i]), out=Q1[i])
        torch.sub(w, Q1[i], out=E1[i]).mul_(dinv[i])
        if i + 1 < count:
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], E1[i], alpha=-1)
    return Q1, E1, J1


def column_feedback(W1: torch.Tensor, EX: torch.Tensor, mids: torch.Tensor, cent: torch.Tensor,
                    Hinv1: torch.Tensor, dinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``column_feedback_reference`` in one Triton launch (``J1`` int32; ``W1`` is left as it came).
    Needs Triton; ``count`` up to 256 (the tile lives in registers) and codebooks of at most 16
    entries."""
    import triton

    count, out_f = W1.shape
    kmax = cent.shape[1]
    if count > MAX_KERNEL_BLOCK:
        raise ValueError(f"column_feedback: lazy blocks of at most {MAX_KERNEL_BLOCK} columns, got {count}")
    if kmax > MAX_KERNEL_ENTRIES:
        raise ValueError(f"column_feedback: codebooks of at most {MAX_KERNEL_ENTRIES} entries, got {kmax}")
    W1, mids, cent = W1.float().contiguous(), mids.float().contiguous(), cent.float().contiguous()
    Hinv1, dinv = Hinv1.float().contiguous(), dinv.float().contiguous()
    ex = EX.contiguous().view(torch.uint8) if EX.dtype == torch.bool else EX.to(torch.uint8).contiguous()
    Q1, E1 = torch.empty_like(W1), torch.empty_like(W1)
    J1 = torch.empty(count, out_f, dtype=torch.int32, device=W1.device)
    if count == 0 or out_f == 0:
        return Q1, E1, J1
    _feedback_kernel[(triton.cdiv(out_f, BLOCK_R),)](
        W1, ex, mids, cent, Hinv1, dinv, Q1, E1, J1,
        count, out_f, mids.shape[1], kmax,
        NMID=max(kmax - 1, 0), BLOCK_C=triton.next_power_of_2(max(count, 16)), BLOCK_R=BLOCK_R, num_warps=4,
    )
    return Q1, E1, J1


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(W_ptr, EX_ptr, MID_ptr, CENT_ptr, H_ptr, DINV_ptr, Q_ptr, E_ptr, J_ptr,
               count, out_f, mid_stride, kmax,
               NMID: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < out_f
        cmask = c < count
        tile = tl.load(W_ptr + c[:, None] * out_f + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        for i in range(0, count):
            w = tl.sum(tl.where(c[:, None] == i, tile, 0.0), axis=0)  # column i: [BLOCK_R]
            j = tl.zeros([BLOCK_R], dtype=tl.int32)
            for m in tl.static_range(NMID):
                mid = tl.load(MID_ptr + i * mid_stride + m)
                j += (w >= mid).to(tl.int32)
            q = tl.load(CENT_ptr + i * kmax + j, mask=rmask, other=0.0)
            keep = tl.load(EX_ptr + i * out_f + r, mask=rmask, other=0) != 0
            q = tl.where(keep, w, q)
            e = (w - q) * tl.load(DINV_ptr + i)
            tl.store(Q_ptr + i * out_f + r, q, mask=rmask)
            tl.store(E_ptr + i * out_f + r, e, mask=rmask)
            tl.store(J_ptr + i * out_f + r, j, mask=rmask)
            h = tl.load(H_ptr + i * count + c, mask=cmask & (c > i), other=0.0)  # row i right of the diagonal
            tile = tile - h[:, None] * e[None, :]

    return kernel


class _Lazy:
    """Builds the kernel at first use, so importing this module needs no Triton."""

    def __init__(self) -> None:
        self.kernel = None

    def __getitem__(self, grid):
        if self.kernel is None:
            self.kernel = _build()
        return self.kernel[grid]


_feedback_kernel = _Lazy()
