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

from .rtn import _group_size, fake_quant, minmax_params


class HessianAccumulator:
    """Running ``X^T X`` over calibration inputs of one linear, like the reference's ``add_batch``.

    ``add(x)`` takes any ``[..., in]`` batch; every row (token) counts once. ``H`` returns
    ``2 / n_tokens * sum x x^T`` (the Hessian of the mean squared layer-output error; GPTQ is invariant
    to the scale, so ``sum`` is equally valid). The sum is kept in ``dtype`` (float64 for very long runs).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0]).to(device=self.sum.device, dtype=self.sum.dtype)
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


@torch.no_grad()
def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> Tensor:
    """GPTQ-quantize ``W [out, in]`` given ``H [in, in]`` (``sum x x^T`` up to scale); returns ``W_hat`` in ``W.dtype``.

    ``group_size=None`` gives one grid per output row (computed once, before any update, as in the
    reference). Grid convention: :mod:`cmpq.baselines.rtn`.
    """
    n = W.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}], got {tuple(H.shape)}")
    Wf = W.detach().float().clone()
    H = H.detach().to(device=Wf.device, dtype=torch.float32).clone()

    mean_diag = H.diagonal().mean()  # before the dead-input fix, so the result is invariant to H's scale
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    Wf[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        Wf, H = Wf[:, perm], H[perm][:, perm]

    Hinv = _inverse_hessian_cholesky(H, damp, mean_diag)
    del H

    grouped = group_size is not None and group_size < n
    g = _group_size(n, group_size)
    scale, zero = minmax_params(Wf, bits)  # per-row grid; replaced at each group start when grouped
    Q = torch.empty_like(Wf)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wf[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and col % g == 0:
                # the group's current (error-updated) weights; if the group runs past this block, its
                # later columns get this block's pending lazy update first, so block_size never
                # changes the result
                seg = W1[:, i : i + g]
                if i + g > i2 - i1:
                    tail = Wf[:, i2 : col + g] - Err1[:, :i] @ Hinv[i1:col, i2 : col + g]
                    seg = torch.cat([seg, tail], 1)
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
    return Q.to(W.dtype)
