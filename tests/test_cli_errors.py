"""Issue 13: what the command line says when the input, the data or the disk is wrong.

Each case: exit code 2, one line on stderr naming the problem, no traceback, nothing half-written."""

import errno
import json
import shutil

import pytest

from cmpq.cli import main
from cmpq.storage.io import FORMAT_VERSION, MANIFEST, WEIGHTS

from test_cli import tiny_folder  # noqa: F401 - fixture: a tiny Llama (256 positions) with a tokenizer

QUICK = ["--bits", "3", "--algorithm", "paper", "--calib", "offline", "--nsamples", "2", "--seqlen", "32",
         "--device", "cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def enospc_os(filename):
    raise OSError(errno.ENOSPC, "No space left on device")


def enospc_rust(filename):
    from safetensors import SafetensorError

    # what safetensors' Rust writer raises on a full disk (checked with RLIMIT_FSIZE: "... (os error 27)")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def full_disk_at(monkeypatch, fail, where: str) -> None:
    """safetensors writes of files whose path contains ``where`` write 1000 bytes, then fail."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if where not in str(filename):
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # the write got somewhere before the disk filled
        fail(filename)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("fail", [enospc_os, enospc_rust])
def test_disk_full_during_save(fail, tiny_folder, tmp_path, capsys, monkeypatch):
    """The previous output stays byte for byte, no temp folder is left, and the message says how to
    get the work back: the run's checkpoint survives, and --resume then only saves."""
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--output", str(out), *QUICK]) == 0
    before = snapshot(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        full_disk_at(m, fail, ".q.tmp-")
        assert main(["quantize", str(tiny_folder), "--output", str(out), "--overwrite", *QUICK]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "previous q is intact" in err and "--resume" in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "q", "q.partial"]
    assert main(["quantize", str(tiny_folder), "--output", str(out), "--overwrite", "--resume", *QUICK]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "q"]


def test_disk_full_during_checkpoint(tiny_folder, tmp_path, capsys, monkeypatch):
    """Block 1's checkpoint write fails: block 0 stays in the checkpoint, nothing else is written."""
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        full_disk_at(m, enospc_rust, "block_00001")
        assert main(["quantize", str(tiny_folder), "--output", str(out), *QUICK]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "block_00001" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "q.partial").iterdir()) == [
        "block_00000.safetensors", "hidden_00000.safetensors", "state.json"]
    assert not out.exists()
    assert main(["quantize", str(tiny_folder), "--output", str(out), "--resume", *QUICK]) == 0


def test_too_little_space_is_refused_before_quantizing(tiny_folder, tmp_path, capsys, monkeypatch):
    import collections

    import cmpq.storage.io as io

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--output", str(out), *QUICK]) == 2
    assert "not enough space for the output" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no output, no checkpoint: no work done


def write_bad_data(root):
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "c4").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = Title = \n text \xff\xfe here\n")
    (root / "c4" / "c4-validation.00000-of-00008.head.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "b\xc3("}\n')


@pytest.mark.parametrize("dataset,file,line", [("wikitext2", "wiki.test.raw", 2),
                                               ("c4", "c4-validation.00000-of-00008.head.jsonl", 2)])
def test_non_utf8_data_file_is_named(dataset, file, line, tiny_folder, tmp_path, capsys, monkeypatch):
    write_bad_data(tmp_path / "data")
    monkeypatch.setenv("CMPQ_DATA_DIR", str(tmp_path / "data"))
    assert main(["eval", str(tiny_folder), "--datasets", dataset, "--seqlen", "32", "--device", "cpu"]) == 2
    err = one_line_error(capsys)
    assert file in err and "not UTF-8" in err and f"line {line}" in err


def test_non_utf8_calibration_file_is_named(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"fine\nfine\n\x80oops\n")
    args = [a if a != "offline" else str(bad) for a in QUICK]
    assert main(["quantize", str(tiny_folder), "--output", str(tmp_path / "q"), *args]) == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "line 3" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("cmd", [["eval", "--datasets", "offline", "--seqlen", "32"],
                                 ["quantize", "--output", "OUT", *QUICK], ["estimate"]])
def test_model_that_is_not_there(cmd, tmp_path, capsys):
    """A missing path is not sent to the hub as a repo id; an empty folder is not blamed on sentencepiece."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    cases = {str(tmp_path / "nope"): "no such folder or file", "./nope/model": "no such folder or file",
             str(tmp_path / "empty"): "no model in it (no config.json)", str(tmp_path / "afile.txt"): "is a file"}
    for model, msg in cases.items():
        argv = [cmd[0], model, *[str(tmp_path / "q") if a == "OUT" else a for a in cmd[1:]]]
        assert main(argv) == 2, model
        err = one_line_error(capsys)
        assert msg in err and "Repo id" not in err and "sentencepiece" not in err, err
        if "nope" in model:
            assert "not a hub id" in err


@pytest.mark.parametrize("cmd", [["eval", "--datasets", "offline", "--max-windows", "1", "--device", "cpu"],
                                 ["quantize", "--output", "OUT", "--bits", "3", "--algorithm", "paper", "--calib",
                                  "offline", "--nsamples", "1", "--device", "cpu"],
                                 ["quantize", "--output", "OUT", "--method", "gptq", "--bits", "3", "--calib",
                                  "offline", "--nsamples", "1", "--device", "cpu"]])
def test_seqlen_beyond_the_models_positions(cmd, tiny_folder, tmp_path, capsys):
    """The tiny model has 256 positions: 257 is refused before any work (the default 2048 too), 256 runs.
    (rtn and hqq use no calibration, so no --seqlen: tests/test_baseline_runners.py runs rtn with the
    default 2048 on a 64-position model.)"""
    argv = [cmd[0], str(tiny_folder), *[str(tmp_path / "q") if a == "OUT" else a for a in cmd[1:]]]
    for seqlen in (["--seqlen", "257"], []):
        assert main([*argv, *seqlen]) == 2
        err = one_line_error(capsys)
        assert "256 positions" in err and "max_position_embeddings" in err and "--seqlen 256 or less" in err
        assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    if cmd[0] == "eval":
        assert main([*argv, "--seqlen", "256"]) == 0


@pytest.fixture
def quantized(tiny_folder, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--output", str(out), *QUICK]) == 0
    return out


def _edit_json(path, fn):
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


@pytest.mark.parametrize("damage,msg", [
    (lambda d: _edit_json(d / MANIFEST, lambda m: [m]), "holds a JSON list, expected an object"),
    (lambda d: _edit_json(d / MANIFEST, lambda m: {k: v for k, v in m.items() if k != "layers"}),
     "'layers' is missing"),
    (lambda d: _edit_json(d / MANIFEST, lambda m: {**m, "layers": {k: {**v, "in_features": "96"}
                                                                    for k, v in m["layers"].items()}}),
     "in_features must be an integer"),
    (lambda d: (d / MANIFEST).write_bytes(b'{"layers": "\xff"}'), "not valid JSON"),
])
def test_damaged_manifest(damage, msg, quantized, capsys):
    """eval, generate and info all refuse it by name; info no longer fails inside its own code."""
    damage(quantized)
    for argv in (["eval", str(quantized), "--datasets", "offline", "--seqlen", "32", "--device", "cpu"],
                 ["generate", str(quantized), "hi", "--max-new-tokens", "1", "--device", "cpu"],
                 ["info", str(quantized)]):
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert MANIFEST in err and msg in err, err


@pytest.mark.parametrize("edit,msg", [
    ({"model_type": "gpt2"}, "is not a linear layer of the GPT2LMHeadModel"),
    ({"model_type": "qwen2"}, "in the layout but"),  # q/k/v gain biases
    ({"intermediate_size": 128}, "in the layout but"),
    ({"num_hidden_layers": 3}, "missing tensor model.layers.2"),
    ({"model_type": "not-a-model"}, "cannot build the model"),
])
def test_config_of_another_architecture(edit, msg, quantized, capsys):
    _edit_json(quantized / "config.json", lambda c: {**c, **edit})
    assert main(["eval", str(quantized), "--datasets", "offline", "--seqlen", "32", "--device", "cpu"]) == 2
    assert msg in one_line_error(capsys)


def test_quantized_folder_without_weights(quantized, capsys):
    (quantized / WEIGHTS).unlink()
    assert main(["eval", str(quantized), "--datasets", "offline", "--seqlen", "32", "--device", "cpu"]) == 2
    assert f"missing {WEIGHTS}" in one_line_error(capsys)
    shutil.rmtree(quantized)


def test_checksum_failure_names_the_opt_out(quantized, capsys):
    """A flipped bit in packed indices: refused by its SHA-256; --no-verify reads it (other values)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(quantized / WEIGHTS)
    name = next(k for k in sd if k.endswith("q3_packed"))
    sd[name].view(-1)[0] ^= 1 << 5
    save_file(sd, quantized / WEIGHTS, metadata={"cmpq_format_version": str(FORMAT_VERSION)})
    argv = ["eval", str(quantized), "--datasets", "offline", "--seqlen", "32", "--max-windows", "1", "--device", "cpu"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert name in err and "checksum" in err and "--no-verify" in err
    assert main([*argv, "--no-verify"]) == 0
