"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1) for one linear layer, as a pure weight-level function.

GPTQ quantizes the columns (input channels) of ``W`` one at a time and, after each, spreads the
column's quantization error over the not-yet-quantized columns so as to minimize
``||X W^T - X W_hat^T||^2``, using the inverse Hessian ``H^-1`` of that objective (``H ~ X^T X``).
Implementation steps, as in the paper and its reference code:

* dead inputs (``H_ii == 0``) get ``H_ii = 1`` and ``W[:, i] = 0`` (they never affect the output);
* optional ``act_order``: columns are processed in order of decreasing ``H_ii``;
* dampening ``H += damp * mean(diag H) * I`` (relative, so the result is invariant to scaling ``H``;
  the mean is taken before dead inputs get their 1, unlike the reference, which would otherwise break
  that invariance when there are dead inputs);
* the upper Cholesky factor of ``H^-1`` supplies, row by row, the error-feedback coefficients
  (paper Sec. 3, "Cholesky reformulation");
* lazy batch updates: errors are applied inside a block of ``block_size`` columns immediately and to the
  columns after the block once per block (paper Sec. 3, "Lazy batch-updates");
* group-wise grids: scale/zero of a group are computed from the (already error-updated) weights when
  the group's first column is reached. (When a group straddles a block boundary, the reference reads
  stale weights; here the pending block update is applied first, so the result does not depend on
  ``block_size``. With the default ``block_size == group_size`` both are identical.) With ``act_order`` groups are consecutive columns of the
  *permuted* order (the reference's ``static_groups=False`` behaviour), so a group holds channels of
  similar ``H_ii`` rather than neighbouring channels; the returned fake-quantized weight is un-permuted.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from cmpq.model.calibration import add_half_gram, half_gram_applies
from .rtn import _check_bits, _group_size, group_params, minmax_params


class HessianAccumulator:
    """Running ``X^T X`` over calibration inputs of one linear, like the reference's ``add_batch``.

    ``add(x)`` takes any ``[..., in]`` batch; every row (token) counts once. ``H`` returns
    ``2 / n_tokens * sum x x^T`` (the Hessian of the mean squared layer-output error; GPTQ is invariant
    to the scale, so ``sum`` is equally valid). The sum is kept in ``dtype`` (float64 for very long runs).

    On CUDA, float16/bfloat16 inputs and a float32 sum (``half_matmul``, the default), the product is
    one half-precision GEMM with float32 output (tensor cores). It computes the same thing as
    converting to float32 first: every product of two float16 (or bfloat16) numbers is exact in
    float32, and the sums are float32 in both; only the order of the float32 additions differs (as
    between any two GEMM kernels). The float32 GEMM (no tensor cores) is about 10x slower on an H100/H200
    and was most of GPTQ's time on 7B-shaped models.

    ``first_token_weight`` (not in the reference; 1 = off): for ``[batch, seq, in]`` inputs, each
    sequence's first token counts that many times. A causal LM's first position is its attention sink
    (every later query attends to its key and value), but it is one token in ``seq``, so plain GPTQ
    moves quantization error onto it (see ``studies/gptq_quality.py``).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 half_matmul: bool = True, first_token_weight: float = 1.0):
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0
        self.half_matmul = half_matmul
        self.first_token_weight = first_token_weight

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        if self.first_token_weight != 1 and x.dim() >= 3:
            x0 = x.detach().reshape(-1, x.shape[-2], x.shape[-1])[:, 0].to(device=self.sum.device, dtype=self.sum.dtype)
            self.sum.addmm_(x0.T, x0, alpha=self.first_token_weight - 1)
        x = x.detach().reshape(-1, self.sum.shape[0])
        if self.half_matmul and x.device == self.sum.device:
            if add_half_gram(self.sum, x):
                self.count += x.shape[0]
                return
            if half_gram_applies(self.sum, x):
                self.half_matmul = False  # a torch without mm(out_dtype=): the float32 path from now on
        x = x.to(device=self.sum.device, dtype=self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    @property
    def H(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration inputs were added")
        return (self.sum * (2.0 / self.count)).float()


def _inverse_hessian_cholesky(H: Tensor, damp: float, mean_diag: Tensor) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean_diag * I)^-1``.

    If ``H`` is too ill-conditioned in float32 the dampening is raised tenfold (up to 3 times) with a
    warning; the reference code would fail instead.
    """
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(f"GPTQ: Hessian not positive definite, dampening raised to {damp:g}")
                return U
        damp *= 10
    raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy dampening")


def _grid(scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, lo, hi)`` as ``[out]`` vectors: ``q = scale * clamp(round(w / scale), -zero, maxq - zero)``,
    which equals :func:`cmpq.baselines.rtn.fake_quant` (integers are exact in float32) with two ops fewer."""
    zero = zero.reshape(-1)
    return scale.reshape(-1), -zero, maxq - zero


@torch.no_grad()
def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> Tensor:
    """GPTQ-quantize ``W [out, in]`` given ``H [in, in]`` (``sum x x^T`` up to scale); returns ``W_hat`` in ``W.dtype``.

    ``group_size=None`` gives one grid per output row (computed once, before any update, as in the
    reference). ``static_groups`` (the reference's option): every group's grid is computed from the
    original weights (dead inputs zeroed) before any update, groups being consecutive *original*
    columns also under ``act_order``. Grid convention: :mod:`cmpq.baselines.rtn`.

    Rows are independent: quantizing ``cat([W1, W2])`` gives ``cat`` of the two results (linears that
    share their input, hence ``H``, are solved in one call by the runner).

    Speed: the block being quantized is held transposed (``[block, out]``), so each column is a
    contiguous row and its rank-1 error update a contiguous ``[k, out]`` slab, and each column takes 8
    tensor ops (quantize 4, error 2, update 2), allocation-free, none of which waits for the device. The
    arithmetic is the reference's, operation for operation.
    """
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}], got {tuple(H.shape)}")
    maxq = _check_bits(bits)
    Wf = W.detach().float().clone()
    H = H.detach().to(device=Wf.device, dtype=torch.float32).clone()

    mean_diag = H.diagonal().mean()  # before the dead-input fix, so the result is invariant to H's scale
    dead = H.diagonal() == 0
    H.diagonal().masked_fill_(dead, 1.0)  # (masks, not boolean indexing: no host-device sync)
    Wf.masked_fill_(dead, 0.0)

    grouped = group_size is not None and group_size < n
    g = _group_size(n, group_size)
    static = static_groups and grouped
    if static:
        gscale, gzero = group_params(Wf, bits, g)  # [out, n_groups], original column order

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        Wf, H = Wf[:, perm], H[perm][:, perm]
    if static:
        gid = ((perm if perm is not None else torch.arange(n, device=Wf.device)) // g).tolist()

    Hinv = _inverse_hessian_cholesky(H, damp, mean_diag)
    del H

    s, lo, hi = _grid(*minmax_params(Wf, bits), maxq)  # per-row grid; replaced per group when grouped
    cur = -1  # static groups: the group whose grid is loaded
    Q = torch.empty_like(Wf)
    buf = torch.empty(min(block_size, n), Wf.shape[0], device=Wf.device)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        count = i2 - i1
        W1 = Wf[:, i1:i2].T.contiguous()  # [count, out]: the block's column i is row i
        Q1 = torch.empty_like(W1)
        E1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if static:
                if gid[col] != cur:
                    cur = gid[col]
                    s, lo, hi = _grid(gscale[:, cur], gzero[:, cur], maxq)
            elif grouped and col % g == 0:
                # the group's current (error-updated) weights; if the group runs past this block, its
                # later columns get this block's pending lazy update first, so block_size never
                # changes the result
                seg = W1[i : i + g].T
                if col + g > i2 and i2 < n:
                    tail = Wf[:, i2 : col + g] - E1[:i].T.contiguous() @ Hinv[i1:col, i2 : col + g]
                    seg = torch.cat([seg, tail], 1)
                s, lo, hi = _grid(*minmax_params(seg, bits), maxq)
            w, q, e = W1[i], Q1[i], E1[i]
            torch.div(w, s, out=q)
            q.round_().clamp_(lo, hi).mul_(s)
            torch.sub(w, q, out=e)
            e.div_(Hinv1[i, i])
            if i + 1 < count:
                upd = buf[: count - i - 1]
                torch.mul(Hinv1[i, i + 1 :].unsqueeze(1), e, out=upd)
                W1[i + 1 :].sub_(upd)
        Q[:, i1:i2] = Q1.T
        if i2 < n:
            Wf[:, i2:] -= E1.T.contiguous() @ Hinv[i1:i2, i2:]

    Q.add_(0.0)  # -0.0 (from round) -> +0.0, as fake_quant gives: bit-identical to the column-by-column form
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(W.dtype)
