"""benchmarks/quality.py with --workers (worker processes sharing one device) and the LLM-MQ score cache,
on tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from cmpq.baselines.runners import quantize_baseline

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "quality.py"


from tiny_models import clone, one_thread, tiny  # noqa: E402,F401  (one_thread: autouse)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if 33 <= i < 127 else f"<{i}>": i for i in range(128)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<0>", eos_token="<1>")


def _quality():
    spec = importlib.util.spec_from_file_location("quality", SCRIPT)
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    return q


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("m") / "tiny"
    tiny().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    return src


def _args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(src), "--quick", "--methods", "fp16", "rtn", "--bits", "3", "4", "--group-sizes", "128",
            "--datasets", "offline",
            "--calib", "offline", "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "32", "--threads", "1",
            "--out-dir", str(out), *extra]


def _cells(path: Path) -> dict:
    return {c["key"]: c for c in json.loads(path.read_text())["cells"]}


# ------------------------------------------------------------------ --workers


def _crash_hook(tmp_path: Path) -> Path:
    """A sitecustomize that makes any process importing it die (exit 7) when it quantizes RTN 4-bit."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "import cmpq.baselines.runners as r\n"
        "_real = r.quantize_baseline\n"
        "def _qb(model, tok, method, bits, *a, **k):\n"
        "    if method == 'rtn' and bits == 4:\n"
        "        os._exit(7)\n"
        "    return _real(model, tok, method, bits, *a, **k)\n"
        "r.quantize_baseline = _qb\n")
    return hook


def test_workers_crash_resume_and_match_serial(tmp_path, model_dir, monkeypatch, capsys):
    """One test, to start few worker processes (each imports torch): a run whose worker dies at RTN 4-bit
    keeps the other cells and exits 1; a second run computes only that cell (one worker); a third starts
    none; the cells equal those of a serial run."""
    q = _quality()
    assert q.main(_args(model_dir, tmp_path / "serial")) == 0
    ser = _cells(tmp_path / "serial" / "quality-tiny.json")
    par_json = tmp_path / "par" / "quality-tiny.json"

    path0 = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_crash_hook(tmp_path)), path0]))
    assert q.main(_args(model_dir, tmp_path / "par", "--workers", "2")) == 1
    out = capsys.readouterr().out
    assert "[w0] " in out and "[w1] " in out and "on 2 workers" in out and "exited with code 7" in out
    res = json.loads(par_json.read_text())
    assert sorted((c["method"], c["bits"], c["gpu_workers"]) for c in res["cells"]) == [("fp16", 16.0, 2), ("rtn", 3.0, 2)]
    assert len(res["skipped"]) == 1 and res["skipped"][0].startswith("RTN g128 4 (not run: worker")
    assert (tmp_path / "par" / "quality-tiny.md").is_file()
    first = _cells(par_json)

    monkeypatch.setenv("PYTHONPATH", path0)
    assert q.main(_args(model_dir, tmp_path / "par", "--workers", "2")) == 0
    out = capsys.readouterr().out
    assert "1 cells to run (2 already in" in out and "[w1]" not in out
    par = _cells(par_json)
    assert all(par[k] == c for k, c in first.items())  # kept, not recomputed
    assert set(ser) == set(par) and len(par) == 3
    for k, c in ser.items():
        assert par[k]["ppl"] == c["ppl"] and par[k]["effective_bits"] == c["effective_bits"]
        assert c["gpu_workers"] == 1 and par[k]["gpu_workers"] == (1 if c["bits"] == 4 else 2)
    res = json.loads(par_json.read_text())
    assert res["skipped"] == [] and res["signature"] == json.loads((tmp_path / "serial" / "quality-tiny.json").read_text())["signature"]
    md = (tmp_path / "par" / "quality-tiny.md").read_text()
    assert "worker processes shared the GPU" in md and "|*" not in md and "* |" in md
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == ["quality-tiny.json", "quality-tiny.md",
                                                                    "quality-tiny.png"]  # no queue/lock/temp left

    def no_workers(*a, **k):
        raise AssertionError("no worker should start")

    calls = []
    real = q.Bench.run
    monkeypatch.setattr(q, "run_parallel", no_workers)
    monkeypatch.setattr(q.Bench, "run", lambda self, c: calls.append(c) or real(self, c))
    assert q.main(_args(model_dir, tmp_path / "par", "--workers", "2")) == 0
    assert calls == [] and _cells(par_json) == par


def test_worker_honors_deadline(tmp_path, model_dir, capsys):
    """A worker (run in process here) starts no cell once the parent's deadline has passed."""
    q = _quality()
    out = tmp_path / "out"
    args = _args(model_dir, out)
    # the parent's half: the JSON skeleton and a queue whose deadline is already over
    assert q.main(_args(model_dir, out, "--methods", "fp16")) == 0
    res = json.loads((out / "quality-tiny.json").read_text())
    cells = [c for c in q.grid(q.argparse.Namespace(methods=["rtn"], bits=[3], group_sizes=[128], cmpq_budgets=[], paper_budgets=[], llmmq_budgets=[],
                                                     ablations=False))]
    qpath = out / "quality-tiny.queue.json"
    units = [{"cells": u, "worker": None, "status": [None] * len(u)} for u in q.units_of(cells)]
    qpath.write_text(json.dumps({"signature": res["signature"], "json": str(out / "quality-tiny.json"),
                                 "t0": time.time(), "deadline": time.time() - 1, "workers": 2, "units": units}))
    assert q.main(args + ["--worker-index", "0", "--queue", str(qpath)]) == 0
    queue = json.loads(qpath.read_text())
    assert queue["units"][0]["worker"] == 0 and queue["units"][0]["status"] == ["time"]
    assert len(_cells(out / "quality-tiny.json")) == 1
    assert "would end after the deadline" in capsys.readouterr().out


