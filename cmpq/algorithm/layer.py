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

from cmpq.algorithm.allocation import get_allocator
from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d, uniform_codebook
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

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.outlier_weight.device)
        for ch, idx, cb in self.groups.values():
            if ch.numel():
                w[:, ch] = cb.float().gather(1, idx.T).T
        w[:, self.outlier_channels] = self.outlier_weight.float()
        w[self.sparse_rows, self.sparse_cols] = self.sparse_vals.float()
        return w


def _codebooks(x: torch.Tensor, k: int, keep: torch.Tensor | None, cfg: CMPQConfig) -> torch.Tensor:
    """FP16-representable centroids ``[rows, k]`` for each row of ``x``."""
    if cfg.quantizer == "uniform":
        cb = uniform_codebook(x, k, keep)
    else:
        cb = kmeans_1d(x, k, keep, max_iter=cfg.kmeans_iters)
    return cb.half().float()  # round once so assignment uses exactly the stored values


def quantize_weight(weight: torch.Tensor, act_sqsum: torch.Tensor, cfg: CMPQConfig, name: str = "weight") -> QuantizedParts:
    """Quantize ``weight`` ``[out, in]`` given the per-input-channel sum of squared activations."""
    out_f, in_f = weight.shape
    if act_sqsum.shape != (in_f,):
        raise ValueError(f"{name}: activation statistics have shape {tuple(act_sqsum.shape)}, expected ({in_f},)")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight holds NaN or Inf; refusing to quantize")
    if not torch.isfinite(act_sqsum).all():
        raise ValueError(f"{name}: activation statistics hold NaN or Inf (did calibration overflow in fp16?)")
    dev = weight.device
    w = weight.float()
    norms = act_sqsum.float().sqrt()

    n_act = min(int(round(cfg.act_outlier_frac * in_f)), in_f - 1)
    act_ids = torch.topk(norms, n_act).indices.sort().values if n_act else torch.empty(0, dtype=torch.long, device=dev)
    rest = torch.ones(in_f, dtype=torch.bool, device=dev)
    rest[act_ids] = False
    rest_ids = rest.nonzero().squeeze(1)
    bits = get_allocator(cfg.allocator)(norms[rest_ids], cfg.bits)
    chans = {b: rest_ids[bits == b] for b in BIT_WIDTHS}
    cols = {b: w[:, ch].T.contiguous() for b, ch in chans.items()}  # [n_b, out]: one row per channel

    # First pass: quantize everything, find the weights with the largest error (O_q).
    n_sp = int(round(cfg.weight_outlier_frac * out_f * in_f))
    keep = {b: None for b in BIT_WIDTHS}
    if n_sp:
        errs, pos = [], []
        for b, x in cols.items():
            if x.numel():
                cb = _codebooks(x, 2**b, None, cfg)
                errs.append((x - cb.gather(1, assign_nearest(x, cb))).abs().reshape(-1))
                pos.append((chans[b][:, None] * out_f + torch.arange(out_f, device=dev)).reshape(-1))
        err, flat = torch.cat(errs), torch.cat(pos)  # flat = channel * out + row
        top = flat[torch.topk(err, min(n_sp, err.numel())).indices]
        is_out = torch.zeros(in_f * out_f, dtype=torch.bool, device=dev)
        is_out[top] = True
        is_out = is_out.view(in_f, out_f)
        keep = {b: ~is_out[chans[b]] for b in BIT_WIDTHS}
        sp_cols, sp_rows = top // out_f, top % out_f
        order = torch.argsort(sp_rows * in_f + sp_cols)
        sp_rows, sp_cols = sp_rows[order], sp_cols[order]
    else:
        sp_rows = sp_cols = torch.empty(0, dtype=torch.long, device=dev)

    # Final pass: cluster each channel without its outliers.
    groups = {}
    for b, x in cols.items():
        cb = _codebooks(x, 2**b, keep[b], cfg)
        idx = assign_nearest(x, cb)  # [n_b, out]
        groups[b] = (chans[b], idx.T.contiguous(), cb.half())
    return QuantizedParts(
        out_features=out_f,
        in_features=in_f,
        groups=groups,
        outlier_channels=act_ids,
        outlier_weight=weight[:, act_ids].half(),
        sparse_rows=sp_rows,
        sparse_cols=sp_cols,
        sparse_vals=weight[sp_rows, sp_cols].half(),
    )
