"""Dense bit-plane packing of 2/3/4-bit codebook indices.

``pack_indices`` packs a matrix ``[rows, cols]`` along its last dimension: columns are cut into
blocks of 32; block ``g`` of row ``r`` becomes ``bits`` int32 words, word ``p`` holding bit ``p``
of the 32 indices (index ``j`` of the block in bit ``j`` of the word). So a b-bit index costs
exactly b bits, no index straddles a word, and any width unpacks with ``(word_p >> j) & 1``.

CMPQ stores a bit-width group's indices ``I[out, n_b]`` channel by channel (``pack_channels``):
each channel's ``out`` indices are one packed row. Blocks then run along the output features,
which are multiples of 32 in practically every model, so nothing is padded; packing along the
channels instead would pad every group to 32 channels (0.27 bits/weight at 3 bits on a 576-wide
model whose 2- and 4-bit groups hold 1% of the channels each).
"""

from __future__ import annotations

import torch

BLOCK = 32
ROWS_ELEMENTS = 1 << 23  # pack_indices works on about this many indices at a time
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_shape(rows: int, cols: int, bits: int) -> tuple[int, int]:
    """Shape of the int32 tensor holding ``rows x cols`` indices of ``bits`` bits."""
    return rows, -(-cols // BLOCK) * bits


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an integer tensor ``[rows, cols]`` with values in ``[0, 2**bits)`` into int32 bit planes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit indices; supported widths are {SUPPORTED_BITS}")
    if idx.dim() != 2:
        raise ValueError(f"indices must be 2-D [rows, cols], got shape {tuple(idx.shape)}")
    rows, cols = idx.shape
    step = max(1, ROWS_ELEMENTS // max(cols, 1))
    if rows > step:  # bound the int64 temporaries (8 bytes x bits per index) on large layers
        return torch.cat([pack_indices(idx[i : i + step], bits) for i in range(0, rows, step)])
    nblk = -(-cols // BLOCK)
    padded = torch.zeros(rows, nblk * BLOCK, dtype=torch.int64, device=idx.device)
    padded[:, :cols] = idx.to(torch.int64)
    if cols and rows and (padded[:, :cols].min() < 0 or padded[:, :cols].max() >= (1 << bits)):
        raise ValueError(f"indices out of range for {bits}-bit packing")
    padded = padded.view(rows, nblk, BLOCK, 1)
    planes = torch.arange(bits, device=idx.device, dtype=torch.int64)
    lane = torch.arange(BLOCK, device=idx.device, dtype=torch.int64).view(1, 1, BLOCK, 1)
    words = (((padded >> planes) & 1) << lane).sum(dim=2)  # [rows, nblk, bits], < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32).reshape(rows, nblk * bits)


def unpack_indices(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: returns int64 ``[rows, cols]``."""
    rows, width = packed.shape
    if width % bits:
        raise ValueError(f"packed width {width} is not a multiple of bits={bits}")
    nblk = width // bits
    if cols > nblk * BLOCK or cols <= (nblk - 1) * BLOCK and cols != 0:
        raise ValueError(f"packed tensor holds {nblk} blocks of {BLOCK}, inconsistent with {cols} columns")
    words = packed.view(rows, nblk, 1, bits)  # int32; arithmetic shifts are fine under `& 1`
    lane = torch.arange(BLOCK, device=packed.device, dtype=torch.int32).view(1, 1, BLOCK, 1)
    idx = torch.zeros(rows, nblk, BLOCK, dtype=torch.int32, device=packed.device)
    for p in range(bits):  # at most 8 planes
        idx |= ((words[..., p] >> lane[..., 0]) & 1) << p
    return idx.reshape(rows, nblk * BLOCK)[:, :cols].long()


def pack_channels(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a group's indices ``[out, n]`` channel by channel: ``[n, ceil(out/32)*bits]`` int32."""
    if idx.dim() != 2:
        raise ValueError(f"indices must be 2-D [out, channels], got shape {tuple(idx.shape)}")
    return pack_indices(idx.T, bits)


def unpack_channels(packed: torch.Tensor, bits: int, out: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_channels` for output rows ``r0:r1`` (``r0`` a multiple of 32):
    int64 ``[r1 - r0, n]``."""
    r1 = out if r1 is None else r1
    if r0 % BLOCK or not 0 <= r0 <= r1 <= out:
        raise ValueError(f"row range {r0}:{r1} must start at a multiple of {BLOCK} within 0..{out}")
    nblk = -(-out // BLOCK)
    if packed.shape[-1] != nblk * bits:
        raise ValueError(f"packed tensor has {packed.shape[-1]} words per channel, expected {nblk * bits} for {out} rows")
    words = packed[:, (r0 // BLOCK) * bits : -(-r1 // BLOCK) * bits]
    return unpack_indices(words, bits, r1 - r0).T
