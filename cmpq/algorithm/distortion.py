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
    return channel_sse_many([weight], bits, iters, [row_weight], swaps, shared)[0]


def channel_sse_many(weights: list[torch.Tensor], bits: list[int], iters: int,
                     row_weights: list[torch.Tensor | None], swaps: int = 0,
                     shared: bool | None = None) -> list[torch.Tensor]:
    """``channel_sse`` of several layers with the same number of output rows, their k-means runs
    merged: each column's run is independent of the others in its call, so each layer gets exactly
    what it gets alone, for one call's launches (on a GPU, launches are what the allocation costs).
    All widths share one call while the copies of all layers fit one k-means chunk; else one call
    per width, still across the layers."""
    xs = [w.detach().float().T.contiguous() for w in weights]
    shared = kmeans.share_runs(xs[0].device) if shared is None else shared
    total = sum(x.numel() for x in xs)
    if len(bits) > 1 and (not shared or total * len(bits) > kmeans.CHUNK_ELEMENTS):
        per = [channel_sse_many(weights, [b], iters, row_weights, swaps, shared) for b in bits]
        return [torch.cat([p[i] for p in per]) for i in range(len(xs))]
    dev, out_f = xs[0].device, xs[0].shape[1]
    rows = [x.repeat(len(bits), 1) for x in xs]
    ks = torch.cat([torch.tensor([2**b for b in bits], device=dev).repeat_interleave(x.shape[0]) for x in xs])
    weight = kmeans.stacked_row_weights([(r.shape[0], rw) for r, rw in zip(rows, row_weights)], out_f, dev)
    cb_all = kmeans.kmeans_1d(torch.cat(rows), 2 ** max(bits), max_iter=iters, weight=weight, swaps=swaps, ks=ks)
    result = []
    for x, rw, cb in zip(xs, row_weights, cb_all.split([r.shape[0] for r in rows])):
        n, out = x.shape[0], []
        for i, b in enumerate(bits):
            c = storable(cb[i * n : (i + 1) * n, : 2**b])
            err = (x - c.gather(1, kmeans.assign_nearest(x, c))).pow(2)
            out.append((err if rw is None else err * rw[None, :]).sum(dim=1).double())
        result.append(torch.stack(out))
    return result


def layer_options(weight: torch.Tensor, hdiag: torch.Tensor, widths: tuple[int, ...], n_sparse: int,
                  iters: int = 25, fp16: bool = True, row_weight: torch.Tensor | None = None,
                  row_scale: bool = False, swaps: int = 0) -> LayerOptions:
    """Costs (bits, format v4) and expected losses of each candidate width for every channel
    (``row_scale``: of the row-scaled fit ``quantize_compensated`` will make, whose scales the
    layer's fixed cost includes; ``swaps``: the k-means the quantization will run)."""
    return layer_options_group([weight], [hdiag], widths, [n_sparse], iters, fp16, [row_weight], row_scale, swaps)[0]


def layer_options_group(weights: list[torch.Tensor], hdiags: list[torch.Tensor], widths: tuple[int, ...],
                        n_sparse: list[int], iters: int = 25, fp16: bool = True,
                        row_weights: list[torch.Tensor | None] | None = None, row_scale: bool = False,
                        swaps: int = 0) -> list[LayerOptions]:
    """``layer_options`` of layers of one shape (a block's q/k/v/o), their k-means runs merged
    (``channel_sse_many``): the same options as layer by layer."""
    from cmpq.algorithm.compensated import scale_rows

    out_f, in_f = weights[0].shape
    if any(tuple(w.shape) != (out_f, in_f) for w in weights):
        raise ValueError(f"layer_options_group: layers of different shapes {[tuple(w.shape) for w in weights]}")
    row_weights = row_weights or [None] * len(weights)
    fitted, rws, hs = [], [], []
    for weight, hdiag, row_weight in zip(weights, hdiags, row_weights):
        if hdiag.shape != (in_f,):
            raise ValueError(f"sensitivity has shape {tuple(hdiag.shape)}, expected ({in_f},)")
        hs.append(hdiag.to(weight.device).double().clamp(min=0) / (2 * out_f))
        # mean 1, so the loss scale (and the price per bit) is unchanged
        rw = None if row_weight is None else mean_one_weights(row_weight, out_f, weight.device)
        if row_scale:  # not renormalised: the loss stays the true error
            weight, rw, _ = scale_rows(weight, rw)
        fitted.append(weight)
        rws.append(rw)
    opts = sorted(set(widths) | ({FP16} if fp16 else set()), key=lambda b: channel_cost_bits(b, out_f, in_f))
    quantized = [b for b in opts if b != FP16]
    sses = channel_sse_many(fitted, quantized, iters, rws, swaps) if quantized else [None] * len(fitted)
    cost = torch.tensor([channel_cost_bits(b, out_f, in_f) for b in opts], dtype=torch.float64)
    out = []
    for w, h, sse_all, ns in zip(fitted, hs, sses, n_sparse):
        sse = dict(zip(quantized, sse_all)) if quantized else {}
        loss = torch.stack([torch.zeros(in_f, dtype=torch.float64, device=w.device) if b == FP16
                            else h * sse[b] for b in opts], dim=1)
        fixed = sparse_cost_bits(out_f, ns, in_f) + (row_scale_cost_bits(out_f) if row_scale else 0)
        out.append(LayerOptions(tuple(opts), cost.clone(), loss.cpu(), float(fixed)))
    return out
