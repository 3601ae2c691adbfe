"""Model-level baseline runners (cmpq.baselines.runners), the CLI's --method, and quality.py resumability,
on tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cmpq.baselines.runners import hqq_available, quantize_baseline

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


from tiny_models import clone, one_thread, tiny  # noqa: E402,F401  (one_thread: autouse)


IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
CASES = [("rtn", 3, {}), ("rtn", 2, {"group_size": None}), ("gptq", 3, {"group_size": 64}),
         ("gptq", 4, {"group_size": 64, "act_order": True}), ("awq", 3, {"group_size": 64}),
         ("llmmq", 2.5, {}), ("llmmq", 3, {"sensitivity": "proxy"}), ("hqq", 3, {"group_size": 64})]


@pytest.mark.parametrize("method,bits,kw", CASES, ids=[f"{m}-{b}-{k}" for m, b, k in CASES])
def test_runner_quantizes_every_linear(method, bits, kw):
    if method == "hqq" and hqq_available():
        pytest.skip(f"hqq: {hqq_available()}")
    base = tiny()
    m = clone(base)
    r = quantize_baseline(m, None, method, bits, calib=IDS, device="cpu", log=None, **kw)
    before, after = dict(base.named_parameters()), dict(m.named_parameters())
    lin = [n for n in after if ".layers." in n and n.endswith("proj.weight")]
    assert len(lin) == 14
    assert all(not torch.equal(before[n], after[n]) for n in lin)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert r["effective_bits"] > bits and r["quantized_weights"] > 0
    assert m.config.cmpq_baseline["quant_method"] == method and m.config.cmpq_baseline["fake_quantized"]
    assert torch.isfinite(m(IDS).logits).all()


def test_effective_bits_counts_ragged_group():
    """RTN g64 on in=96 (one full group + a ragged half group) and in=160: both groups charged whole."""
    m = tiny()
    r = quantize_baseline(m, None, "rtn", 4, group_size=64, device="cpu", log=None)
    sizes = {n: p.shape for n, p in m.named_parameters() if n.endswith("proj.weight") and ".layers." in n}
    tot = sum(o * i for o, i in sizes.values())
    want = sum(o * i * (4 + -(-i // 64) * 32 / i) for o, i in sizes.values()) / tot
    assert r["effective_bits"] == pytest.approx(want)


def _layer_err(base, quantized, name, x):
    W, Q = base.get_submodule(name).weight, quantized.get_submodule(name).weight
    return (x @ (W - Q).T).pow(2).sum().item()


def test_gptq_beats_rtn_on_calibration_data():
    """Layer-output error on the calibration inputs of block 0 (inputs of q/k/v: the first norm's output)."""
    base = tiny()
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    g, r = clone(base), clone(base)
    quantize_baseline(g, None, "gptq", 3, group_size=32, calib=ids, device="cpu", log=None)
    quantize_baseline(r, None, "rtn", 3, group_size=32, device="cpu", log=None)
    with torch.no_grad():
        h = base.model.layers[0].input_layernorm(base.model.embed_tokens(ids)).reshape(-1, 96)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert _layer_err(base, g, name, h) < _layer_err(base, r, name, h)


def test_awq_scales_beat_scale_one():
    m = tiny()
    r = quantize_baseline(m, None, "awq", 3, group_size=32, calib=IDS, device="cpu", log=None)
    # per block: q/k/v, gate/up, down searched; o_proj left unscaled (GQA: 2 KV heads for 4 heads,
    # so its scales could not be folded into v_proj, as in AutoAWQ)
    assert r["input_groups"] == 6 and r["unscaled_gqa_o_proj"] == 2
    assert r["scale_loss_ratio_mean"] < 1.0


def test_awq_scales_o_proj_without_gqa():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    r = quantize_baseline(LlamaForCausalLM(cfg).eval(), None, "awq", 3, group_size=32, calib=IDS, device="cpu", log=None)
    assert r["input_groups"] == 8 and r["unscaled_gqa_o_proj"] == 0


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.5, 4.0])
def test_llmmq_meets_budget(budget):
    """Sizes here: 96x96, 48x96 (k/v), 160x96, 96x160; every budget on a 1/4-bit step is reachable."""
    m = tiny()
    r = quantize_baseline(m, None, "llmmq", budget, calib=IDS, device="cpu", log=None, sensitivity="proxy")
    assert r["nominal_bits"] == pytest.approx(budget, abs=1e-9)
    sizes = {n: m.get_submodule(n).weight.numel() for n in r["allocation"]}
    avg = sum(b * sizes[n] for n, b in r["allocation"].items()) / sum(sizes.values())
    assert avg == pytest.approx(budget, abs=1e-9)


