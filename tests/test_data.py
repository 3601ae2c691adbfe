"""Data resolution and the evaluation protocol."""

import json

import pytest
import torch

from cmpq.data import datasets as D
from cmpq.data.tokens import calibration_windows, eval_windows
from cmpq.eval.perplexity import perplexity


class CharTokenizer:
    """One token per byte: enough to check windowing exactly."""

    def __call__(self, text, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([list(text.encode("utf-8"))])

        return Out()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = A = \r\nfirst row\r\nsecond\r\n")
    (tmp_path / "c4").mkdir()
    docs = [{"text": f"doc{i} " + "x" * 50} for i in range(1200)]
    (tmp_path / "c4" / "c4-validation.00000-of-00008.head.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "c4" / "c4-train.00000-of-01024.head.jsonl").write_text("\n".join(json.dumps(d) for d in docs[:50]))
    monkeypatch.setenv("CMPQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_wikitext_rows_joined_with_blank_lines(data_dir):
    src = D.load_text("wikitext2", "test")
    assert src.joined("\n\n") == " = A = \n\nfirst row\n\nsecond"
    w = eval_windows(CharTokenizer(), "wikitext2", seqlen=8)
    n = len(" = A = \n\nfirst row\n\nsecond") // 8
    assert w.ids.shape == (n, 8)
    assert bytes(w.ids[0].tolist()) == b" = A = \n\n"[:8]


def test_c4_new_protocol_uses_first_1100_docs_and_256_windows(data_dir):
    w = eval_windows(CharTokenizer(), "c4", seqlen=64)
    assert w.ids.shape == (256, 64)
    assert bytes(w.ids[0, :5].tolist()) == b"doc0 "
    assert "first 1100 documents" in w.description


def test_calibration_is_seeded_and_labelled(data_dir):
    a = calibration_windows(CharTokenizer(), "c4", nsamples=5, seqlen=32, seed=0)
    b = calibration_windows(CharTokenizer(), "c4", nsamples=5, seqlen=32, seed=0)
    c = calibration_windows(CharTokenizer(), "c4", nsamples=5, seqlen=32, seed=1)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (5, 32) and "seed 0" in a.description and "joined" in a.description


def test_missing_data_gives_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CMPQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.DataUnavailable, match="CMPQ_DATA_DIR.*offline"):
        D.load_text("wikitext2", "test")
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_text("imagenet", "test")
    with pytest.raises(FileNotFoundError):
        D.load_text("wikitext2", "test", path=tmp_path / "nope.txt")


def test_offline_corpus_is_split_and_labelled():
    calib, ev = D.offline_corpus("calib"), D.offline_corpus("eval")
    assert "NOT WikiText" in calib.source and "NOT WikiText" in ev.source
    assert not set(calib.documents) & set(ev.documents)
    w = eval_windows(CharTokenizer(), "offline", seqlen=256, nsamples=3)
    assert w.ids.shape == (3, 256) and "NOT WikiText" in w.description


def test_local_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        D.read_text_file(f)


def test_perplexity_of_a_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            class Out:
                logits = torch.zeros(*input_ids.shape, 50)

            return Out()

    ppl = perplexity(Uniform(), torch.randint(0, 50, (3, 16)), log=None)
    assert abs(ppl - 50) < 1e-3
