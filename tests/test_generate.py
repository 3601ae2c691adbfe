"""Generation with a static KV cache: the compiled step gives the same tokens as the eager one,
and torch.compile sees a CMPQLinear as one op (no graph break)."""

import pytest
import torch

import cmpq
from cmpq.generate import generate_ids
from cmpq.nn.linear import CMPQLinear


@pytest.fixture
def quantized(tiny_llama, calib_ids):
    return cmpq.quantize(tiny_llama, None, cmpq.CMPQConfig(bits=3, algorithm="paper"), calib=calib_ids,
                         device="cpu", log=None)


def test_cached_generation_matches_full_forward(quantized, calib_ids):
    ids = calib_ids[:1, :8]
    out, pre, dec, graph = generate_ids(quantized, ids, 6)
    assert out.shape == (1, 14) and not graph and pre > 0 and dec > 0
    ref = ids
    for _ in range(6):  # greedy by full recomputation, no cache
        ref = torch.cat([ref, quantized(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_batch_gives_each_row_what_it_gives_alone(quantized, calib_ids):
    """Prompts of one length decode as one batch (the several-token kernels' end-to-end case):
    every row gets the tokens it gets alone."""
    ids = calib_ids[:3, :8]
    out, *_ = generate_ids(quantized, ids, 6)
    assert out.shape == (3, 14)
    for i in range(3):
        alone, *_ = generate_ids(quantized, ids[i:i + 1], 6)
        assert torch.equal(out[i:i + 1], alone)


def test_batch_stops_when_every_row_has_ended(quantized, calib_ids):
    ids = calib_ids[:2, :8]
    free, *_ = generate_ids(quantized, ids, 6)
    first_eos = int(free[0, 9])  # row 0's second new token: row 0 ends there, row 1 (most likely) does not
    out, *_ = generate_ids(quantized, ids, 6, eos_token_id=first_eos)
    ended = free[:, 8:] == first_eos  # [row, new token]
    n = next((n for n in range(1, 7) if bool(ended[:, :n].any(1).all())), 6)  # first n where every row ended
    assert out.shape[1] == 8 + n
    assert torch.equal(out, free[:, :8 + n])


def test_batch_refuses_a_streamer_and_bad_shapes(quantized, calib_ids):
    with pytest.raises(ValueError, match="one sequence"):
        generate_ids(quantized, calib_ids[:2, :8], 3, streamer=_Recorder(quantized))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        generate_ids(quantized, calib_ids[0, :8], 3)


def test_compiled_step_same_tokens(quantized, calib_ids, capsys):
    ids = calib_ids[:1, :8]
    torch._dynamo.reset()
    eager, *_ = generate_ids(quantized, ids, 6)
    compiled, *_ = generate_ids(quantized, ids, 6, compile=True)
    assert "failed" not in capsys.readouterr().out  # it compiled, not fell back
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
    # fused: the step's q/k/v and gate/up are cmpq::linear_group nodes (cmpq.nn.fuse's graph pass)
    fused, *_ = generate_ids(quantized, ids, 6, compile=True, fuse=True)
    assert "failed" not in capsys.readouterr().out
    assert torch.equal(fused, eager)


def test_cmpq_linear_compiles_as_one_op(quantized):
    layer = next(m for m in quantized.modules() if isinstance(m, CMPQLinear))
    x = torch.randn(3, layer.in_features)
    torch._dynamo.reset()
    f = torch.compile(lambda t: torch.relu(layer(t)) * 2, fullgraph=True)  # fullgraph: a break would raise
    torch.testing.assert_close(f(x), torch.relu(layer(x)) * 2)


def _reference(layers, x):
    """What the fused kernel computes, from the reference path (counts its calls)."""
    _reference.calls += 1
    return [torch.nn.functional.linear(x, l.dequantize(x.dtype), l.bias) for l in layers]


def test_fused_groups_same_output_and_used(quantized, calib_ids):
    from cmpq.nn.fuse import fuse_shared_inputs, unfuse

    ids = calib_ids[:1, :8]
    ref = quantized(ids).logits
    _reference.calls = 0
    n = fuse_shared_inputs(quantized, compute=_reference)
    assert n == 2 * len(quantized.model.layers)  # q/k/v and gate/up in every block
    out = quantized(ids).logits
    assert _reference.calls == n  # one computation per group: the other members took theirs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    unfuse(quantized)
    assert all(m._group is None for m in quantized.modules() if isinstance(m, CMPQLinear))


def test_fused_member_out_of_order_or_other_input_computes_itself(quantized):
    from cmpq.nn.fuse import fuse_shared_inputs

    attn = quantized.model.layers[0].self_attn
    fuse_shared_inputs(quantized, compute=_reference)
    x, other = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)

    def plain(layer, t):
        return torch.nn.functional.linear(t, layer.dequantize(t.dtype), layer.bias)

    attn.q_proj(x)
    torch.testing.assert_close(attn.k_proj(other), plain(attn.k_proj, other))  # another input
    attn.q_proj(x)
    torch.testing.assert_close(attn.v_proj(x), plain(attn.v_proj, x))  # k skipped: v not adjacent to q
    attn.q_proj(x)
    quantized.model.layers[1].mlp.up_proj(x[..., : quantized.model.layers[1].mlp.up_proj.in_features])
    torch.testing.assert_close(attn.k_proj(x), plain(attn.k_proj, x))  # another CMPQ call in between
    attn.q_proj(x)
    x.add_(1.0)  # changed in place after q saw it: version counter differs
    torch.testing.assert_close(attn.k_proj(x), plain(attn.k_proj, x))


def test_generate_with_fuse_same_tokens(quantized, calib_ids):
    ids = calib_ids[:1, :8]
    a, *_ = generate_ids(quantized, ids, 6)
    b, *_ = generate_ids(quantized, ids, 6, fuse=True)  # on CPU the kernel does not apply: plumbing only
    assert torch.equal(a, b)
    assert all(m._group is None for m in quantized.modules() if isinstance(m, CMPQLinear))


# -- `cmpq generate` as people use it: streaming, chat template, honest speed --------------------

CHAT = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


@pytest.fixture
def cmpq_folder(folder4, tmp_path, calib_ids):
    """A saved cmpq model with a character tokenizer (no chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder4).eval()
    tok = AutoTokenizer.from_pretrained(folder4)
    cmpq.quantize(model, tok, cmpq.CMPQConfig(bits=3, algorithm="paper"),
                  calib=calib_ids, device="cpu", log=None)
    return cmpq.save(model, tmp_path / "q", tokenizer=tok)


class _Recorder:
    """A streamer (put/end) that notes how many forward passes had run at each token."""

    def __init__(self, model):
        self.forwards, self.seen, self.ended = 0, [], 0
        model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def put(self, ids):
        self.seen.append((ids.reshape(-1).tolist(), self.forwards))

    def end(self):
        self.ended += 1


def test_streamer_gets_each_token_as_it_is_made(quantized, calib_ids):
    rec = _Recorder(quantized)
    out, *_ = generate_ids(quantized, calib_ids[:1, :8], 5, streamer=rec)
    new = out[0, 8:].tolist()
    assert [t for ids, _ in rec.seen for t in ids] == new  # one token per put, in order
    assert [f for _, f in rec.seen] == list(range(1, len(new) + 1))  # k-th token put after k forwards, not at the end
    assert rec.ended == 1


def test_cli_generate_streams_and_reports_decode_speed(cmpq_folder, capsys):
    from cmpq.cli import main

    assert main(["generate", str(cmpq_folder), "hi", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("hi")  # no template: the prompt is continued
    assert "prompt 2:" in cap.err and "tokens/s" in cap.err and "chat template" not in cap.err
    assert main(["generate", str(cmpq_folder), "hi", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "1 new tokens" in err and "decode n/a" in err and "tokens/s" not in err


def test_cli_generate_applies_chat_template_unless_no_chat(cmpq_folder, capsys):
    from transformers import AutoTokenizer

    from cmpq.cli import main

    tok = AutoTokenizer.from_pretrained(cmpq_folder)
    tok.chat_template = CHAT
    tok.save_pretrained(cmpq_folder)
    assert main(["generate", str(cmpq_folder), "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert f"prompt {len('<hi>A:')} (chat template)" in cap.err and not cap.out.startswith("hi")
    assert main(["generate", str(cmpq_folder), "hi", "--max-new-tokens", "2", "--device", "cpu", "--no-chat"]) == 0
    cap = capsys.readouterr()
    assert "prompt 2:" in cap.err and cap.out.startswith("hi")


def test_cli_generate_refuses_more_tokens_than_the_context(cmpq_folder, capsys):
    from cmpq.cli import main

    assert main(["generate", str(cmpq_folder), "hi", "--max-new-tokens", "255", "--device", "cpu"]) == 2
    assert "--max-new-tokens 254 or less" in capsys.readouterr().err


def test_generation_on_cpu_keeps_dense_weights(cmpq_folder):
    from cmpq.generate import load_for_generation

    model, _ = load_for_generation(str(cmpq_folder), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, CMPQLinear)]
    assert layers and all(m.cache_dense for m in layers)
    model(torch.tensor([[40, 41]]))
    assert all(m._dense_cache is not None for m in layers)  # dequantized once, reused for every token


def test_speed_is_decode_phase_only():
    from cmpq.generate import Generation

    one = Generation("", [1], 3, 1, 0.1, 1e-6, False)
    assert one.tokens_per_s is None and one.speed() == "n/a"  # no decode phase: not 1 / 1e-6
    five = Generation("", [1] * 5, 3, 5, 0.1, 2.0, False)
    assert five.tokens_per_s == pytest.approx(2.0) and five.speed() == "2.0 tokens/s"  # 4 tokens in the loop
