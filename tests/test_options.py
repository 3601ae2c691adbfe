"""Issue 12, item 5: ``CMPQConfig`` holds the algorithm, ``RunOptions`` how a run is carried out.

Moved fields point to their new home, options are validated up front, ``options=`` and keywords
give the same model, the CLI shows the dataclasses' defaults, and what a run saves or checkpoints
records the calibration without local paths (and with the batch size, which changes the sums)."""

import copy
import json
import re
from dataclasses import fields

import pytest
import torch

import cmpq
from cmpq.config import CMPQConfig
from cmpq.options import RUN_OPTION_NAMES, RunOptions


@pytest.mark.parametrize("name, value", [("nsamples", 4), ("seqlen", 64), ("seed", 1), ("calib_batch_size", 2),
                                         ("calib", "c4"), ("device", "cpu"), ("checkpoint_dir", "x")])
def test_moved_field_points_to_run_options(name, value):
    with pytest.raises(TypeError, match=rf"CMPQConfig got {name}: a run option.*RunOptions\({name}="):
        CMPQConfig(bits=3, **{name: value})


def test_config_holds_only_the_algorithm():
    names = {f.name for f in fields(CMPQConfig)}
    assert not names & set(RUN_OPTION_NAMES)
    assert {"nsamples", "seqlen", "seed", "calib_batch_size"}.isdisjoint(CMPQConfig().to_dict())


@pytest.mark.parametrize("bad, message", [
    ({"nsamples": 0}, "nsamples must be an integer >= 1"),
    ({"nsamples": 2.5}, "nsamples must be an integer"),
    ({"seqlen": 1}, "seqlen must be an integer >= 2 .a window needs a token to predict"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": True}, "seed must be an integer"),
    ({"calib_batch_size": 0}, "calib_batch_size must be an integer >= 1"),
    ({"resume": True}, "resume=True continues a run from its checkpoint folder; pass checkpoint_dir"),
    ({"resume": "yes", "checkpoint_dir": "c"}, "resume must be True or False"),
    ({"offload_activations": 1}, "offload_activations must be True or False"),
    ({"progress": None}, "progress must be True or False"),
    ({"device": "gpu7"}, "device 'gpu7' is not a device"),
    ({"max_gpu_memory": "lots"}, "cannot read memory size 'lots'"),
    ({"max_gpu_memory": 0}, "max_gpu_memory must be a positive number of bytes"),
    ({"log": "stdout"}, "log must be a function"),
    ({"calib": 3}, "calib must be a data set name, a file path, Windows or a token tensor; got int"),
    ({"calib": torch.zeros(4)}, r"calibration tokens must be integer ids \[nsamples, seqlen\].*shape \(4,\)"),
    ({"calib": torch.zeros(2, 8)}, "calibration tokens must be integer ids.*torch.float32"),
    ({"checkpoint_dir": ""}, "checkpoint_dir must be a folder path"),
    ({"dist": object()}, "dist must be the Dist"),
])
def test_options_refuse_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        RunOptions(**bad)


def test_options_refuse_a_missing_calibration_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a data set .c4, wikitext2, offline. nor an existing"):
        RunOptions(calib=str(tmp_path / "nope.txt"))


def test_options_normalize():
    o = RunOptions(calib=None, device="cpu", max_gpu_memory="1GiB", checkpoint_dir="ck", resume=True)
    assert o.calib == "c4" and o.device == torch.device("cpu") and o.max_gpu_memory == 2**30
    assert str(o.checkpoint_dir) == "ck" and o.compute_device() == torch.device("cpu")


def _quantized(model, **how):
    from tiny_models import char_tokenizer

    m = copy.deepcopy(model)
    cmpq.quantize(m, char_tokenizer(), CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5), **how)
    return m


def test_options_and_keywords_give_the_same_model(tiny_llama):
    kw = dict(calib="offline", nsamples=3, seqlen=32, seed=5, calib_batch_size=2, device="cpu", log=None)
    a = _quantized(tiny_llama, **kw)
    b = _quantized(tiny_llama, options=RunOptions(**kw))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    qa, qb = (dict(m.config.quantization_config) for m in (a, b))
    for q in (qa, qb):
        q.pop("quantize_seconds"), q.pop("time_split_seconds")
    assert qa == qb
    assert qa["calibration_settings"] == {"source": "offline", "nsamples": 3, "seqlen": 32, "seed": 5, "batch_size": 2}
    # and the settings are really used: another seed draws other windows, another model
    c = _quantized(tiny_llama, **{**kw, "seed": 6})
    assert c.config.quantization_config["calibration"] != qa["calibration"]


