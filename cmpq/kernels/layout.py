"""One-time "kernel layout" of a ``CMPQLinear`` (docs/format.md, section "Kernel layout").

Pure PyTorch, run once per layer and cached on it (never saved): the kernels then read every
byte with coalesced loads and never decode anything twice.

- ``q{b}_packed`` (stored channel by channel, ``[n, ceil(out/32)*b]``) is re-packed along the
  channels and transposed to ``[nblk*b, out]``: a program that owns a block of output rows reads,
  for channel block ``g`` and plane ``p``, one contiguous run of words.
- ``outlier_weight`` ``[out, n_act]`` is transposed to ``[n_act, out]`` for the same reason.
- Sparse outliers *replace* the quantized value at their position. The decode kernel adds every
  quantized weight unconditionally, so the layout stores ``corr[k] = sparse_val[k] - W_q[r_k, c_k]``
  (fp32, x-independent, computed once here) and the epilogue adds ``corr[k] * x[c_k]``.
- ``perm`` (storage order of all channels: each group, then the outlier columns) and
  ``sparse_flat`` (positions of the sparse outliers in the transposed permuted dense weight
  ``[in, out]``) serve prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmpq.storage.packing import BLOCK, pack_indices

ROWS_PER_STEP = 4096  # re-pack this many output rows at a time (bounds the int64 temporary)


@dataclass
class Group:
    bits: int
    n: int
    channels: torch.Tensor  # int32 [n]
    packed_t: torch.Tensor  # int32 [nblk*bits, out]
    codebook: torch.Tensor  # fp16 [n, 2**bits]
    offset: int  # first column of this group in the permuted dense weight


@dataclass
class KernelLayout:
    key: tuple
    groups: list[Group]
    outlier_channels: torch.Tensor  # int32 [n_act]
    outlier_weight_t: torch.Tensor  # fp16 [n_act, out]
    sparse_crow: torch.Tensor  # int32 [out+1]
    sparse_col: torch.Tensor  # int32 [nnz]
    sparse_corr: torch.Tensor  # fp32 [nnz]: sparse_val - W_q at that position
    sparse_val: torch.Tensor  # fp16 [nnz]
    sparse_flat: torch.Tensor  # int64 [nnz]: perm position of the column * out + r
    perm: torch.Tensor  # int64 [in]: column order of the permuted dense weight


@dataclass
class PrefillIndex:
    key: tuple
    perm: torch.Tensor  # int64 [in]: storage order of the columns (each group, then the outlier columns)
    sparse_flat: torch.Tensor  # int64 [nnz]: perm position of the column * out + row
    sparse_rows: torch.Tensor  # int64 [nnz]: row of each sparse outlier (CSR expanded)


@torch.no_grad()
def prefill_index(layer) -> PrefillIndex:
    """Column order and sparse positions of the permuted, transposed dense weight; cached on the
    layer (small: no indices). Shared by ``prepare`` and the CUDA prefill path."""
    key = _key(layer)
    cached = getattr(layer, "_prefill_index", None)
    if cached is not None and cached.key == key:
        return cached
    perm = torch.cat([layer.group(b)[0].long() for b in layer.bit_widths] + [layer.outlier_channels.long()])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    crow, col = layer.sparse_crow, layer.sparse_col
    rows = torch.repeat_interleave(torch.arange(layer.out_features, device=col.device), (crow[1:] - crow[:-1]).long())
    layer._prefill_index = PrefillIndex(key, perm, inv[col.long()] * layer.out_features + rows, rows)
    return layer._prefill_index


def _key(layer) -> tuple:
    return tuple((t.data_ptr(), t._version, t.device) for t in layer.buffers())


def _quantized_values(layer, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """W_hat before sparse replacement at (rows, cols), fp32, without building the dense weight."""
    n_in = layer.in_features
    dev = cols.device
    val = torch.zeros(cols.numel(), dtype=torch.float32, device=dev)
    where = torch.full((n_in,), -1, dtype=torch.int64, device=dev)
    for b in layer.bit_widths:
        ch, pk, cb = layer.group(b)
        if ch.numel() == 0:
            continue
        where[ch.long()] = torch.arange(ch.numel(), device=dev)
        sel = torch.isin(cols, ch.long())
        j = where[cols[sel].long()]
        r = rows[sel]
        idx = torch.zeros_like(j)
        for p in range(b):
            word = pk[j, (r // BLOCK) * b + p].long() & 0xFFFFFFFF
            idx |= ((word >> (r % BLOCK)) & 1) << p
        val[sel] = cb[j, idx].float()
    if layer.outlier_channels.numel():
        where[layer.outlier_channels.long()] = torch.arange(layer.outlier_channels.numel(), device=dev)
        sel = torch.isin(cols, layer.outlier_channels.long())
        val[sel] = layer.outlier_weight[rows[sel], where[cols[sel].long()]].float()
    return val


def _channel_blocked_t(layer, b: int) -> torch.Tensor:
    """The b-bit group's indices packed along the channels, transposed: ``[ceil(n/32)*b, out]``."""
    n, out = layer.group(b)[0].numel(), layer.out_features
    res = torch.empty(-(-n // BLOCK) * b, out, dtype=torch.int32, device=layer.outlier_weight.device)
    for r0 in range(0, out, ROWS_PER_STEP):
        r1 = min(out, r0 + ROWS_PER_STEP)
        res[:, r0:r1] = pack_indices(layer.group_indices(b, r0, r1), b).t()
    return res


@torch.no_grad()
def prepare(layer) -> KernelLayout:
    """Return the layer's kernel layout, building it on first use or after its buffers changed."""
    key = _key(layer)
    cached = getattr(layer, "_kernel_layout", None)
    if cached is not None and cached.key == key:
        return cached
    groups, offset = [], 0
    for b in layer.bit_widths:
        ch, pk, cb = layer.group(b)
        groups.append(Group(b, ch.numel(), ch.contiguous(), _channel_blocked_t(layer, b), cb.contiguous(), offset))
        offset += ch.numel()
    idx = prefill_index(layer)
    crow, col = layer.sparse_crow, layer.sparse_col
    corr = layer.sparse_val.float() - _quantized_values(layer, idx.sparse_rows, col.long())
    layout = KernelLayout(
        key=key,
        groups=groups,
        outlier_channels=layer.outlier_channels.to(torch.int32).contiguous(),  # kernels read int32 ids
        outlier_weight_t=layer.outlier_weight.t().contiguous(),
        sparse_crow=crow.to(torch.int32).contiguous(),
        sparse_col=col.to(torch.int32).contiguous(),
        sparse_corr=corr.contiguous(),
        sparse_val=layer.sparse_val.contiguous(),
        sparse_flat=idx.sparse_flat,
        perm=idx.perm,
    )
    layer._kernel_layout = layout
    return layout
