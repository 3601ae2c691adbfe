"""`cmpq lm-eval`: lm-evaluation-harness on a saved cmpq model, with a local task (no hub).

The local task scores three documents by rolling log-likelihood; the test recomputes the same
figure from the model's own logits, so a model lm-eval did not really run (or ran unquantized)
would not match.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'cmpq[lm-eval]'")

import cmpq  # noqa: E402
from cmpq.cli import main  # noqa: E402
from tiny_models import char_tokenizer  # noqa: E402

DOCS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
        "Quantized weights fit in less memory."]


@pytest.fixture
def quantized(tmp_path, tiny_llama, calib_ids):
    tok = char_tokenizer(eos=True)
    cfg = cmpq.CMPQConfig(bits=4.5, finetune_epochs=0)
    cmpq.quantize(tiny_llama, tok, cfg, calib=calib_ids, log=None)
    out = tmp_path / "q"
    cmpq.save(tiny_llama, out, tokenizer=tok)
    return out, tok


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    metrics = "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n"
                      for m, a in (("word_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte")))
    (d / "local.yaml").write_text(
        "task: cmpq_local_docs\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n" + metrics)
    return d


def rolling_word_perplexity(model, tok, docs: list[str]) -> float:
    """exp(-sum log p / words): each document scored after the end-of-text token, as lm-eval does."""
    ll, words = 0.0, 0
    for d in docs:
        ids = torch.tensor([[tok.eos_token_id] + tok(d, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        ll += logp.gather(-1, ids[0, 1:, None]).sum().item()
        words += len(re.split(r"\s+", d))
    return math.exp(-ll / words)


def test_lm_eval_local_task_matches_own_loglikelihood(quantized, task_dir, tmp_path, capsys):
    out, tok = quantized
    rc = main(["lm-eval", str(out), "--tasks", "cmpq_local_docs", "--include-path", str(task_dir),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    assert "cmpq_local_docs" in capsys.readouterr().out
    got = json.loads((tmp_path / "r.json").read_text())["results"]["cmpq_local_docs"]["word_perplexity,none"]
    want = rolling_word_perplexity(cmpq.load(out), tok, DOCS)
    assert got == pytest.approx(want, rel=1e-4)


def test_lm_eval_hub_task_offline_is_a_clear_error(quantized, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["lm-eval", str(quantized[0]), "--tasks", "wikitext"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch" in err and "--include-path" in err


def test_lm_eval_unknown_task_and_bad_options(quantized, capsys):
    assert main(["lm-eval", str(quantized[0]), "--tasks", "wikitxt"]) == 2
    assert "did you mean wikitext" in capsys.readouterr().err
    assert main(["lm-eval", str(quantized[0]), "--tasks", "wikitext", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["lm-eval", str(quantized[0]), "--tasks", "x", "--include-path", "/nonexistent/tasks"]) == 2
    assert "no such folder" in capsys.readouterr().err
