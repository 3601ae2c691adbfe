"""benchmarks/decode.py's CPU smoke mode (``--tiny``), with a batch: it runs, writes its JSON, and
every row says what it measured (batch, tokens/s counting every row)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode.py"


def test_tiny_batch_run_writes_rows(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("decode_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["decode.py", "--tiny", "--batch", "2", "--compile", "off", "--out", str(out)])
    mod.main()
    d = json.loads(out.read_text())
    assert d["meta"]["batch"] == 2 and "batch 2" in d["meta"]["method"]
    assert [r["model"] for r in d["rows"]] == ["tiny-llama fp16", "tiny-llama cmpq-3bit",
                                               "tiny-llama-7b-shape fp16", "tiny-llama-7b-shape cmpq-3bit"]
    for r in d["rows"]:
        assert r["batch"] == 2 and r["new_tokens"] == 8
        assert abs(r["tokens_per_s"] - 2 * r["steps_per_s"]) < 1e-6 * r["tokens_per_s"]
