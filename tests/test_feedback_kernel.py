"""The compensated pass's column loop as one Triton launch (cmpq.kernels.feedback) against its PyTorch
loop; on a machine without CUDA the kernel runs on CPU tensors through Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the column-loop kernel cannot be tested")

from cmpq.algorithm.budget import FP16  # noqa: E402
from cmpq.algorithm.compensated import quantize_compensated  # noqa: E402
from cmpq.kernels.feedback import column_feedback, column_feedback_reference  # noqa: E402

from hopper_compile import compile_for_hopper  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _block(count: int, out_f: int, kmax: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(count, out_f, generator=g)
    EX = torch.rand(count, out_f, generator=g) < 0.05
    cent = torch.sort(torch.randn(count, kmax, generator=g), dim=1).values
    mids = torch.full((count, max(kmax - 1, 1)), torch.inf)
    if kmax > 1:
        mids[:, : kmax - 1] = (cent[:, 1:] + cent[:, :-1]) / 2
        half = kmax // 2  # every third column has a narrower codebook, padded as the pass pads it
        mids[::3, half - 1 :] = torch.inf
        cent[::3, half:] = cent[::3, half - 1 : half]
    A = torch.randn(count + 8, count, generator=g)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(A.T @ A + torch.eye(count)))
    U = torch.linalg.cholesky(Hinv, upper=True)
    return [t.to(DEV) for t in (W1, EX, mids, cent, U, U.diagonal().reciprocal())]


@pytest.mark.parametrize("count,out_f,kmax", [(128, 70, 16), (37, 5, 8), (1, 33, 4), (20, 64, 2), (6, 40, 1)])
def test_kernel_matches_the_python_loop(count, out_f, kmax):
    W1, EX, mids, cent, U, dinv = _block(count, out_f, kmax, seed=count + out_f)
    q, e, j = column_feedback(W1.clone(), EX, mids, cent, U, dinv)
    q0, e0, j0 = column_feedback_reference(W1.clone(), EX, mids, cent, U, dinv)
    # the same arithmetic in another order: an index may flip only where a value sits on a midpoint
    assert (j.long() != j0).float().mean() < 1e-3
    same = j.long() == j0
    torch.testing.assert_close(q[same], q0[same], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e[same], e0[same], rtol=1e-4, atol=1e-4)


def test_kernel_refuses_blocks_it_cannot_hold():
    W1, EX, mids, cent, U, dinv = _block(4, 8, 4, seed=0)
    with pytest.raises(ValueError, match="at most 16 entries"):
        column_feedback(W1, EX, torch.zeros(4, 31, device=DEV), torch.zeros(4, 32, device=DEV), U, dinv)
    big = torch.zeros(257, 8, device=DEV)
    with pytest.raises(ValueError, match="at most 256 columns"):
        column_feedback(big, big.bool(), torch.zeros(257, 3, device=DEV), torch.zeros(257, 4, device=DEV),
                        torch.eye(257, device=DEV), torch.ones(257, device=DEV))


def test_compensated_pass_is_the_same_with_either_loop():
    g = torch.Generator().manual_seed(3)
    out_f, in_f = 40, 150  # two lazy blocks (128 + 22), odd sizes
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    x = torch.randn(1024, in_f, generator=g) * (torch.rand(in_f, generator=g) * 3 + 0.1)
    widths = torch.tensor([2, 3, 4, 3, FP16] * (in_f // 5))
    parts = {loop: quantize_compensated(W.to(DEV), (x.T @ x).to(DEV), widths, n_sparse=12, kmeans_iters=20,
                                        row_scale=True, column_loop=loop)
             for loop in ("torch", "triton")}
    a, b = parts["torch"], parts["triton"]
    for w in a.groups:
        ch_a, idx_a, cb_a = a.groups[w]
        ch_b, idx_b, cb_b = b.groups[w]
        assert torch.equal(ch_a, ch_b)
        assert (idx_a != idx_b).float().mean() < 2e-3
        torch.testing.assert_close(cb_a.float(), cb_b.float(), rtol=2e-3, atol=2e-3)
    # identical on CPU; on a GPU fused multiply-adds may flip a value that sits on a midpoint
    assert ((a.dequantize() - b.dequantize()).abs() > 1e-4).float().mean() < 2e-3
    torch.testing.assert_close(a.outlier_weight.float(), b.outlier_weight.float(), rtol=1e-2, atol=1e-3)


def test_bad_column_loop_is_refused():
    with pytest.raises(ValueError, match="column_loop"):
        quantize_compensated(torch.randn(8, 4), torch.eye(4), torch.full((4,), 2), 0, column_loop="cuda")


def test_kernel_compiles_for_hopper_without_spills():
    sig = {n: "*fp32" for n in ("W_ptr", "MID_ptr", "CENT_ptr", "H_ptr", "DINV_ptr", "Q_ptr", "E_ptr")}
    sig |= {"EX_ptr": "*u8", "J_ptr": "*i32", "count": "i32", "out_f": "i32", "mid_stride": "i32", "kmax": "i32",
            "NMID": "constexpr", "BLOCK_C": "constexpr", "BLOCK_R": "constexpr"}
    spills, cubin = compile_for_hopper("from cmpq.kernels.feedback import _build; fn = _build()", sig,
                                       {"NMID": 15, "BLOCK_C": 128, "BLOCK_R": 32}, num_warps=4)
    assert spills == 0 and cubin > 0
