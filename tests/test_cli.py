"""The command line on a tiny model saved as a local folder."""

import json

import pytest
import torch

from cmpq.cli import main
from tiny_models import char_tokenizer


@pytest.fixture
def tiny_folder(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_quantize_info_eval(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_folder), "--bits", "2.5", "--algorithm", "paper", "--output", str(out),
               "--calib", "offline", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "effective bits per weight" in text and "offline corpus" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["summary"]["nominal_bits"] - 2.5) < 0.02
    assert info["summary"]["effective_bits"] > 2.5
    assert main(["eval", str(out), "--datasets", "offline", "--seqlen", "64", "--max-windows", "2",
                 "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["kind"] == "cmpq" and res["results"]["offline"]["ppl"] > 1
    # refuses to overwrite, and bad budgets fail before any work
    assert main(["quantize", str(tiny_folder), "--bits", "3", "--output", str(out)]) == 2
    assert main(["quantize", str(tiny_folder), "--bits", "5", "--algorithm", "paper", "--output", str(tmp_path / "x")]) == 2
    assert "bit budget" in capsys.readouterr().err
    assert main(["quantize", str(tiny_folder), "--bits", "17", "--output", str(tmp_path / "x")]) == 2
    assert "bit budget" in capsys.readouterr().err
    assert main(["info", str(tiny_folder)]) == 2


def test_quantize_default_meets_effective_budget(tiny_folder, tmp_path, capsys, monkeypatch):
    """The default (compensated) algorithm: --bits is the effective size, every stored byte counted;
    a budget below the narrowest width is refused with the smallest reachable size."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "q"
    args = ["--calib", "offline", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
    assert main(["quantize", str(tiny_folder), "--bits", "4.2", "--output", str(out), *args]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 4.1 < info["summary"]["effective_bits"] <= 4.2
    assert main(["quantize", str(tiny_folder), "--bits", "2", "--output", str(tmp_path / "y"), *args]) == 2
    err = capsys.readouterr().err
    assert "smallest" in err and "bits per weight" in err
    assert not (tmp_path / "y").exists()


def test_plain_loader_refuses_cmpq_folders_and_missing_weights(tiny_folder, tmp_path, capsys, monkeypatch):
    """Issue 13, item 1: never a random-weight model from a folder that is not a plain model."""
    import shutil

    import safetensors.torch as st

    from cmpq.model.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--bits", "3", "--algorithm", "paper", "--output", str(out),
                 "--calib", "offline", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="cmpq-quantized folder"):
        load_model(str(out))
    assert main(["quantize", str(out), "--bits", "3", "--output", str(tmp_path / "again")]) == 2
    assert "cmpq-quantized folder" in capsys.readouterr().err
    (out / "cmpq_manifest.json").unlink()
    with pytest.raises(ValueError, match="cmpq-quantized folder"):  # save_pretrained writes no manifest
        load_model(str(out))
    plain = tmp_path / "plain"
    shutil.copytree(tiny_folder, plain)
    f = next(plain.glob("*.safetensors"))
    sd = st.load_file(f)
    sd.pop("model.layers.1.mlp.down_proj.weight")
    st.save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_model(str(plain))


def test_output_is_never_the_input_nor_an_unrelated_folder(tiny_folder, tmp_path, capsys, monkeypatch):
    """Issue 13, item 3: --overwrite replaces only a previous cmpq output; the input is never the output."""
    import cmpq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--bits", "3", "--algorithm", "paper", "--calib", "offline", "--nsamples", "2", "--seqlen", "32",
            "--device", "cpu"]
    assert main(["quantize", str(tiny_folder), "--output", str(tiny_folder), "--overwrite", *args]) == 2
    assert "input" in capsys.readouterr().err
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["quantize", str(tiny_folder), "--output", str(user), "--overwrite", *args]) == 2
    assert "not a cmpq output" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["quantize", str(tiny_folder), "--output", str(afile), "--overwrite", *args]) == 2
    assert afile.read_text() == "x"
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--output", str(out), *args]) == 0
    assert main(["quantize", str(tiny_folder), "--output", str(out), "--overwrite", *args]) == 0  # a cmpq output
    # debris of a killed save is cleaned, and a kill between the renames is recovered
    (tmp_path / ".q.tmp-dead").mkdir()
    old = tmp_path / ".q.old-dead"
    old.mkdir()
    out.rename(old / "x")
    model = cmpq.load(old / "x", device="cpu")
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(FileExistsError):
            cmpq.save(model, out)  # refuses by default, after putting the old copy back
    assert (out / "cmpq_manifest.json").is_file()
    assert not list(tmp_path.glob(".q.*"))


def test_version_and_closed_pipe(tiny_folder):
    """`cmpq --version` exists; a reader that leaves early (`cmpq estimate ... | head -1`) ends the
    command quietly, exit 0, no traceback. stdout raises BrokenPipeError on its first write."""
    import subprocess
    import sys

    import cmpq

    r = subprocess.run([sys.executable, "-m", "cmpq.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and cmpq.__version__ in r.stdout
    code = ("import sys\n"
            "class Closed:\n"
            "    def write(self, s): raise BrokenPipeError(32, 'Broken pipe')\n"
            "    def flush(self): pass\n"
            "sys.stdout = Closed()\n"
            "from cmpq.cli import main\n"
            f"sys.exit(main(['estimate', {str(tiny_folder)!r}, '--bits', '3', '--algorithm', 'paper']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,msg", [
    (["eval", "X", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["eval", "X", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "X", "--max-windows", "0"], "--max-windows must be at least 1"),
    (["generate", "X", ""], "prompt is empty"),
    (["generate", "X", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "X", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
])
def test_bad_options_get_a_message_not_a_traceback(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tiny_folder, capsys):
    assert main(["eval", str(tiny_folder), "--device", "cuda", "--datasets", "offline"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_eval_dtype_option(tiny_folder, tmp_path):
    """--dtype picks the compute dtype: bfloat16 gives its own (close, not identical) perplexity."""
    res = {}
    for dt in ("float32", "bfloat16"):
        assert main(["eval", str(tiny_folder), "--datasets", "offline", "--seqlen", "64", "--max-windows", "2",
                     "--device", "cpu", "--dtype", dt, "--json", str(tmp_path / f"{dt}.json")]) == 0
        res[dt] = json.loads((tmp_path / f"{dt}.json").read_text())
    assert res["float32"]["kind"] == "fp32" and res["bfloat16"]["kind"] == "bf16"
    p32, p16 = (res[d]["results"]["offline"]["ppl"] for d in ("float32", "bfloat16"))
    assert p32 != p16 and abs(p32 - p16) / p32 < 0.05


def test_quantize_dtype_option(tiny_folder, tmp_path):
    """--dtype bfloat16 calibrates in bfloat16 and stores the unquantized tensors in it."""
    from safetensors import safe_open

    out = tmp_path / "qb"
    assert main(["quantize", str(tiny_folder), "--bits", "3", "--algorithm", "paper", "--output", str(out),
                 "--calib", "offline", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert main(["eval", str(out), "--datasets", "offline", "--seqlen", "32", "--max-windows", "1",
                 "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["results"]["offline"]["ppl"] > 1


def test_quantize_with_row_weighting(tiny_folder, tmp_path):
    """--row-weighting gradient runs end to end (sensitivity rows -> allocation -> codebooks) and is recorded."""
    out = tmp_path / "rw"
    assert main(["quantize", str(tiny_folder), "--bits", "4", "--output", str(out), "--calib", "offline",
                 "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--finetune-epochs", "0",
                 "--row-weighting", "gradient"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["row_weighting"] == "gradient" and abs(qc["bits"] - 4) < 1e-9
