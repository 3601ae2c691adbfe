"""Issue 12, item 1: cmpq folders through transformers' own API (``import cmpq`` registers the method).

from_pretrained gives the model cmpq.load gives; save_pretrained writes the tensors cmpq.save wrote;
dequantize gives plain linears; and transformers without cmpq refuses the folder instead of loading
random weights."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import cmpq
from cmpq.nn.linear import MARKER, CMPQLinear
from cmpq.storage.io import FORMAT_VERSION, CorruptModelError

from test_families import build
from tiny_models import one_thread  # noqa: F401

CFG = dict(bits=3, algorithm="paper", kmeans_iters=5)


def quantized_folder(family, calib_ids, path):
    q = cmpq.quantize(build(family), None, cmpq.CMPQConfig(**CFG), calib=calib_ids, device="cpu", log=None)
    return cmpq.save(q, path)


def tensors(folder):
    return load_file(folder / "model.safetensors")


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k


def quiet_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a save_pretrained folder has no manifest, hence no checksums
        return cmpq.load(path, device="cpu")


@pytest.fixture
def folder(calib_ids, tmp_path):
    return quantized_folder("llama", calib_ids, tmp_path / "m")


# llama: tied embeddings; qwen2: biases in CMPQ layers; gpt2: Conv1D; mixtral: fused experts stored per expert
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mixtral"])
def test_from_pretrained_equals_cmpq_load(family, calib_ids, tmp_path):
    path = quantized_folder(family, calib_ids, tmp_path / "m")
    ref = cmpq.load(path, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    names = {n for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    assert names == {n for n, m in ref.named_modules() if isinstance(m, CMPQLinear)} and names
    assert model.is_quantized and model.hf_quantizer is not None
    torch.testing.assert_close(model(calib_ids).logits, ref(calib_ids).logits, rtol=0, atol=0)
    prompt = calib_ids[:1, :6]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 12)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, do_sample=False))


def test_save_pretrained_round_trips(folder, calib_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sp")
    assert_same_tensors(tensors(folder), tensors(tmp_path / "sp"))  # the 32-bit copies go back to 16 bits
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "sp") == qc(folder)
    ref = cmpq.load(folder, device="cpu")(calib_ids).logits
    assert torch.equal(quiet_load(tmp_path / "sp")(calib_ids).logits, ref)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sp", dtype=torch.float32)
    assert torch.equal(again(calib_ids).logits, ref)
    with pytest.warns(UserWarning, match="no checksums"):
        cmpq.load(tmp_path / "sp", device="cpu")


def test_base_model_loads_without_the_head_prefix(folder, calib_ids):
    base = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(base.layers[0].self_attn.q_proj, CMPQLinear)
    ref = cmpq.load(folder, device="cpu").model(calib_ids).last_hidden_state
    assert torch.equal(base(calib_ids).last_hidden_state, ref)


def test_dequantize_gives_plain_linears(folder, calib_ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q_logits = model(calib_ids).logits
    w_hat = model.model.layers[1].mlp.down_proj.dequantize(torch.float32)
    plain = model.dequantize()
    assert not any(isinstance(m, CMPQLinear) for m in plain.modules())
    lin = plain.model.layers[1].mlp.down_proj
    assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w_hat)
    assert getattr(plain.config, "quantization_config", None) is None and not plain.is_quantized
    torch.testing.assert_close(plain(calib_ids).logits, q_logits, rtol=1e-5, atol=1e-5)


def test_older_folder_is_refused_by_from_pretrained_and_read_by_cmpq_load(folder, calib_ids):
    """A folder from before this change: layout only in the manifest, no marker tensors."""
    ref = cmpq.load(folder, device="cpu")(calib_ids).logits
    cfg = json.loads((folder / "config.json").read_text())
    markers = {f"{n}.{MARKER}" for n in cfg["quantization_config"].pop("layers")}
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = tensors(folder)
    assert markers <= sd.keys()
    sd = {k: v for k, v in sd.items() if k not in markers}
    save_file(sd, folder / "model.safetensors", metadata={"cmpq_format_version": str(FORMAT_VERSION)})
    man = json.loads((folder / "cmpq_manifest.json").read_text())
    man["sha256"] = {k: v for k, v in man["sha256"].items() if k in sd}
    (folder / "cmpq_manifest.json").write_text(json.dumps(man))
    with pytest.raises(CorruptModelError, match=r"no 'layers'.*cmpq\.load"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(cmpq.load(folder, device="cpu")(calib_ids).logits, ref)


NAME = "model.layers.0.mlp.down_proj"


def test_from_pretrained_checks_the_header_against_the_layout(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["layers"][NAME]["sparse_outliers"] += 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match=rf"{NAME}\.sparse_(col|val).*disagree"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop(f"{NAME}.q3_codebook"), "missing tensor .*q3_codebook"),
    (lambda t: t.__setitem__(f"{NAME}.q3_packed", t[f"{NAME}.q3_packed"].float()), "q3_packed has dtype"),
    (lambda t: t.__setitem__(f"{NAME}.q9_packed", torch.zeros(1)), "unexpected tensor .*q9_packed"),
    (lambda t: t.__setitem__(f"{NAME}.q3_channels", t[f"{NAME}.q3_channels"] + 1000), "q3_channels: channel id out of range"),
    (lambda t: t.__setitem__(f"{NAME}.sparse_crow", t[f"{NAME}.sparse_crow"].flip(0)), "sparse_crow"),
])
def test_from_pretrained_refuses_damaged_tensors_by_name(folder, damage, message):
    sd = tensors(folder)
    damage(sd)
    save_file(sd, folder / "model.safetensors", metadata={"cmpq_format_version": str(FORMAT_VERSION)})
    with pytest.raises(CorruptModelError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_from_pretrained_checks_the_manifest_checksums(folder, tmp_path):
    """Issue 12, item 5: a cmpq.save folder holds SHA-256 checksums; from_pretrained checks them as
    cmpq.load does. The damage here (one embedding value) passes every structural check."""
    sd = tensors(folder)
    emb = next(k for k in sd if k.endswith("embed_tokens.weight"))
    sd[emb][3, 5] += 1
    save_file(sd, folder / "model.safetensors", metadata={"cmpq_format_version": str(FORMAT_VERSION)})
    with pytest.raises(CorruptModelError, match=rf"tensor {emb} does not match its checksum in cmpq_manifest.json"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(CorruptModelError, match="does not match its checksum"):
        cmpq.load(folder, device="cpu")  # the same verdict either way
    (folder / "cmpq_manifest.json").unlink()  # no manifest (as save_pretrained writes): nothing to check against
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(folder)


PLAIN = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except Exception as e:
        print("REFUSED", type(e).__name__, e)
    else:
        print("LOADED")
    assert "cmpq" not in sys.modules
""")


