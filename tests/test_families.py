"""A matrix of decoder families (issue 14): each tiny random model is quantized, saved, loaded and run;
the loaded model equals the in-memory quantized one, and every matrix in the blocks is quantized."""

import importlib

import pytest
import torch

import cmpq
from cmpq.model.blocks import coverage
from cmpq.nn.linear import CMPQLinear

from tiny_models import one_thread  # noqa: F401

COMMON = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=128)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **COMMON)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, **LLAMA_LIKE)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, **LLAMA_LIKE)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, **LLAMA_LIKE)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, **LLAMA_LIKE)),  # fused qkv, gate_up
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=96, num_attention_heads=4,
                                                 word_embed_proj_dim=64, **COMMON)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                    vocab_size=256)),  # Conv1D
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=96,
                                                              num_attention_heads=4, **COMMON)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, vocab_size=256,
                                                         num_hidden_layers=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            **LLAMA_LIKE)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(moe_intermediate_size=48, num_experts=4,
                                                                num_experts_per_tok=2,
                                                                shared_expert_intermediate_size=64, **LLAMA_LIKE)),
}


def build(family: str):
    cfg_name, model_name, kw = FAMILIES[family]
    tf = importlib.import_module("transformers")
    if not hasattr(tf, cfg_name) or not hasattr(tf, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    torch.manual_seed(0)
    return getattr(tf, model_name)(getattr(tf, cfg_name)(**kw)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_save_load_forward(family, calib_ids, tmp_path):
    model = build(family)
    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5)
    q = cmpq.quantize(model, None, cfg, calib=calib_ids, device="cpu", log=None)
    frac, left = coverage(q)
    assert frac >= 0.99 and not left, left
    layers = [m for m in q.modules() if isinstance(m, CMPQLinear)]
    numel = sum(m.in_features * m.out_features for m in layers)
    eff = sum(m.effective_bits() * m.in_features * m.out_features for m in layers) / numel
    assert 3 < eff < 16  # every block matrix counted, every byte of it
    with torch.no_grad():  # what the folder stores: the unquantized parts in FP16 (a router rounded
        for p in q.parameters():  # differently could send a token to another expert)
            p.copy_(p.half().float())
    out = q(calib_ids).logits
    assert torch.isfinite(out).all()
    back = cmpq.load(cmpq.save(q, tmp_path / "m"), device="cpu")
    torch.testing.assert_close(back(calib_ids).logits, out, rtol=1e-3, atol=1e-3)
    # compiled with the shared-input pass (cmpq.nn.fuse): the same logits, whatever the family groups
    from cmpq.nn.fuse import compile_backend

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(q, backend=compile_backend("aot_eager"))(calib_ids).logits
    torch.testing.assert_close(compiled, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_default_with_fine_tuning(family, calib_ids):
    """The default (compensated, with codebook fine-tuning) on every family: the teacher states the
    sensitivity pass records are the full-precision model's last hidden states, and the student's
    logits are taken where the teacher's are (a model against its own states is at zero KL, whatever
    the family does to its logits after ``lm_head``)."""
    from cmpq.model import sensitivity
    from cmpq.model.distill import _mean_kl, recording_head_inputs, teacher_states

    model = build(family)
    cpu = torch.device("cpu")
    expected = teacher_states(model, calib_ids, cpu)
    with recording_head_inputs(model) as got:
        sensitivity.measure(model, calib_ids, cpu)
    assert torch.equal(torch.cat(got), expected)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the recorder leaves no hook behind
    cfg = cmpq.CMPQConfig(bits=4.0, kmeans_iters=5, alloc_kmeans_iters=5, finetune_epochs=1)
    q = cmpq.quantize(model, None, cfg, calib=calib_ids, device="cpu", log=None)
    frac, left = coverage(q)
    assert frac >= 0.99 and not left, left
    record = q.config.quantization_config["finetune"]
    assert record["kept_epoch"] in (0, 1) and len(record["held_out_kl"]) == 2
    states = teacher_states(q, calib_ids, cpu)
    every = torch.arange(calib_ids.shape[0])
    assert abs(_mean_kl(q, calib_ids, states, q.get_output_embeddings(), cpu, every, [])) < 1e-6
    assert torch.isfinite(q(calib_ids).logits).all()
