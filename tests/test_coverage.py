"""No silent skips: cmpq reports the share of the decoder blocks' matrix weights it quantized and warns,
naming them, about matrices it left in full precision (issue 14: fused mixture-of-experts weights)."""

import warnings

import pytest
import torch

import cmpq
from cmpq.model.blocks import coverage

from tiny_models import one_thread  # noqa: F401


def _quantize(model, ids):
    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5)
    return cmpq.quantize(model, None, cfg, calib=ids, device="cpu", log=None)


def test_dense_model_is_fully_covered(tiny_llama, calib_ids):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = _quantize(tiny_llama, calib_ids)
    assert q.config.quantization_config["quantized_fraction"] == 1.0
    assert coverage(q) == (1.0, [])


def test_unknown_matrices_are_named_not_skipped_silently(tiny_llama, calib_ids):
    """A matrix parameter cmpq cannot quantize (here: an unknown module inside a block) is reported by
    name, and the fraction quantized says how much it holds."""

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(96, 512))

        def forward(self, x):
            return x

    tiny_llama.model.layers[1].odd = Odd()
    with pytest.warns(UserWarning, match="in full precision") as rec:
        q = _quantize(tiny_llama, calib_ids)
    assert "model.layers.1.odd.table" in str(rec[0].message)
    frac = q.config.quantization_config["quantized_fraction"]
    assert 0.5 < frac < 1.0


def test_skip_modules_leaves_linears_dense_on_purpose(tiny_llama, calib_ids, tmp_path):
    from torch import nn

    from cmpq.nn.linear import CMPQLinear

    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5,
                          skip_modules=["*.mlp.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # on purpose: no warning
        q = cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, device="cpu", log=None)
    assert all(type(b.mlp.down_proj) is nn.Linear for b in q.model.layers)
    assert sum(isinstance(m, CMPQLinear) for m in q.modules()) == 2 * 6
    frac, left = coverage(q)
    assert 0.5 < frac < 1 and left == []
    out = q(calib_ids).logits
    back = cmpq.load(cmpq.save(q, tmp_path / "m"), device="cpu")
    torch.testing.assert_close(back(calib_ids).logits, out, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="match no linear"):
        cmpq.quantize(tiny_llama, None, cmpq.CMPQConfig(bits=3, algorithm="paper",
                                                        skip_modules=["*.nothing"]), calib=calib_ids,
                      device="cpu", log=None)
