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
from cmpq.algorithm import kmeans
from cmpq.algorithm.kmeans import mean_one_weights
from cmpq.storage.codebook import storable


def channel_sse(weight: torch.Tensor, bits: int | list[int], iters: int, row_weight: torch.Tensor | None = None,
                swaps: int = 0, shared: bool | None = None) -> torch.Tensor:
    """``SSE_j`` ``[in]`` of each column of ``weight`` ``[out, in]`` with a ``2**bits`` k-means codebook
    (rows weighted by ``row_weight`` ``[out]``, mean 1, when given); for a list of widths,
    ``[len(bits), in]``, every width in one k-means call (``kmeans_1d``'s ``ks``) while the copies fit
    one k-means chunk and ``shared`` (None: ``kmeans.share_runs``, on a GPU), else one call per width
    (the same result: rows are independent)."""
    if isinstance(bits, int):
        return channel_sse(weight, [bits], iters, row_weight, swaps)[0]
    x = weight.detach().float().T.contiguous()
    shared = kmeans.share_runs(x.device) if shared is None else shared
    if len(bits) > 1 and (not shared or x.numel() * len(bits) > kmeans.CHUNK_ELEMENTS):
        return torch.stack([channel_sse(weight, b, iters, row_weight, swaps) for b in bits])
    n = x.shape[0]
    ks = torch.tensor([2**b for b in bits], device=x.device).repeat_interleave(n)
    cb = kmeans.kmeans_1d(x.repeat(len(bits), 1), 2 ** max(bits), max_iter=iters, weight=row_weight, swaps=swaps, ks=ks)
    out = []
    for i, b in enumerate(bits):
        c = storable(cb[i * n : (i + 1) * n, : 2**b])
        err = (x - c.gather(1, kmeans.assign_nearest(x, c))).pow(2)
        out.append((err if row_weight is None else err * row_weight[None, :]).sum(dim=1).double())
    return torch.stack(out)


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
    quantized = [b for b in opts if b != FP16]
    sse = dict(zip(quantized, channel_sse(weight, quantized, iters, rw, swaps))) if quantized else {}
    loss = torch.stack([torch.zeros(in_f, dtype=torch.float64, device=weight.device) if b == FP16
                        else h * sse[b] for b in opts], dim=1)
    cost = torch.tensor([channel_cost_bits(b, out_f, in_f) for b in opts], dtype=torch.float64)
    fixed = sparse_cost_bits(out_f, n_sparse, in_f) + (row_scale_cost_bits(out_f) if row_scale else 0)
    return LayerOptions(tuple(opts), cost, loss.cpu(), float(fixed))
