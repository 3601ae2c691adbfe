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


def test_fused_experts_are_reported_not_skipped_silently(calib_ids):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    model = MixtralForCausalLM(cfg).eval()
    fused = [n for n, p in model.named_parameters() if p.dim() == 3]
    if not fused:
        pytest.skip("this transformers keeps Mixtral experts as nn.Linear modules")
    with pytest.warns(UserWarning, match="in full precision") as rec:
        q = _quantize(model, calib_ids)
    msg = str(rec[0].message)
    assert "experts" in msg and "mlp.gate" not in msg  # the router stays on purpose, unreported
    frac = q.config.quantization_config["quantized_fraction"]
    assert 0 < frac < 0.5  # the experts hold most of the blocks' weights