def test_quantize_refuses_options_given_twice_or_misplaced(tiny_llama, calib_ids):
    cfg = CMPQConfig(bits=3, algorithm="paper")
    with pytest.raises(TypeError, match=r"either in options=RunOptions\(...\) or as keywords, not both .got options= "
                                        r"and calib=, seed=\)"):
        cmpq.quantize(tiny_llama, None, cfg, RunOptions(calib=calib_ids), calib=calib_ids, seed=1)
    with pytest.raises(TypeError, match=r"got bits: an algorithm setting, which goes in CMPQConfig\(bits=...\)"):
        cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, bits=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nsample'; run options are calib, nsamples"):
        cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, nsample=3)
    with pytest.raises(TypeError, match="options must be a cmpq.RunOptions, got str"):
        cmpq.quantize(tiny_llama, None, cfg, "c4")
    with pytest.raises(TypeError, match="config must be a cmpq.CMPQConfig, got RunOptions"):
        cmpq.quantize(tiny_llama, None, RunOptions(calib=calib_ids))


def test_cli_help_shows_the_dataclass_defaults(monkeypatch, capsys):
    from cmpq.cli import main

    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    D, R = CMPQConfig(), RunOptions()
    shown = {"--calib": R.calib, "--nsamples": R.nsamples, "--seqlen": R.seqlen, "--seed": R.seed,
             "--calib-batch-size": R.calib_batch_size, "--algorithm": D.algorithm,
             "--token-weighting": D.token_weighting, "--row-weighting": D.row_weighting, "--quantizer": D.quantizer,
             "--act-outlier-frac": D.act_outlier_frac, "--weight-outlier-frac": D.weight_outlier_frac}
    for opt, value in shown.items():  # an option's entry: its line, and the help below it when the name is long
        entry = re.search(rf"^  {opt}[ ,].*?(?=^  -|\Z)", text, re.M | re.S).group(0)
        assert " ".join(entry.split()).endswith(f"(default: {value})"), entry
    assert f"(default: {D.finetune_epochs} for compensated, 0 for paper)" in text
    # and the parser's defaults are those values, so what the help says is what runs
    from cmpq.cli import build_parser

    a = build_parser().parse_args(["quantize", "m", "--bits", "3", "-o", "out"])
    for opt, value in shown.items():
        assert getattr(a, opt[2:].replace("-", "_")) == value, opt
    for cmd in ("eval", "generate", "estimate"):  # every subcommand's numbers come with their defaults
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert re.search(r"--(seqlen|max-new-tokens|act-outlier-frac) \S+\s+.*\(default: [\d.]+\)", out), cmd


def test_saved_config_has_algorithm_and_calibration_without_paths(tiny_llama, tmp_path, monkeypatch):
    from tiny_models import char_tokenizer

    monkeypatch.setenv("CMPQ_DATA_DIR", str(tmp_path / "data"))
    mine = tmp_path / "private" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("my own text for calibration. " * 200)
    tok = char_tokenizer()
    cfg = CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5)
    cmpq.quantize(tiny_llama, tok, cfg, calib=str(mine), nsamples=2, seqlen=32, device="cpu", log=None,
                  checkpoint_dir=tmp_path / "ck")
    cmpq.save(tiny_llama, tmp_path / "q", tokenizer=tok)
    text = (tmp_path / "q" / "config.json").read_text()
    assert str(tmp_path) not in text and "/private/" not in text
    qc = json.loads(text)["quantization_config"]
    assert {k: qc[k] for k in cfg.to_dict() if k != "extra"} == {k: v for k, v in cfg.to_dict().items() if k != "extra"}
    assert qc["calibration_settings"] == {"source": "notes.txt", "nsamples": 2, "seqlen": 32, "seed": 0, "batch_size": 8}
    assert not set(qc) & {"device", "checkpoint_dir", "resume", "max_gpu_memory", "nsamples", "seqlen", "seed"}


def test_resume_refuses_another_calibration_batch_size(tiny_llama, calib_ids, tmp_path):
    """The batch size sets the summation order of the calibration statistics, so a run with another
    one may give other bits: its checkpoint is not continued."""
    from cmpq.model.calibration import SquaredNorm
    from cmpq.storage.checkpoint import CheckpointMismatch

    x = torch.randn(8, 512, 200, generator=torch.Generator().manual_seed(0))
    one, four = SquaredNorm(200, "cpu"), SquaredNorm(200, "cpu")
    one.add(x)
    for i in range(0, 8, 2):
        four.add(x[i:i + 2])
    assert not torch.equal(one.sqsum, four.sqsum)  # why it belongs in the identity

    cfg = CMPQConfig(bits=3, algorithm="paper", kmeans_iters=5)
    cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, calib_batch_size=2, device="cpu", log=None,
                  checkpoint_dir=tmp_path / "c")
    with pytest.raises(CheckpointMismatch, match="calibration_settings"):
        cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, calib_batch_size=4, device="cpu",
                      log=None, checkpoint_dir=tmp_path / "c", resume=True)
