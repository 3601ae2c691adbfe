"""Codebooks in 8 bits (format v3): each channel's ``2**b`` entries as uint8 codes ``c`` on a
per-channel grid of 256 levels, entry ``= min + (max - min) * c / 255`` (``min``, ``max`` in FP16).

Why: with FP16 entries a 4-bit channel of a 576-row layer spends 256 of its 2,560 bits on its
codebook (10%); 8-bit codes plus the two FP16 bounds cost 160. The grid has 256 levels across
the channel's range while the codebook has at most 16 entries, so the rounding moves an entry by
at most ``range / 510`` (plus FP16 rounding of the result), far below the spacing of the entries
it encodes (``range / 15`` at 4 bits). The quantizers round their codebooks through this grid
(``storable``) before they assign indices and compute errors, so what is stored is what was
optimized.

``min`` is rounded down and ``max`` up to FP16, so every code lies in ``[0, 255]``. Decoding code
0 gives ``min`` and code 255 gives ``max`` exactly, so encoding decoded values finds the same
grid again: packing a ``storable`` codebook stores exactly it.
"""

from __future__ import annotations

import torch

LEVELS = 255


def _to_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (FP32) rounded to FP16 toward +inf (``up``) or -inf."""
    h = x.half()
    if up:
        return torch.where(h.float() < x, torch.nextafter(h, h.new_tensor(float("inf"))), h)
    return torch.where(h.float() > x, torch.nextafter(h, h.new_tensor(float("-inf"))), h)


def encode(cb: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [n, k], bounds fp16 [n, 2] = (min, max))`` of codebooks ``cb`` ``[n, k]``
    (``check``: refuse NaN or Inf, a host sync on a GPU; off only where the caller checks)."""
    c = cb.float()
    n, k = c.shape
    if check and c.numel() and not torch.isfinite(c).all():
        raise ValueError("codebook holds NaN or Inf")
    if k == 0 or n == 0:
        return torch.zeros(n, k, dtype=torch.uint8, device=c.device), torch.zeros(n, 2, dtype=torch.float16, device=c.device)
    lo, hi = _to_fp16(c.amin(1), up=False), _to_fp16(c.amax(1), up=True)
    step = (hi.float() - lo.float())[:, None] / LEVELS
    codes = torch.round((c - lo.float()[:, None]) / step.clamp(min=torch.finfo(torch.float32).tiny))
    codes = torch.where(step > 0, codes.clamp(0, LEVELS), 0)
    return codes.to(torch.uint8), torch.stack([lo, hi], 1)


def decode(codes: torch.Tensor, bounds: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The codebooks ``[n, k]`` that ``codes`` and ``bounds`` stand for (computed in FP32, then ``dtype``)."""
    lo, hi = bounds[:, :1].float(), bounds[:, 1:].float()
    return (lo + (hi - lo) * (codes.float() / LEVELS)).to(dtype)


def storable(cb: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``cb`` rounded to what the format stores (FP32 out): quantizers assign indices against this.

    A fixed point of ``decode(encode(.))``: the grid is found again from the decoded bounds, but the
    FP16 rounding of an entry can move it past half a level when a channel's range is tiny next to
    its values, so a second round settles those few.

    ``check``: refuse NaN or Inf (``encode``'s check, once) and stop as soon as the codebooks have
    settled. Both read the device, so on a GPU each is a host sync. ``check=False`` runs all three
    extra rounds without reading anything. A settled codebook is a fixed point, so the result is the
    same. It is for callers whose GPU is busy and that check for NaN themselves: codebook
    fine-tuning, which checks its loss. Launch-bound callers (the compensated pass) keep the check:
    there a sync costs little, and the two skipped rounds would be ~60 more launches."""
    s = decode(*encode(cb, check)).float()
    for _ in range(3):
        again = decode(*encode(s, check=False)).float()
        if check and torch.equal(again, s):
            break
        s = again
    return s


def id_dtype(n: int) -> torch.dtype:
    """Smallest signed integer type for ids in ``[0, n]``: int16 up to 32,767, else int32."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