def test_worker_puts_a_cell_that_ran_out_of_memory_back_once(tmp_path, model_dir, monkeypatch, capsys):
    """A cell that runs out of GPU memory beside other workers goes back to the queue and runs again
    once the GPU is emptier (here at once: no other worker holds a cell); a second failure is final."""
    q = _quality()
    out = tmp_path / "out"
    args = _args(model_dir, out)
    assert q.main(_args(model_dir, out, "--methods", "fp16")) == 0
    res = json.loads((out / "quality-tiny.json").read_text())
    ns = q.argparse.Namespace(methods=["rtn"], bits=[3, 4], group_sizes=[128], cmpq_budgets=[], paper_budgets=[],
                              llmmq_budgets=[], ablations=False)
    units = [{"cells": u, "worker": None, "status": [None] * len(u)} for u in q.units_of(q.grid(ns))]
    qpath = out / "quality-tiny.queue.json"
    qpath.write_text(json.dumps({"signature": res["signature"], "json": str(out / "quality-tiny.json"),
                                 "t0": time.time(), "deadline": None, "workers": 2, "units": units}))
    real, calls = q.run_cell, []

    def run_cell(bench, c, *rest):
        calls.append(c["bits"])
        if c["bits"] == 4 or len(calls) == 1:  # 3 bits: out of memory once; 4 bits: every time
            return None, q.OOM + "CUDA out of memory"
        return real(bench, c, *rest)

    monkeypatch.setattr(q, "run_cell", run_cell)
    assert q.main(args + ["--worker-index", "0", "--queue", str(qpath)]) == 0
    assert calls == [3, 4, 3, 4]  # each put back once, behind the rest of the queue
    queue = json.loads(qpath.read_text())
    assert [u["status"] for u in queue["units"]] == [["done"], ["failed: out of memory: CUDA out of memory"]]
    assert queue["active"] == {}
    assert sorted(c["bits"] for c in _cells(out / "quality-tiny.json").values()) == [3, 16]
    assert capsys.readouterr().out.count("back to the queue") == 2


def test_a_unit_back_after_running_out_of_memory_waits_for_fewer_workers():
    import subprocess
    import sys

    q = _quality()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = os.getpid()
    unit = {"cells": [{}], "worker": None, "status": [None], "oom_busy": 3}
    assert q.next_unit({"units": [unit], "active": {"1": me, "2": me}}) == (None, True)  # as many as when it failed
    assert q.next_unit({"units": [unit], "active": {"1": me}}) == (0, False)  # one fewer
    assert q.next_unit({"units": [unit], "active": {"1": me, "2": gone.pid}}) == (0, False)  # a dead one is not counted
    plain = {"cells": [{}], "worker": None, "status": [None]}
    assert q.next_unit({"units": [unit, plain], "active": {}}) == (1, False)  # the others go first
    assert q.next_unit({"units": [{**plain, "worker": 1}], "active": {}}) == (None, False)


def test_units_group_llmmq():
    q = _quality()
    a = q.argparse.Namespace(methods=["fp16", "rtn", "llmmq", "hqq"], bits=[3], group_sizes=[128], cmpq_budgets=[], paper_budgets=[],
                             llmmq_budgets=[2, 3, 4], ablations=False)
    units = q.units_of(q.grid(a))
    assert [[c["method"] for c in u] for u in units] == [["fp16"], ["rtn"], ["llmmq"] * 3, ["hqq"], ["hqq"]]


# ------------------------------------------------------------------ LLM-MQ candidate cache


def test_llmmq_cache_hit_equals_fresh_computation():
    m, cache = tiny(), {}
    quantize_baseline(clone(m), None, "llmmq", 2.5, calib=IDS, device="cpu", log=None, cache=cache)
    cached, fresh = clone(m), clone(m)
    rc = quantize_baseline(cached, None, "llmmq", 3, calib=IDS, device="cpu", log=None, cache=cache)
    rf = quantize_baseline(fresh, None, "llmmq", 3, calib=IDS, device="cpu", log=None)
    assert rc.get("reused_candidates") and not rf.get("reused_candidates")
    assert rc["allocation"] == rf["allocation"] and rc["effective_bits"] == rf["effective_bits"]
    sc, sf = cached.state_dict(), fresh.state_dict()
    assert all(torch.equal(sc[k], sf[k]) for k in sf)


def test_llmmq_cache_keyed_by_model_and_calibration():
    m, cache = tiny(), {}
    quantize_baseline(clone(m), None, "llmmq", 3, calib=IDS, device="cpu", log=None, cache=cache)
    other = quantize_baseline(tiny(seed=1), None, "llmmq", 3, calib=IDS, device="cpu", log=None, cache=cache)
    assert not other.get("reused_candidates")
    ids2 = IDS.clone()
    ids2[0, 0] = (ids2[0, 0] + 1) % 128
    recal = quantize_baseline(clone(m), None, "llmmq", 3, calib=ids2, device="cpu", log=None, cache=cache)
    assert not recal.get("reused_candidates") and len(cache) == 3


def test_cmpq_variant_cells_and_bad_specs():
    import argparse

    from benchmarks import quality

    name, opts, bits = quality.parse_variant("k-means swaps:kmeans_swaps=9,row_scale=false:3.36,4.3")
    assert (name, opts, bits) == ("k-means swaps", {"kmeans_swaps": 9, "row_scale": False}, [3.36, 4.3])
    for bad in ("no colons", "x:kmeans_swaps=-1:3", "x:not_a_field=1:3", "x:kmeans_swaps=9:three"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality.parse_variant(bad)
