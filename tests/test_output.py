"""What the user sees and what a saved model says: progress bars only on a terminal, one label per
eval line, no absolute paths in saved metadata, transformers' loading bars kept quiet."""

import io

import pytest

import cmpq
from cmpq.cli import main
from cmpq.progress import bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CMPQ_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert bar(10, "x").disable  # a file, a pipe, CI: quiet
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    with bar(10, "blocks", "block") as b:
        assert not b.disable
        b.update(5)
        assert b.n == 5
    shown = tty.getvalue()  # drawn at the start (redraws are throttled), with the ETA field
    assert "blocks:" in shown and "0/10 [00:00<?" in shown
    assert bar(10, "x", enabled=False).disable
    monkeypatch.setenv("CMPQ_PROGRESS", "0")
    assert bar(10, "x").disable


def test_quantize_and_eval_show_bars_on_a_terminal(tiny_llama, calib_ids, monkeypatch):
    from cmpq.eval.perplexity import perplexity

    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    cmpq.quantize(tiny_llama, None, cmpq.CMPQConfig(bits=3, algorithm="paper"),
                  calib=calib_ids, device="cpu", log=lambda s: None)
    perplexity(tiny_llama, calib_ids, log=lambda s: None, label="offline")
    err = tty.getvalue()
    assert "blocks:" in err and "/2 [" in err and "offline:" in err and "/4 [" in err
    tty.seek(0), tty.truncate()
    perplexity(tiny_llama, calib_ids, log=None)  # a library call asking for quiet gets no bar either
    assert tty.getvalue() == ""


def test_fine_tuning_shows_a_bar_on_a_terminal_and_none_when_asked(tiny_llama, calib_ids, monkeypatch):
    """Issue 12, item 4: the fine-tuning pass (epochs x windows steps, as long as a few block walks)
    gets a bar with an ETA like the other long loops; ``progress=False`` turns every bar off."""
    import copy

    cfg = cmpq.CMPQConfig(bits=3.6, kmeans_iters=5, alloc_kmeans_iters=5, finetune_epochs=1)
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, device="cpu", log=lambda s: None)
    err = tty.getvalue()
    for what in ("calibration (sensitivity):", "blocks:", "fine-tune:"):
        assert what in err, what
    assert "teacher (full precision):" not in err  # the sensitivity pass records the teacher states
    assert "fine-tune:   0%|          | 0/4 [" in err  # 1 epoch x 4 windows
    tty.seek(0), tty.truncate()
    cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, device="cpu", log=lambda s: None,
                  progress=False)
    assert tty.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)  # not a terminal: quiet without being asked
    cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, device="cpu", log=lambda s: None)
    assert pipe.getvalue() == ""


def test_calibration_description_has_no_absolute_path(tiny_llama, tmp_path, monkeypatch):
    from tiny_models import char_tokenizer

    tok = char_tokenizer()
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.train.raw").write_text("some calibration text, repeated. " * 200)
    mine = tmp_path / "private" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("my own text for calibration. " * 200)
    monkeypatch.setenv("CMPQ_DATA_DIR", str(data))
    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper")
    cmpq.quantize(tiny_llama, tok, cfg, calib="wikitext2", nsamples=2, seqlen=32, device="cpu", log=None)
    desc = tiny_llama.config.quantization_config["calibration"]
    assert "$CMPQ_DATA_DIR/wikitext-2-raw/wiki.train.raw" in desc and str(tmp_path) not in desc
    cmpq.save(tiny_llama, tmp_path / "q", tokenizer=tok)
    saved = (tmp_path / "q" / "config.json").read_text()
    assert str(tmp_path) not in saved

    from cmpq.data.tokens import calibration_windows

    w = calibration_windows(tok, "file", 2, 32, path=str(mine))
    assert w.description.endswith("from notes.txt") and str(tmp_path) not in w.description


def test_eval_prints_each_label_once(tmp_path, folder4, capsys):
    assert main(["eval", str(folder4), "--datasets", "offline", "--seqlen", "64", "--max-windows", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "offline: offline" not in out and out.count("offline: rows joined") == 1


def test_loading_keeps_transformers_bars_quiet_and_restores_them(folder4):
    from transformers.utils import logging as hf_logging

    from cmpq.model.loading import quiet_loading

    assert hf_logging.is_progress_bar_enabled()
    with quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    model, _ = cmpq.load_model(str(folder4))  # exported at the top level
    assert hf_logging.is_progress_bar_enabled() and model.config.num_hidden_layers == 4


def test_missing_extra_names_it(tmp_path, monkeypatch, capsys):
    import cmpq.extras

    real = cmpq.extras.available
    monkeypatch.setattr(cmpq.extras, "available", lambda m: m != "gguf" and real(m))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(cmpq.extras.MissingExtra, match=r"pip install 'cmpq\[gguf\]'"):
        cmpq.load_model(str(f))
    assert main(["generate", str(f), "hi", "--device", "cpu"]) == 2
    assert "cmpq[gguf]" in capsys.readouterr().err


def test_hub_without_datasets_says_which_extra(monkeypatch):
    import cmpq.extras
    from cmpq.data import datasets as D

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(cmpq.extras, "available", lambda m: False)
    with pytest.raises(D.DataUnavailable, match=r"cmpq\[datasets\]"):
        D._hub("wikitext2", "test")
