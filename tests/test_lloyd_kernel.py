"""k-means' Lloyd loop in one Triton launch (``cmpq.kernels.lloyd``) against the PyTorch loop
(``kmeans._lloyd``): the same centroids bit for bit, on CPU tensors under ``TRITON_INTERPRET=1``
(set by conftest) or on CUDA; and through ``kmeans_1d`` with the fused loop switched on."""

import pytest
import torch

from cmpq.algorithm import kmeans

pytest.importorskip("triton")
from cmpq.kernels.lloyd import lloyd  # noqa: E402
from hopper_compile import compile_for_hopper  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sorted_rows(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None):
    """What ``kmeans._kmeans_chunk`` hands ``_lloyd``: sorted rows, prefix sums, valid counts."""
    rows, n = x.shape
    xs, order = torch.sort(torch.where(keep, x, torch.inf), dim=1)
    nvalid = keep.sum(dim=1)
    valid = torch.arange(n, device=x.device) < nvalid[:, None]
    xz = torch.where(valid, xs, 0.0).double()
    wz = valid.double() if weight is None else torch.where(valid, weight.double().gather(1, order), 0.0)
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=x.device)
    return xs, torch.cat([zero, (wz * xz).cumsum(1)], 1), torch.cat([zero, wz.cumsum(1)], 1), nvalid


@pytest.mark.parametrize("k,S,weighted,distinct", [(2, 1, False, None), (8, 2, True, None), (16, 3, False, 5),
                                                    (4, 2, True, 3), (16, 1, True, None)])
def test_fused_lloyd_matches_the_pytorch_loop(k, S, weighted, distinct):
    g = torch.Generator().manual_seed(k * 10 + S)
    rows, n = 7, 61
    x = torch.randn(rows, n, generator=g)
    if distinct:  # few distinct values: clusters run empty and are re-seeded
        x = torch.randint(0, distinct, (rows, n), generator=g).float()
    keep = torch.rand(rows, n, generator=g) > 0.15
    keep[2] = False  # a row with nothing kept
    keep[3, 1:] = False  # a row with one value
    w = torch.rand(rows, n, generator=g) + 0.1 if weighted else None
    xs, csum, cw, nvalid = (t.to(DEV) for t in _sorted_rows(x, keep, w))
    cent = torch.sort(torch.randn(rows, S, k, generator=g), dim=2).values
    if k > 3:
        cent[0, 0, k - 2:] = torch.inf  # absent slots (a smaller codebook padded into the run)
    cent = cent.to(DEV)
    for max_iter in (1, 4, 10, 100):
        a, sa = kmeans._lloyd(xs, csum, cw, nvalid, cent.clone(), max_iter)
        b, sb = lloyd(xs, csum, cw, nvalid, cent.clone(), max_iter, kmeans.CHECK_EVERY)
        assert torch.equal(a, b), max_iter
        torch.testing.assert_close(sa, sb, rtol=1e-12, atol=1e-9)  # float64 sums in another order


def test_kmeans_1d_is_the_same_with_the_fused_loop(monkeypatch):
    """Cold starts with merge-and-split moves (weights, masks, mixed codebook sizes) and warm starts,
    through ``kmeans_1d``: the fused loop gives the same codebooks."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 300, generator=g) * torch.rand(9, 1, generator=g)).to(DEV)
    keep = (torch.rand(9, 300, generator=g) > 0.05).to(DEV)
    w = (torch.rand(300, generator=g) + 0.5).to(DEV)
    ks = torch.tensor([2, 4, 8, 16, 16, 8, 4, 2, 16])
    init = torch.sort(torch.randn(9, 8, generator=g), 1).values.to(DEV)

    def both():
        return (kmeans.kmeans_1d(x, 16, keep, 30, weight=w, swaps=6, ks=ks),
                kmeans.kmeans_1d(x, 8, keep, 10, init=init, weight=w))

    monkeypatch.setattr(kmeans, "FUSED_LLOYD", "off")
    ref = both()
    calls = []
    real = kmeans._fused_lloyd
    monkeypatch.setattr(kmeans, "FUSED_LLOYD", "always")
    monkeypatch.setattr(kmeans, "_fused_lloyd", lambda *a: calls.append(1) or real(*a))
    got = both()
    assert len(calls) >= 3, "the fused loop was not used"  # the cold start, the moves, the warm start
    for r, o in zip(ref, got):
        assert torch.equal(r, o)


def test_default_runs_the_fused_loop_on_cuda_only(monkeypatch):
    """By default CPU tensors take the PyTorch loop even under the interpreter (CI's k-means stays
    fast); an unknown setting is refused, not read as off."""
    calls = []
    monkeypatch.setattr(kmeans, "_fused_lloyd", lambda *a: calls.append(1))
    assert kmeans.FUSED_LLOYD == "cuda"
    x = torch.randn(3, 40)
    kmeans.kmeans_1d(x, 4, torch.ones_like(x, dtype=torch.bool), 5)
    assert not calls
    monkeypatch.setattr(kmeans, "FUSED_LLOYD", True)
    with pytest.raises(ValueError, match="FUSED_LLOYD"):
        kmeans.kmeans_1d(x, 4, torch.ones_like(x, dtype=torch.bool), 5)


def test_kernel_compiles_for_hopper():
    """The interpreter does not lower gather, sort or the while loop; the compile does."""
    sig = {"XS": "*fp32", "CS": "*fp64", "CW": "*fp64", "NV": "*i64", "C": "*fp32", "SSE": "*fp64", "n": "i32",
           "S": "i32", "k": "i32", "max_iter": "i32", "check_every": "i32", "KP": "constexpr", "STEPS": "constexpr"}
    spills, cubin = compile_for_hopper("from cmpq.kernels.lloyd_jit import kernel as fn", sig,
                                       {"KP": 16, "STEPS": 14}, num_warps=1)
    assert spills == 0 and cubin > 0
