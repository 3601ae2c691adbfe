"""Round-to-nearest (RTN) group-wise uniform quantization: the common quantizer of all baselines.

Grid convention (the one of GPTQ's reference quantizer, used by every baseline here so that the
baselines differ only in their algorithm, not in their grid): per group, asymmetric min-max over the
group's actual values with the range widened to contain 0, ``scale = (max - min) / (2^b - 1)`` and an
integer zero point ``zero = round(-min / scale)`` in ``[0, 2^b - 1]`` (so it fits in ``b`` bits and 0
is exactly representable). Dequantized value: ``scale * (clamp(round(w / scale) + zero, 0, 2^b-1) - zero)``.

Groups are ``group_size`` consecutive input channels (columns) of one output row. When
``in_features`` is not a multiple of ``group_size`` the last group is ragged and gets its own
scale/zero computed over its actual columns only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_bits(bits: int) -> int:
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    return 2**bits - 1


def minmax_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point over the last dim of ``w`` (keepdim), range widened to hold 0."""
    maxq = _check_bits(bits)
    wmin = w.amin(-1, keepdim=True).clamp(max=0)
    wmax = w.amax(-1, keepdim=True).clamp(min=0)
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    zero = torch.round(-wmin / scale)
    return scale, zero


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize ``w`` elementwise with broadcastable ``scale``/``zero``."""
    maxq = _check_bits(bits)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _group_size(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size >= in_features:
        return max(in_features, 1)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    return group_size


def group_params(W: Tensor, bits: int, group_size: int | None = 128) -> tuple[Tensor, Tensor]:
    """Per-group min-max ``(scale, zero)``, each ``[out, n_groups]``, ``n_groups = ceil(in / group_size)``.

    The full groups are reduced through one reshape, the ragged tail (if any) on its own columns.
    """
    out, n = W.shape
    g = _group_size(n, group_size)
    nf = n // g
    parts = []
    if nf:
        parts.append(minmax_params(W[:, : nf * g].reshape(out, nf, g), bits))
    if n % g:
        parts.append(minmax_params(W[:, nf * g :].unsqueeze(1), bits))
    scale = torch.cat([p[0] for p in parts], 1).squeeze(-1)
    zero = torch.cat([p[1] for p in parts], 1).squeeze(-1)
    return scale, zero


def quantize_groupwise(W: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None = 128) -> Tensor:
    """Fake-quantize ``W [out, in]`` with given per-group ``scale``/``zero`` ``[out, n_groups]`` (float32 out)."""
    n = W.shape[1]
    gid = torch.arange(n, device=W.device) // _group_size(n, group_size)
    return fake_quant(W.float(), scale[:, gid], zero[:, gid], bits)


def rtn_quantize(W: Tensor, bits: int, group_size: int | None = 128) -> Tensor:
    """Asymmetric min-max round-to-nearest; ``group_size=None``: one group per output row.

    Returns the dequantized weight in ``W``'s dtype.
    """
    Wf = W.detach().float()
    scale, zero = group_params(Wf, bits, group_size)
    return quantize_groupwise(Wf, scale, zero, bits, group_size).to(W.dtype)


def rtn_bits_per_weight(
    in_features: int, bits: int, group_size: int | None = 128, scale_bits: int = 16, zero_bits: int = 16
) -> float:
    """True storage cost per weight: ``bits`` plus one scale and one zero per group (ragged tail included).

    E.g. 4-bit, group 128, fp16 scale and zero: 4.25. Pass ``zero_bits=bits`` for a packed integer zero.
    """
    n_groups = math.ceil(in_features / _group_size(in_features, group_size))
    return bits + n_groups * (scale_bits + zero_bits) / in_features
