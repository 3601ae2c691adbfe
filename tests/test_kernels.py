"""Kernels vs the PyTorch reference (``layer.dequantize()`` + linear in float64).

On a machine without CUDA the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before Triton is first imported); shapes stay small so CI is fast.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from cmpq.kernels import dispatch  # noqa: E402
from cmpq.kernels.dequant import prefill  # noqa: E402
from cmpq.kernels.lut_gemv import decode  # noqa: E402
from cmpq.kernels.testing import random_layer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

MIXES = {  # out=67, in=300 (not multiples of any tile)
    "2bit": {2: 300},
    "4bit": {4: 300},
    "mixed": {2: 97, 3: 101, 4: 102},
    "empty-group": {2: 0, 3: 150, 4: 150},
    "one-channel": {2: 1, 3: 200, 4: 99},
}


def _layer(mix: str, outliers: bool, seed: int):
    counts = dict(MIXES[mix])
    n_act, n_sparse = (7, 23) if outliers else (0, 0)
    if n_act:  # take the outlier columns from the largest group
        b = max(counts, key=counts.get)
        counts[b] -= n_act
    gen = torch.Generator().manual_seed(seed)
    return random_layer(67, 300, counts, n_act, n_sparse, bias=outliers, device=DEV, generator=gen)


def _check(y: torch.Tensor, layer, x: torch.Tensor) -> None:
    w = layer.dequantize(torch.float32).double()
    ref = x.double() @ w.T
    if layer.bias is not None:
        ref = ref + layer.bias.double()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[x.dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("mix", list(MIXES))
def test_decode(mix, outliers, dtype):
    layer = _layer(mix, outliers, seed=hash((mix, outliers)) % 1000)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, 300, device=DEV).to(dtype)
        _check(decode(layer, x), layer, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", ["mixed", "one-channel"])
def test_prefill(mix, dtype):
    layer = _layer(mix, True, seed=7)
    x = torch.randn(2, 17, 300, device=DEV).to(dtype)
    y = prefill(layer, x)
    _check(y.reshape(-1, 67), layer, x.reshape(-1, 300))


def test_decode_splits_and_batch_dims():
    layer = _layer("mixed", True, seed=3)
    x = torch.randn(2, 2, 300, device=DEV).half()
    for splits in (1, 3, 20):  # 20 splits > channel blocks: some programs get nothing
        y = decode(layer, x, block_n=32, splits=splits)
        _check(y.reshape(4, 67), layer, x.reshape(4, 300))


def test_buffers_change_invalidates_layout():
    layer = _layer("mixed", True, seed=5)
    x = torch.randn(1, 300, device=DEV).half()
    decode(layer, x)
    layer.q3_codebook.mul_(2)
    _check(decode(layer, x), layer, x)


def test_dispatch_choice(monkeypatch):
    layer = _layer("mixed", False, seed=1)
    x = torch.randn(3, 300, device=DEV).half()
    monkeypatch.setenv("CMPQ_KERNELS", "0")
    assert dispatch(layer, x) is None
    monkeypatch.delenv("CMPQ_KERNELS")
    assert dispatch(layer, x.float()) is None  # fp32: reference path
    if DEV == "cpu":
        assert dispatch(layer, x) is None  # CPU: reference path
    else:
        _check(dispatch(layer, x), layer, x)
        _check(layer(x), layer, x)
        xl = torch.randn(40, 300, device=DEV).half()  # prefill
        _check(layer(xl), layer, xl)
