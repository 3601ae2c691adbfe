"""Fine-tuning's fused weight gather and gradient scatter (``cmpq.kernels.gather_weight``): the
Triton kernels against the PyTorch forms, on CPU tensors under ``TRITON_INTERPRET=1`` (set by
conftest) and on CUDA where there is one; and a compile for sm_90 that needs no GPU."""

import pytest
import torch

from cmpq.kernels import gather_weight as gw
from hopper_compile import compile_for_hopper

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_gather_and_scatter_match_pytorch(dtype, scaled):
    g = torch.Generator().manual_seed(1)
    out_f, in_f, n = 37, 53, 300  # not multiples of the block: the masks are exercised
    values = torch.randn(n, generator=g).to(DEV)
    where = torch.randint(0, n - 20, (out_f, in_f), generator=g, dtype=torch.int32).to(DEV)  # the last 20 never read
    scale = (torch.rand(out_f, generator=g) + 0.5).to(DEV) if scaled else None
    ref = gw.gather_weight_reference(values, where, scale, dtype)
    got = gw.gather_weight(values, where, scale, dtype)
    assert got.dtype == dtype
    if DEV == "cuda" or dtype == torch.float16:
        assert torch.equal(got, ref)  # the same float32 product, rounded once to nearest
    else:  # Triton's interpreter casts float32 -> bfloat16 by truncation: at most one unit in the last place
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=0)
    grad = torch.randn(out_f, in_f, generator=g).to(DEV, dtype)
    ref_g = gw.scatter_grad_reference(grad, where, scale, n)
    got_g = gw.scatter_grad(grad, where, scale, n)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-5)  # only the order of additions differs
    assert got_g[-20:].abs().max() == 0 and ref_g.abs().max() > 0


def test_fused_path_is_for_cuda_int32_only():
    where = torch.zeros(2, 3, dtype=torch.int32)
    assert not gw.fused_available(where)  # CPU tensors take the PyTorch form
    assert not gw.fused_available(where.long())
    if DEV == "cuda":
        assert gw.fused_available(where.cuda()) and not gw.fused_available(where.cuda().long())


def test_kernels_compile_for_hopper():
    """Atomics included: the interpreter does not lower them. The scatter with 16 slots, its largest."""
    gather = {"V_ptr": "*fp32", "W_ptr": "*i32", "S_ptr": "*fp32", "O_ptr": "*fp16", "total": "i64", "in_f": "i32",
              "HAS_SCALE": "constexpr", "BLOCK": "constexpr"}
    scatter = {"G_ptr": "*fp16", "W_ptr": "*i32", "S_ptr": "*fp32", "B_ptr": "*i32", "K_ptr": "*i32", "O_ptr": "*fp32",
               "out_f": "i32", "in_f": "i32", "HAS_SCALE": "constexpr", "KMAX": "constexpr", "BR": "constexpr",
               "BC": "constexpr"}
    for name, sig, const, warps in (
            ("gather", gather, {"HAS_SCALE": True, "BLOCK": 1024}, 4),
            ("scatter", scatter, {"HAS_SCALE": True, "KMAX": gw.SLOTS, "BR": gw.ROWS, "BC": gw.COLS}, 8)):
        spills, cubin = compile_for_hopper(f"from cmpq.kernels.gather_weight import _build; fn = _build({name!r})",
                                           sig, const, num_warps=warps)
        assert spills == 0 and cubin > 0, name


@pytest.mark.parametrize("scaled", [False, True])
def test_scatter_sums_codebook_slots_per_tile(scaled):
    """With ``books`` the scatter adds a tile's gradients per column and codebook slot, then the rest
    (FP16 columns, sparse outliers, which index outside their column's codebook, codebooks wider than
    ``SLOTS``) one by one: the same sums as the PyTorch form. A layout like ``TunableLinear``'s: widths
    1..4 bits and two wider ones, one FP16 column, sparse outliers; more rows than one tile."""
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 300, 70
    bits = torch.randint(1, 5, (in_f,), generator=g)
    bits[5] = 0  # an FP16 column
    bits[7], bits[8] = 5, 8  # 32 and 256 entries: past SLOTS
    base = torch.full((in_f,), -1, dtype=torch.int32)
    size = torch.zeros(in_f, dtype=torch.int32)
    where = torch.empty(out_f, in_f, dtype=torch.int32)
    off = 0
    for c in range(in_f):
        if bits[c] == 0:
            where[:, c] = off + torch.arange(out_f, dtype=torch.int32)
            off += out_f
            continue
        k = 2 ** int(bits[c])
        base[c], size[c] = off, k
        where[:, c] = off + torch.randint(0, k, (out_f,), generator=g, dtype=torch.int32)
        off += k
    sparse = torch.randperm(out_f * in_f, generator=g)[:40]
    where.view(-1)[sparse] = off + torch.arange(40, dtype=torch.int32)
    n = off + 40
    grad = torch.randn(out_f, in_f, generator=g).half().to(DEV)
    scale = (torch.rand(out_f, generator=g) + 0.5).to(DEV) if scaled else None
    where, base, size = where.to(DEV), base.to(DEV), size.to(DEV)
    ref = gw.scatter_grad_reference(grad, where, scale, n)
    got = gw.scatter_grad(grad, where, scale, n, (base, size, int(size.max())))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ordinary = size <= gw.SLOTS  # the same sums when the layer's widest codebook fits the slots
    narrow = (torch.where(ordinary, base, -1), torch.where(ordinary, size, 0), int(size[ordinary].max()))
    torch.testing.assert_close(gw.scatter_grad(grad, where, scale, n, narrow), ref, rtol=1e-5, atol=1e-5)
