"""Codebooks in 8 bits (format v3): each channel's ``2**b`` entries as uint8 codes on a per-channel
affine grid ``min + step * code`` (``min`` and ``step`` in FP16).

Why: with FP16 entries a 4-bit channel of a 576-row layer spends 256 of its 2,560 bits on its
codebook (10%); 8-bit codes plus the two FP16 numbers cost 160. The grid has 256 levels across
the channel's range while the codebook has at most 16 entries, so the rounding moves an entry by
at most ``range / 510`` (plus FP16 rounding of the result), far below the spacing of the entries
it encodes (``range / 15`` at 4 bits). The quantizers round their codebooks through this grid
before they assign indices and compute errors, so what is stored is what was optimized.

``min`` is rounded down and ``step`` up to FP16, so every code lies in ``[0, 255]`` and the bound
holds even for channels whose range is tiny next to their values.
"""

from __future__ import annotations

import torch

LEVELS = 255


def _fp16_round(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (FP32) rounded to FP16 toward +inf (``up``) or -inf."""
    h = x.half()
    if up:
        return torch.where(h.float() < x, torch.nextafter(h, h.new_tensor(float("inf"))), h)
    return torch.where(h.float() > x, torch.nextafter(h, h.new_tensor(float("-inf"))), h)


def _codes(c: torch.Tensor, lo16: torch.Tensor, step16: torch.Tensor) -> torch.Tensor:
    s = step16.float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round((c - lo16.float()[..., None]) / s[..., None]).clamp(0, LEVELS)


def encode(cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [n, k], affine fp16 [n, 2] = (min, step))`` of codebooks ``cb`` ``[n, k]``.

    Idempotent on its own output: codebooks that are already ``decode``d values (what the
    quantizers assign against, ``storable``) come back with the same codes and grid. Their grid's
    step is found among a few FP16 steps near ``(max - min) / c`` for the top codes ``c`` it may
    have used; a fresh codebook gets the grid whose top code is 255.
    """
    c = cb.float()
    n, k = c.shape
    if c.numel() and not torch.isfinite(c).all():
        raise ValueError("codebook holds NaN or Inf")
    if k == 0 or n == 0:
        return torch.zeros(n, k, dtype=torch.uint8, device=c.device), torch.zeros(n, 2, dtype=torch.float16, device=c.device)
    lo, hi = c.amin(1), c.amax(1)
    lo16 = _fp16_round(lo, up=False)
    step16 = _fp16_round((hi - lo16.float()) / LEVELS, up=True)  # top code 255, every code in range
    codes = _codes(c, lo16, step16)
    # already on a grid? try steps near (max - min) / top for the top codes a grid may have used
    tops = torch.arange(LEVELS, LEVELS - 32, -1, device=c.device, dtype=torch.float32)
    est = ((hi - lo16.float())[:, None] / tops[None]).half()  # [n, T]
    near = [est]
    for direction in (float("inf"), float("-inf")):
        s = est
        for _ in range(3):  # FP16 rounding of the top entry can move the estimate by a few steps
            s = torch.nextafter(s, est.new_tensor(direction))
            near.append(s)
    cand = torch.cat(near, 1).clamp_min(0)  # [n, 7T]
    cc = _codes(c[:, None, :], lo16[:, None], cand)  # [n, 3T, k]
    err = (decode_parts(lo16[:, None], cand, cc, torch.float16).float() - c.half().float()[:, None]).abs().amax(-1)
    exact = (err == 0).any(1) & (c == c.half().float()).all(1)
    first = torch.argmax((err == 0).to(torch.int8), 1)
    pick = torch.arange(n, device=c.device)
    step16 = torch.where(exact, cand[pick, first], step16)
    codes = torch.where(exact[:, None], cc[pick, first], codes)
    return codes.to(torch.uint8), torch.stack([lo16, step16], 1)


def decode_parts(lo16: torch.Tensor, step16: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (lo16.float()[..., None] + step16.float()[..., None] * codes.float()).to(dtype)


def decode(codes: torch.Tensor, affine: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The codebooks ``[n, k]`` that ``codes`` and ``affine`` stand for (computed in FP32, then ``dtype``)."""
    return decode_parts(affine[:, 0], affine[:, 1], codes, dtype)


def storable(cb: torch.Tensor) -> torch.Tensor:
    """``cb`` rounded to what the format stores (FP32 out): quantizers assign indices against this.

    A fixed point of ``decode(encode(.))``, so packing the result later stores exactly these values
    (a few channels whose range is below their values' FP16 spacing need a second round)."""
    s = decode(*encode(cb), dtype=torch.float16).float()
    for _ in range(4):
        again = decode(*encode(s), dtype=torch.float16).float()
        if torch.equal(again, s):
            break
        s = again
    return s


def id_dtype(n: int) -> torch.dtype:
    """Smallest signed integer type for ids in ``[0, n]``: int16 up to 32,767, else int32."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
