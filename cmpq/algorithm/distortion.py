"""Expected loss of every channel at every candidate width: the input of ``cmpq.algorithm.budget``.

Channel ``j`` of an ``out x in`` layer quantized to ``b`` bits with its own k-means codebook has
squared error ``SSE_j(b)``; with the loss-weighted Hessian diagonal ``hdiag`` of
``cmpq.model.sensitivity`` that costs about ``hdiag[j] * SSE_j(b) / (2 * out)`` of loss (a
second-order estimate, each channel on its own). An FP16 column costs no loss. All widths of a layer
are clustered in a few vectorized k-means calls; fewer iterations than the final quantization are
enough, since only the size of the error matters here.
"""

from __future__ import annotations

import torch

from cmpq.algorithm.budget import FP16, LayerOptions, channel_cost_bits, row_scale_cost_bits, sparse_cost_bits
from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d, mean_one_weights
from cmpq.storage.codebook import storable


def channel_sse(weight: torch.Tensor, bits: int, iters: int, row_weight: torch.Tensor | None = None,
                swaps: int = 0) -> torch.Tensor:
    """``SSE_j`` ``[in]`` of each column of ``weight`` ``[out, in]`` with a ``2**bits`` k-means codebook
    (rows weighted by ``row_weight`` ``[out]``, mean 1, when given)."""
    x = weight.detach().float().T.contiguous()
    cb = storable(kmeans_1d(x, 2**bits, max_iter=iters, weight=row_weight, swaps=swaps))
    err = (x - cb.gather(1, assign_nearest(x, cb))).pow(2)
    return (err if row_weight is None else err * row_weight[None, :]).sum(dim=1).double()


def layer_options(weight: torch.Tensor, hdiag: torch.Tensor, widths: tuple[int, ...], n_sparse: int,
                  iters: int = 25, fp16: bool = True, row_weight: torch.Tensor | None = None,
                  row_scale: bool = False, swaps: int = 0) -> LayerOptions:
    """Costs (bits, format v4) and expected losses of each candidate width for every channel
    (``row_scale``: of the row-scaled fit ``quantize_compensated`` will make, whose scales the
    layer's fixed cost includes; ``swaps``: the k-means the quantization will run)."""
    from cmpq.algorithm.compensated import scale_rows

    out_f, in_f = weight.shape
    if hdiag.shape != (in_f,):
        raise ValueError(f"sensitivity has shape {tuple(hdiag.shape)}, expected ({in_f},)")
    h = hdiag.to(weight.device).double().clamp(min=0) / (2 * out_f)
    # mean 1, so the loss scale (and the price per bit) is unchanged
    rw = None if row_weight is None else mean_one_weights(row_weight, out_f, weight.device)
    if row_scale:  # not renormalised: the loss stays the true error
        weight, rw, _ = scale_rows(weight, rw)
    opts = sorted(set(widths) | ({FP16} if fp16 else set()), key=lambda b: channel_cost_bits(b, out_f, in_f))
    loss = torch.stack([torch.zeros(in_f, dtype=torch.float64, device=weight.device) if b == FP16
                        else h * channel_sse(weight, b, iters, rw, swaps) for b in opts], dim=1)
    cost = torch.tensor([channel_cost_bits(b, out_f, in_f) for b in opts], dtype=torch.float64)
    fixed = sparse_cost_bits(out_f, n_sparse, in_f) + (row_scale_cost_bits(out_f) if row_scale else 0)
    return LayerOptions(tuple(opts), cost, loss.cpu(), float(fixed))
