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


def test_step_split_floor_removes_every_block_linear(tmp_path, monkeypatch):
    """studies/decode_step_split.py's floor: no linear (and no kernel for one) is left in the
    decoder blocks, the step still runs, and the split is written for every batch size."""
    from torch import nn

    path = Path(__file__).parents[1] / "studies" / "decode_step_split.py"
    spec = importlib.util.spec_from_file_location("decode_step_split", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    model = mod.decode_bench.llama(mod.decode_bench.TINY, torch.device("cpu"))
    mod.free_linears(model, 16)
    assert not any(isinstance(m, nn.Linear) for b in model.model.layers for m in b.modules())
    ids = torch.randint(0, 256, (2, 4))
    assert model(ids).logits.shape == (2, 4, 256)
    out = tmp_path / "split.json"
    monkeypatch.setattr(sys, "argv", ["decode_step_split.py", "--tiny", "--batch", "1", "2", "--out", str(out)])
    mod.main()
    d = json.loads(out.read_text())
    assert [s["batch"] for s in d["split"]] == [1, 2]
    assert {(r["variant"], r["batch"]) for r in d["rows"]} == {(v, b) for v in ("fp16", "cmpq", "floor") for b in (1, 2)}