def test_transformers_without_cmpq_refuses_the_folder(folder, tmp_path):
    """Without ``import cmpq`` the method is unknown (transformers only warns) and the packed tensors
    are foreign; the empty ``M.weight`` markers make the dense weights mismatch, which transformers
    raises on, instead of initialising them at random. Both writers' folders."""
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for path in (folder, tmp_path / "sp"):
        r = subprocess.run([sys.executable, "-c", PLAIN, str(path)], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "REFUSED RuntimeError" in r.stdout and "ignore_mismatched_sizes" in r.stdout, r.stdout
        assert "Unknown quantization type, got cmpq" in r.stderr
        assert "mlp.down_proj.weight" in r.stderr and "MISMATCH" in r.stderr  # the load report names the markers


def test_sharded_save_pretrained_is_read_by_both(folder, calib_ids, tmp_path):
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).save_pretrained(tmp_path / "sp",
                                                                                      max_shard_size="40KB")
    shards = sorted((tmp_path / "sp").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sp" / "model.safetensors.index.json").is_file()
    merged = {k: v for s in shards for k, v in load_file(s).items()}
    assert_same_tensors(tensors(folder), merged)
    ref = cmpq.load(folder, device="cpu")(calib_ids).logits
    assert torch.equal(quiet_load(tmp_path / "sp")(calib_ids).logits, ref)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "sp", dtype=torch.float32)(calib_ids).logits, ref)


def test_cmpq_info_reads_a_save_pretrained_folder(folder, tmp_path, capsys):
    from cmpq.cli import main

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sp")
    reports = []
    for path in (folder, tmp_path / "sp"):
        assert main(["info", str(path), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        for k in ("model", "folder_bytes", "weights_file_bytes"):  # the folders differ in files and headers
            r["summary"].pop(k)
        reports.append(r)
    assert reports[0] == reports[1]  # computed from the layout, the manifest's figures exactly


def test_quantizing_on_load_is_refused(tmp_path):
    """cmpq needs calibration data: from_pretrained cannot quantize a plain model on the fly."""
    from cmpq.integrations.transformers import CMPQHfConfig

    build("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=CMPQHfConfig(bits=3))


def test_cmpq_load_takes_a_hub_id_through_the_cache(folder, monkeypatch):
    """A repo id that is not a local folder is fetched with huggingface_hub (its normal cache);
    offline and uncached, the error says it was tried as a hub id."""
    import huggingface_hub

    from cmpq.cli import main

    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append(repo_id)
        assert "*.safetensors" in allow_patterns
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kw: str(folder / name))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    want = cmpq.load(folder, device="cpu")(ids).logits
    got = cmpq.load("someone/tiny-cmpq", device="cpu")(ids).logits
    assert calls == ["someone/tiny-cmpq"] and torch.equal(got, want)
    from cmpq.storage.io import is_cmpq_folder

    assert is_cmpq_folder("someone/tiny-cmpq")


def test_cmpq_load_offline_unknown_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="as a hub id"):
        cmpq.load("nobody-here/no-such-model", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        cmpq.load("/definitely/not/here", device="cpu")
