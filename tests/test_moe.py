"""Mixture-of-experts (issue 14): fused expert weights become per-expert linears and are quantized,
saved, loaded and counted like any linear."""

import copy

import pytest
import torch

import cmpq
from cmpq.model.blocks import coverage
from cmpq.model.experts import ExpertLinears, expand_fused_experts, sibling_key
from cmpq.nn.linear import CMPQLinear

from tiny_models import one_thread  # noqa: F401


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    return MixtralForCausalLM(cfg).eval()


def _qwen_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    return Qwen2MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": _mixtral, "qwen2-moe": _qwen_moe}


@pytest.mark.parametrize("family", MODELS)
def test_expansion_is_exact(family, calib_ids):
    model = MODELS[family]()
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers keeps experts as nn.Linear modules")
    ref = model(calib_ids).logits
    assert expand_fused_experts(model) == 2
    assert expand_fused_experts(model) == 0  # idempotent
    assert any(isinstance(m, ExpertLinears) for m in model.modules())
    torch.testing.assert_close(model(calib_ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm,bits", [("paper", 3), ("compensated", 4.0)])
@pytest.mark.parametrize("family", MODELS)
def test_moe_quantized_saved_loaded_and_counted(family, algorithm, bits, calib_ids, tmp_path):
    model = MODELS[family]()
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers keeps experts as nn.Linear modules")
    from cmpq.storage.estimate import estimate

    est = estimate(copy.deepcopy(model), cmpq.CMPQConfig(bits=bits, algorithm=algorithm))
    cfg = cmpq.CMPQConfig(bits=bits, algorithm=algorithm, kmeans_iters=5,
                          alloc_kmeans_iters=5, finetune_epochs=0)
    q = cmpq.quantize(model, None, cfg, calib=calib_ids, device="cpu", log=None)
    frac, left = coverage(q)
    assert frac >= 0.99 and left == [], left
    assert q.config.quantization_config["quantized_fraction"] >= 0.99
    names = [n for n, m in q.named_modules() if isinstance(m, CMPQLinear)]
    assert sum(sibling_key(n) is not None for n in names) == 2 * 4 * 2  # 2 blocks x 4 experts x 2 matrices
    assert not any(n.endswith(".gate") or n.endswith("shared_expert_gate") for n in names)  # routers stay
    n_weights = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, CMPQLinear))
    assert est["quantized_weights"] == n_weights
    with torch.no_grad():  # what the folder stores: the unquantized parts in FP16 (a router rounded
        for p in q.parameters():  # differently could send a token to another expert)
            p.copy_(p.half().float())
    out = q(calib_ids).logits
    cmpq.save(q, tmp_path / "m")
    back = cmpq.load(tmp_path / "m", device="cpu")
    torch.testing.assert_close(back(calib_ids).logits, out, rtol=1e-3, atol=1e-3)