def test_llmmq_first_order_uses_gradients_and_cache():
    m, cache = tiny(), {}
    r1 = quantize_baseline(clone(m), None, "llmmq", 3, calib=IDS, device="cpu", log=None, cache=cache)
    r2 = quantize_baseline(clone(m), None, "llmmq", 3.5, calib=IDS, device="cpu", log=None, cache=cache)
    assert r1["sensitivity"] == "first_order" and r2.get("reused_candidates")
    assert r2["nominal_bits"] == pytest.approx(3.5)


def test_cli_quantize_baseline_then_eval(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from cmpq.cli import main

    src = tmp_path / "tiny"
    tiny().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    out = tmp_path / "rtn"
    assert main(["quantize", str(src), "--method", "rtn", "--bits", "3", "--group-size", "64", "-o", str(out),
                 "--device", "cpu"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["cmpq_baseline"]["quant_method"] == "rtn" and "quantization_config" not in cfg
    assert main(["eval", str(out), "--datasets", "offline", "--seqlen", "32", "--max-windows", "2", "--device", "cpu",
                 "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert "rtn" in e["kind"] and e["results"]["offline"]["ppl"] > 1
    assert AutoTokenizer.from_pretrained(out) is not None


def _tokenizer():
    """A tiny byte-level BPE tokenizer with ids < 128, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if 33 <= i < 127 else f"<{i}>": i for i in range(128)}
    vocab = {k: v for k, v in vocab.items()}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<0>", eos_token="<1>")


def test_quality_quick_is_resumable(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    src = tmp_path / "tiny"
    tiny().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    args = ["--model", str(src), "--quick", "--methods", "fp16", "rtn", "gptq", "--bits", "3", "--group-sizes", "128", "--datasets", "offline",
            "--calib", "offline", "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "32", "--out-dir", str(tmp_path)]
    assert q.main(args) == 0
    res = json.loads((tmp_path / "quality-tiny.json").read_text())
    assert len(res["cells"]) == 4 and all("ppl" in c and "effective_bits" in c for c in res["cells"])
    assert (tmp_path / "quality-tiny.md").is_file() and (tmp_path / "quality-tiny.png").is_file()

    calls = []
    real = q.Bench.run
    monkeypatch.setattr(q.Bench, "run", lambda self, c: calls.append(c) or real(self, c))
    assert q.main(args) == 0
    assert calls == []
    assert len(json.loads((tmp_path / "quality-tiny.json").read_text())["cells"]) == 4


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_shared_hessians_same_result(act_order):
    """q/k/v and gate/up read one tensor each: one Hessian and one stacked solve per such group
    (4 per Llama block instead of 7) give the very weights of one solve per linear."""
    base = tiny()
    a, b = clone(base), clone(base)
    ra = quantize_baseline(a, None, "gptq", 3, group_size=32, calib=IDS, device="cpu", log=None, act_order=act_order)
    rb = quantize_baseline(b, None, "gptq", 3, group_size=32, calib=IDS, device="cpu", log=None, act_order=act_order,
                           share_hessians=False)
    assert ra["gptq_solves"] == 2 * 4 and rb["gptq_solves"] == 2 * 7
    assert ra["effective_bits"] == rb["effective_bits"]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_gptq_static_groups_runner():
    m = tiny()
    r = quantize_baseline(m, None, "gptq", 3, group_size=32, calib=IDS, device="cpu", log=None, act_order=True,
                          static_groups=True)
    assert r["static_groups"] and r["effective_bits"] == pytest.approx(3 + 32 / 32)  # no g_idx with static groups


def test_cli_baseline_output_is_written_atomically_and_never_over_user_files(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    from cmpq.cli import main

    src = tmp_path / "tiny"
    tiny().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    args = ["quantize", str(src), "--method", "rtn", "--bits", "3", "--group-size", "64", "--device", "cpu"]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main([*args, "-o", str(user), "--overwrite"]) == 2  # a user folder is never replaced
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    out = tmp_path / "rtn"
    assert main([*args, "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a save that dies half way leaves the previous output as it was and no temp folder
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, d, **kw: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert main([*args, "--bits", "4", "-o", str(out), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rtn.")] == []
    monkeypatch.undo()
    assert main([*args, "--bits", "4", "-o", str(out), "--overwrite"]) == 0  # a previous baseline output is replaced
    assert json.loads((out / "config.json").read_text())["cmpq_baseline"]["bits"] == 4
