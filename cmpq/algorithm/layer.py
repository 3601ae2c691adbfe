"""CMPQ on one weight matrix: from ``W`` and its input-channel activation norms to packed parts.

Steps (paper Sec. 3.2): keep the ``act_outlier_frac`` channels with the largest activation norm
whole in FP16 (O_act); allocate 2/3/4 bits to the rest (Algorithm 1); quantize once and keep the
``weight_outlier_frac`` weights with the largest error in FP16 (O_q); quantize again without those
weights so they no longer pull the centroids. Every step is vectorized over all channels of a
bit width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmpq.algorithm.allocation import get_allocator
from cmpq.algorithm.phases import phase
from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d, uniform_codebook
from cmpq.storage.codebook import storable
from cmpq.config import CMPQConfig

BIT_WIDTHS = (2, 3, 4)


@dataclass
class QuantizedParts:
    """Unpacked result for one linear: all tensors on the weight's device."""

    out_features: int
    in_features: int
    groups: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # b -> (channels, idx [out,n_b], codebook fp16)
    outlier_channels: torch.Tensor  # int64 [n_act]
    outlier_weight: torch.Tensor  # fp16 [out, n_act]
    sparse_rows: torch.Tensor  # int64 [nnz], sorted by (row, col)
    sparse_cols: torch.Tensor  # int64 [nnz]
    sparse_vals: torch.Tensor  # fp16 [nnz]
    row_scale: torch.Tensor | None = None  # fp16 [out]: W = diag(row_scale) @ (the parts above)

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.outlier_weight.device)
        for ch, idx, cb in self.groups.values():
            if ch.numel():
                w[:, ch] = cb.float().gather(1, idx.T.long()).T
        w[:, self.outlier_channels] = self.outlier_weight.float()
        w[self.sparse_rows, self.sparse_cols] = self.sparse_vals.float()
        return w if self.row_scale is None else w * self.row_scale.float()[:, None]


def _codebooks(x: torch.Tensor, k: int, keep: torch.Tensor | None, cfg: CMPQConfig,
               init: torch.Tensor | None = None) -> torch.Tensor:
    """Storable centroids ``[rows, k]`` for each row of ``x`` (``init``: warm start)."""
    if cfg.quantizer == "uniform":
        cb = uniform_codebook(x, k, keep)
    else:
        cb = kmeans_1d(x, k, keep, max_iter=cfg.kmeans_iters, init=init)
    return storable(cb)  # round once (8-bit codes, cmpq.storage.codebook) so assignment uses the stored values


@dataclass
class _Plan:
    """One layer after O_act selection and allocation, before clustering."""

    weight: torch.Tensor
    act_ids: torch.Tensor
    chans: dict[int, torch.Tensor]  # b -> channel ids
    cols: dict[int, torch.Tensor]  # b -> [n_b, out] float32, one row per channel
    n_sparse: int


def _plan(weight: torch.Tensor, act_sqsum: torch.Tensor, cfg: CMPQConfig, name: str) -> _Plan:
    out_f, in_f = weight.shape
    if act_sqsum.shape != (in_f,):
        raise ValueError(f"{name}: activation statistics have shape {tuple(act_sqsum.shape)}, expected ({in_f},)")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight holds NaN or Inf; refusing to quantize")
    if not torch.isfinite(act_sqsum).all():
        raise ValueError(f"{name}: activation statistics hold NaN or Inf (did calibration overflow in fp16?)")
    if cfg.algorithm != "paper" or cfg.allocator == "distortion":
        raise ValueError(f"{name}: the paper's layer step needs CMPQConfig(algorithm='paper'); "
                         f"got algorithm {cfg.algorithm!r}, allocator {cfg.allocator!r}")
    dev = weight.device
    norms = act_sqsum.float().sqrt()
    n_act = min(int(round(cfg.act_outlier_frac * in_f)), in_f - 1)
    act_ids = torch.topk(norms, n_act).indices.sort().values if n_act else torch.empty(0, dtype=torch.long, device=dev)
    rest = torch.ones(in_f, dtype=torch.bool, device=dev)
    rest[act_ids] = False
    rest_ids = rest.nonzero().squeeze(1)
    bits = get_allocator(cfg.allocator)(norms[rest_ids], cfg.bits, edge_frac=cfg.edge_frac)
    chans = {b: rest_ids[bits == b] for b in BIT_WIDTHS}
    w = weight.float()
    cols = {b: w[:, ch].T.contiguous() for b, ch in chans.items()}
    return _Plan(weight, act_ids, chans, cols, int(round(cfg.weight_outlier_frac * out_f * in_f)))


