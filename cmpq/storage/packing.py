"""Dense bit-plane packing of 2/3/4-bit codebook indices.

Indices of one bit-width group form a matrix ``[rows, cols]`` (rows = output features,
cols = the group's input channels). Columns are cut into blocks of 32; block ``g`` of row
``r`` becomes ``bits`` int32 words, word ``p`` holding bit ``p`` of the 32 indices (index
``j`` of the block in bit ``j`` of the word). So a b-bit index costs exactly b bits (plus
padding of the last block to 32 columns), no index straddles a word, and a kernel unpacks
any width with the same two instructions: ``(word_p >> j) & 1``.
"""

from __future__ import annotations

import torch

BLOCK = 32
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
    nblk = -(-cols // BLOCK)
    padded = torch.zeros(rows, nblk * BLOCK, dtype=torch.int64, device=idx.device)
    padded[:, :cols] = idx.to(torch.int64)
    if cols and (padded[:, :cols].min() < 0 or padded[:, :cols].max() >= (1 << bits)):
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
