"""Format v3's 8-bit codebooks and narrow ids (cmpq.storage.codebook), and the allocator's byte
count against what a packed layer really stores."""

from __future__ import annotations

import pytest
import torch

from cmpq.algorithm.budget import FP16, channel_cost_bits, sparse_cost_bits
from cmpq.nn.linear import CMPQLinear
from cmpq.storage.codebook import decode, encode, id_dtype, storable


def _codebooks(seed: int, n: int, k: int, scale: float, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(n, k, generator=g) * scale + shift * scale * torch.rand(n, 1, generator=g)
    return torch.sort(cb, 1).values


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("scale,shift", [(0.02, 0.0), (0.5, 0.0), (0.02, -3.0), (1.0, 0.5)])
def test_encode_moves_entries_by_at_most_half_a_step(k, scale, shift):
    cb = _codebooks(k, 400, k, scale, shift)
    codes, bounds = encode(cb)
    assert codes.dtype == torch.uint8 and bounds.dtype == torch.float16 and bounds.shape == (400, 2)
    got = decode(codes, bounds, torch.float32)
    step = (bounds[:, 1].float() - bounds[:, 0].float()) / 255
    # half a grid step, plus the FP16 rounding of the decoded value the kernels use
    bound = step[:, None] / 2 + cb.abs() * 2**-10 + 1e-7
    assert ((got - cb).abs() <= bound).all()
    assert (got[:, 1:] >= got[:, :-1]).all(), "ascending codebooks stay ascending"
    # and 256 levels across the range: far finer than the entries themselves
    # (the bounds are rounded outward to FP16, by up to one FP16 spacing each)
    span = cb[:, -1] - cb[:, 0] + (cb[:, 0].abs() + cb[:, -1].abs()) * 2**-10
    assert (step <= span / 255 + 1e-7).all()


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_storable_is_a_fixed_point(k):
    """Quantizers assign against ``storable(cb)``; packing it later must store exactly those values."""
    for scale, shift in ((1e-3, -3.0), (0.02, 0.0), (1.0, 0.5)):
        cb = _codebooks(10 + k, 500, k, scale, shift)
        s = storable(cb)
        assert torch.equal(decode(*encode(s)).float(), s)
        # without the check (no host sync on a GPU) every round runs: the same fixed point
        assert torch.equal(storable(cb, check=False), s)
    with pytest.raises(ValueError, match="NaN or Inf"):
        storable(torch.tensor([[0.0, float("nan")]]))


def test_encode_refuses_non_finite_and_handles_flat_channels():
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(torch.tensor([[0.0, float("nan")]]))
    flat = torch.full((3, 4), 0.25)
    assert torch.equal(decode(*encode(flat)).float(), flat)


def test_id_dtype():
    assert id_dtype(576) == torch.int16 and id_dtype(32767) == torch.int16
    assert id_dtype(32768) == torch.int32 and id_dtype(53248) == torch.int32


@pytest.mark.parametrize("in_f,out_f,n_sparse", [(96, 64, 7), (200, 96, 0), (40000, 32, 40000)])
def test_allocator_cost_is_the_stored_bytes(in_f, out_f, n_sparse):
    """``channel_cost_bits``/``sparse_cost_bits`` (what the budget is met against) equal the bytes a
    packed layer of that mix holds, ids and codebook grids included."""
    counts = {2: in_f // 4, 3: in_f // 2, 4: in_f - in_f // 4 - in_f // 2 - 3}
    layer = CMPQLinear(in_f, out_f, counts, 3, n_sparse, False, device="meta")  # shapes and dtypes only
    stored = 8 * sum(layer.storage_bytes().values())
    want = sum(n * channel_cost_bits(b, out_f, in_f) for b, n in counts.items()) \
        + 3 * channel_cost_bits(FP16, out_f, in_f) + sparse_cost_bits(out_f, n_sparse, in_f)
    assert stored == want
    assert layer.q3_channels.dtype == id_dtype(in_f) and layer.sparse_crow.dtype == id_dtype(n_sparse)
