"""Generation with a static KV cache: the compiled step gives the same tokens as the eager one,
and torch.compile sees a CMPQLinear as one op (no graph break)."""

import pytest
import torch

import cmpq
from cmpq.generate import generate_ids
from cmpq.nn.linear import CMPQLinear


@pytest.fixture
def quantized(tiny_llama, calib_ids):
    return cmpq.quantize(tiny_llama, None, cmpq.CMPQConfig(bits=3, nsamples=4, seqlen=64), calib=calib_ids,
                         device="cpu", log=None)


def test_cached_generation_matches_full_forward(quantized, calib_ids):
    ids = calib_ids[:1, :8]
    out, pre, dec, graph = generate_ids(quantized, ids, 6)
    assert out.shape == (1, 14) and not graph and pre > 0 and dec > 0
    ref = ids
    for _ in range(6):  # greedy by full recomputation, no cache
        ref = torch.cat([ref, quantized(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_compiled_step_same_tokens(quantized, calib_ids, capsys):
    ids = calib_ids[:1, :8]
    torch._dynamo.reset()
    eager, *_ = generate_ids(quantized, ids, 6)
    compiled, *_ = generate_ids(quantized, ids, 6, compile=True)
    assert "failed" not in capsys.readouterr().out  # it compiled, not fell back
    assert torch.equal(compiled, eager)


def test_cmpq_linear_compiles_as_one_op(quantized):
    layer = next(m for m in quantized.modules() if isinstance(m, CMPQLinear))
    x = torch.randn(3, layer.in_features)
    torch._dynamo.reset()
    f = torch.compile(lambda t: torch.relu(layer(t)) * 2, fullgraph=True)  # fullgraph: a break would raise
    torch.testing.assert_close(f(x), torch.relu(layer(x)) * 2)


def test_op_refuses_a_freed_layer():
    with pytest.raises(RuntimeError, match="handle"):
        torch.ops.cmpq.linear(torch.zeros(1, 4), 10**9, 4)