def _batches(lengths: list[int], rows: list[int]) -> list[list[int]]:
    """Which layers to cluster together. Small layers are padded to a common length and clustered
    in one call (launch overhead dominates them); if padding would more than double the work,
    only layers of equal length are batched."""
    live = [i for i, r in enumerate(rows) if r]
    if not live:
        return []
    longest = max(lengths[i] for i in live)
    if sum(rows[i] * longest for i in live) <= 2 * sum(rows[i] * lengths[i] for i in live):
        return [live]
    by_len: dict[int, list[int]] = {}
    for i in live:
        by_len.setdefault(lengths[i], []).append(i)
    return list(by_len.values())


def _largest_errors(p: _Plan, codebooks: list[torch.Tensor], k: int) -> torch.Tensor:
    """Flat positions (``channel * out + row``) of the ``k`` weights with the largest first-pass
    error. Works in chunks of channels (top-k of each chunk, then of the candidates), so the peak is
    one chunk, not several full-size copies of the layer."""
    from cmpq.algorithm import kmeans

    out_f = p.weight.shape[0]
    step = max(1, kmeans.CHUNK_ELEMENTS // max(out_f, 1))
    vals, pos = [], []
    for b, cb in zip(BIT_WIDTHS, codebooks):
        x, ch = p.cols[b], p.chans[b]
        for i in range(0, x.shape[0], step):
            xc, cbc = x[i : i + step], cb[i : i + step]
            err = (xc - cbc.gather(1, assign_nearest(xc, cbc))).abs().reshape(-1)
            v, j = torch.topk(err, min(k, err.numel()))
            vals.append(v)
            pos.append(ch[i : i + step][j // out_f] * out_f + j % out_f)
    v, flat = torch.cat(vals), torch.cat(pos)
    return flat[torch.topk(v, min(k, v.numel())).indices]


def _split_by_size(batches: list[list[int]], xs: list[torch.Tensor]) -> list[list[int]]:
    """Cut batches so a padded batch holds at most ``kmeans.CHUNK_ELEMENTS`` values (the memory
    planner's knob): the concatenated copy is then no larger than one k-means chunk."""
    from cmpq.algorithm import kmeans

    out = []
    for batch in batches:
        n = max(xs[i].shape[1] for i in batch)
        cur: list[int] = []
        for i in batch:
            if cur and (sum(xs[j].shape[0] for j in cur) + xs[i].shape[0]) * n > kmeans.CHUNK_ELEMENTS:
                out.append(cur)
                cur = []
            cur.append(i)
        out.append(cur)
    return out


def _cluster(xs: list[torch.Tensor], keeps: list[torch.Tensor | None], k: int, cfg: CMPQConfig,
             inits: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Codebooks for many row sets at once (rows padded with ignored values); ``inits``: warm starts."""
    out: list[torch.Tensor] = [xs[i].new_zeros(0, k) for i in range(len(xs))]
    for batch in _split_by_size(_batches([x.shape[1] for x in xs], [x.shape[0] for x in xs]), xs):
        n = max(xs[i].shape[1] for i in batch)
        if len(batch) == 1:  # no padded copy of a layer that is clustered alone
            x, keep = xs[batch[0]], keeps[batch[0]]
        else:
            x = torch.cat([F.pad(xs[i], (0, n - xs[i].shape[1])) for i in batch])
            keep = torch.cat([
                F.pad(keeps[i] if keeps[i] is not None else torch.ones_like(xs[i], dtype=torch.bool), (0, n - xs[i].shape[1]))
                for i in batch
            ])
        init = torch.cat([inits[i] for i in batch]) if inits is not None else None
        cb = _codebooks(x, k, keep, cfg, init)
        for i, part in zip(batch, cb.split([xs[i].shape[0] for i in batch])):
            out[i] = part
    return out


def quantize_weights(
    weights: list[torch.Tensor], act_sqsums: list[torch.Tensor], cfg: CMPQConfig, names: list[str] | None = None
) -> list[QuantizedParts]:
    """CMPQ on several matrices (e.g. all linears of one block), clustered in shared batches."""
    names = names or [f"weight {i}" for i in range(len(weights))]
    dev = weights[0].device
    with phase("allocation", dev):
        plans = [_plan(w, a, cfg, n) for w, a, n in zip(weights, act_sqsums, names)]
    keeps: dict[int, list[torch.Tensor | None]] = {b: [None] * len(plans) for b in BIT_WIDTHS}

    # First pass: quantize everything, keep the weights with the largest error (O_q) aside.
    with phase("kmeans", dev):
        first = {b: _cluster([p.cols[b] for p in plans], [None] * len(plans), 2**b, cfg) for b in BIT_WIDTHS} \
            if any(p.n_sparse for p in plans) else None
    with phase("outlier_search", dev):
        sparse = _weight_outliers(plans, first, keeps)

    # Final pass: cluster each channel without its outliers, warm-started from the first pass (one
    # start instead of two, and it converges in a few iterations).
    with phase("kmeans", dev):
        final = {b: _cluster([p.cols[b] for p in plans], keeps[b], 2**b, cfg, first[b] if first else None)
                 for b in BIT_WIDTHS}
        indices = [{b: assign_nearest(p.cols[b], final[b][li]).to(torch.uint8).T.contiguous() for b in BIT_WIDTHS}
                   for li, p in enumerate(plans)]
    result = []
    for li, p in enumerate(plans):
        groups = {b: (p.chans[b], indices[li][b], final[b][li].half()) for b in BIT_WIDTHS}
        rows, cols = sparse[li]
        result.append(QuantizedParts(
            out_features=p.weight.shape[0],
            in_features=p.weight.shape[1],
            groups=groups,
            outlier_channels=p.act_ids,
            outlier_weight=p.weight[:, p.act_ids].half(),
            sparse_rows=rows,
            sparse_cols=cols,
            sparse_vals=p.weight[rows, cols].half(),
        ))
    return result


def _weight_outliers(plans: list[_Plan], first: dict | None, keeps: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """O_q of every layer: (rows, cols) of its largest-error weights, row-major; fills ``keeps``."""
    sparse = []
    for li, p in enumerate(plans):
        out_f, in_f = p.weight.shape
        dev = p.weight.device
        if not p.n_sparse:
            empty = torch.empty(0, dtype=torch.long, device=dev)
            sparse.append((empty, empty))
            continue
        top = _largest_errors(p, [first[b][li] for b in BIT_WIDTHS], p.n_sparse)  # channel * out + row
        is_out = torch.zeros(in_f * out_f, dtype=torch.bool, device=dev)
        is_out[top] = True
        is_out = is_out.view(in_f, out_f)
        for b in BIT_WIDTHS:
            keeps[b][li] = ~is_out[p.chans[b]]
        cols, rows = top // out_f, top % out_f
        order = torch.argsort(rows * in_f + cols)
        sparse.append((rows[order], cols[order]))
    return sparse


def quantize_weight(weight: torch.Tensor, act_sqsum: torch.Tensor, cfg: CMPQConfig, name: str = "weight") -> QuantizedParts:
    """Quantize ``weight`` ``[out, in]`` given the per-input-channel sum of squared activations."""
    return quantize_weights([weight], [act_sqsum], cfg, [name])[0]
