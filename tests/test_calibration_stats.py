"""The walk's input statistics: ``WeightedHessian`` against a float64 sum written out."""

import pytest
import torch

from cmpq.model.calibration import WeightedHessian


def _reference(xs: list[torch.Tensor], w: torch.Tensor | None) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double().cpu()
    wx = x if w is None else x * w.double()[:, None]
    return wx.T @ x / x.shape[0]


def _batches(dtype, device, spread: float = 1.0):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 64, 48, generator=g) * spread).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_matches_the_float64_sum(weighted):
    xs = _batches(torch.float16, "cpu")
    n = sum(x.shape[0] * x.shape[1] for x in xs)
    tw = torch.rand(n, generator=torch.Generator().manual_seed(1)) if weighted else None
    h = WeightedHessian(48, "cpu", tw)
    for x in xs:
        h.add(x)
    ref = _reference(xs, None if tw is None else tw / tw.mean())
    assert torch.allclose(h.H.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision product is CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_on_cuda(dtype):
    """One half-precision GEMM per batch with a float32 output, and no overflow where the token
    weights are thousands of times their mean and the inputs are large (their products pass
    float16's 65,504 without the power-of-two scale)."""
    xs = _batches(dtype, "cuda", spread=30.0)
    n = sum(x.shape[0] * x.shape[1] for x in xs)
    tw = torch.rand(n, generator=torch.Generator().manual_seed(1))
    tw[0] = 5000.0 * tw.mean()  # a sink token
    for w in (None, tw):
        h = WeightedHessian(48, "cuda", w)
        for x in xs:
            h.add(x)
        assert h.half, "the half-precision path fell back to TF32"
        ref = _reference(xs, None if w is None else w / w.mean())
        zeros = WeightedHessian(48, "cuda", w)  # all-zero inputs with a huge weight: zeros, not NaN
        for x in xs:
            zeros.add(torch.zeros_like(x))
        assert torch.equal(zeros.sum, torch.zeros_like(zeros.sum))
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        assert torch.isfinite(h.sum).all()
        assert torch.allclose(h.H.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_a_torch_without_the_half_product_falls_back_once_with_a_warning(monkeypatch):
    """Where ``torch.mm(..., out_dtype=)`` is missing, the sum is the float32 one and a warning says
    so, once; the next batch does not try again."""
    xs = _batches(torch.float16, "cpu")
    calls = []

    def no_mm(*a, **k):
        calls.append(k)
        raise RuntimeError("no mm.dtype here")

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch, "mm", no_mm)
    h = WeightedHessian(48, "cpu", None)
    with pytest.warns(UserWarning, match="TF32"):
        for x in xs:
            h.add(x)
    assert len(calls) == 1 and not h.half
    assert torch.allclose(h.H.double(), _reference(xs, None), rtol=1e-4, atol=1e-5)
