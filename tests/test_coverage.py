"""No silent skips: cmpq reports the share of the decoder blocks' matrix weights it quantized and warns,
naming them, about matrices it left in full precision (issue 14: fused mixture-of-experts weights)."""

import warnings

import pytest
import torch

import cmpq
from cmpq.model.blocks import coverage

from tiny_models import one_thread  # noqa: F401


def _quantize(model, ids):
    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper", nsamples=ids.shape[0], seqlen=ids.shape[1], kmeans_iters=5)
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
