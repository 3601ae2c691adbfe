"""End to end on tiny random models: quantize, save, load, run; corrupt folders are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cmpq
from cmpq.model.blocks import UnsupportedModel, find_blocks
from cmpq.nn.linear import CMPQLinear
from cmpq.storage.io import FORMAT_VERSION, CorruptModelError, set_compute_dtype


def quantize_tiny(model, ids, bits=3.2):
    return cmpq.quantize(model, None, cmpq.CMPQConfig(bits=bits, algorithm="paper"), calib=ids, device="cpu", log=None)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
def test_quantize_save_load_identical(family, calib_ids, tmp_path, request):
    model = request.getfixturevalue(family)
    ref = model(calib_ids).logits
    q = quantize_tiny(model, calib_ids)
    _, blocks = find_blocks(q)
    n_linear = sum(isinstance(m, CMPQLinear) for m in blocks.modules())
    assert n_linear == len(blocks) * (7 if family == "tiny_llama" else 6)
    assert not any(type(m) is torch.nn.Linear for m in blocks.modules())
    out = q(calib_ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5  # changed, but still the same model
    qc = q.config.quantization_config
    assert qc["quant_method"] == "cmpq" and qc["bits"] == 3.2 and "user tokens" in qc["calibration"]

    path = cmpq.save(q, tmp_path / "m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    loaded = cmpq.load(path, device="cpu")
    set_compute_dtype(q, torch.float16)  # saved unquantized tensors are 16-bit
    set_compute_dtype(q, torch.float32)
    assert torch.equal(loaded(calib_ids).logits, q(calib_ids).logits)
    again = cmpq.load(cmpq.save(loaded, tmp_path / "m2"), device="cpu")
    assert torch.equal(again(calib_ids).logits, loaded(calib_ids).logits)


def test_loaded_model_generates(tiny_llama, calib_ids, tmp_path):
    loaded = cmpq.load(cmpq.save(quantize_tiny(tiny_llama, calib_ids), tmp_path / "m"), device="cpu")
    out = loaded.generate(calib_ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_weights_change_in_place_and_lm_head_stays(tiny_llama, calib_ids):
    emb = tiny_llama.model.embed_tokens.weight.clone()
    q = quantize_tiny(tiny_llama, calib_ids)
    assert q is tiny_llama
    assert torch.equal(q.model.embed_tokens.weight, emb)
    assert type(q.lm_head) is torch.nn.Linear


@pytest.fixture
def saved(tiny_llama, calib_ids, tmp_path):
    return cmpq.save(quantize_tiny(tiny_llama, calib_ids), tmp_path / "m")


def rewrite(path, fn):
    f = path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as st:
        meta = st.metadata()
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata=meta)


NAME = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.__setitem__(f"{NAME}.q3_codebook", t[f"{NAME}.q3_codebook"] * float("nan")), "q3_codebook"),
        (lambda t: t.__setitem__(f"{NAME}.q3_channels", t[f"{NAME}.q3_channels"] + 1000), "q3_channels"),
        (lambda t: t.__setitem__(f"{NAME}.q3_packed", t[f"{NAME}.q3_packed"][:, :-1].contiguous()), "q3_packed"),
        (lambda t: t.__setitem__(f"{NAME}.q3_packed", t[f"{NAME}.q3_packed"].float()), "q3_packed"),
        (lambda t: t.pop(f"{NAME}.sparse_val"), "sparse_val"),
        (lambda t: t.__setitem__(f"{NAME}.sparse_crow", t[f"{NAME}.sparse_crow"].flip(0)), "sparse_crow"),
        (lambda t: t.__setitem__("extra.tensor", torch.zeros(1)), "extra.tensor"),
    ],
)
def test_corrupt_tensors_are_refused_by_name(saved, damage, message):
    rewrite(saved, damage)
    with pytest.raises(CorruptModelError, match=message.replace(".", r"\.")):
        cmpq.load(saved, device="cpu")


def test_truncated_file_is_refused(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="truncated"):
        cmpq.load(saved, device="cpu")


def test_missing_manifest_and_wrong_version_are_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match="format_version"):
        cmpq.load(saved, device="cpu")
    for old in (1, 2):  # the channel-blocked packing; FP16 codebooks and int32 ids
        cfg["quantization_config"]["format_version"] = old
        (saved / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CorruptModelError, match="quantize the model again"):
            cmpq.load(saved, device="cpu")
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "cmpq_manifest.json").unlink()  # as save_pretrained writes it: the layout is in config.json
    with pytest.warns(UserWarning, match="no checksums"):
        cmpq.load(saved, device="cpu")
    del cfg["quantization_config"]["layers"]  # and as older cmpq wrote it, less its manifest
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match="missing cmpq_manifest.json and no 'layers'"):
        cmpq.load(saved, device="cpu")
    with pytest.raises(FileNotFoundError):
        cmpq.load(saved / "nope")


def test_failed_save_leaves_nothing(tiny_llama, calib_ids, tmp_path, monkeypatch):
    q = quantize_tiny(tiny_llama, calib_ids)
    cmpq.save(q, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    import cmpq.storage.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "_fsync_tree", boom)
    with pytest.raises(OSError, match="disk full"):
        cmpq.save(q, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before  # old folder intact
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # temp folder removed


def test_unquantized_model_cannot_be_saved(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="quantize it"):
        cmpq.save(tiny_llama, tmp_path / "m")


def test_unknown_architecture_is_named():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModel, match="Odd"):
        find_blocks(Odd())


def test_gpt2_conv1d_is_walked(calib_ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    ref = m(calib_ids).logits
    quantize_tiny(m, calib_ids, bits=4)
    out = m(calib_ids).logits
    assert sum(isinstance(x, CMPQLinear) for x in m.modules()) == 8
    assert ((out - ref).norm() / ref.norm()) < 0.3


@pytest.mark.parametrize("bits", [2.0, 2.6, 3.0, 3.5, 4.0])
def test_estimate_equals_the_real_run(tiny_llama, calib_ids, bits):
    """`cmpq estimate` counts bytes from shapes alone; it must equal what a real run stores."""
    import copy

    from cmpq.storage.estimate import estimate
    from cmpq.storage.io import bits_summary, layer_summary

    cfg = cmpq.CMPQConfig(bits=bits, algorithm="paper")
    est = estimate(copy.deepcopy(tiny_llama), cfg)
    q = cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, device="cpu", log=None)
    real = bits_summary(layer_summary(m) for m in q.modules() if isinstance(m, CMPQLinear))
    assert est["quantized_bytes"] == real["quantized_bytes"]
    assert est["effective_bits"] == pytest.approx(real["effective_bits"])
    assert est["nominal_bits"] == pytest.approx(real["nominal_bits"])


@pytest.mark.parametrize("bits", [3.6, 4.5])
def test_estimate_of_the_default_is_its_budget(tiny_llama, calib_ids, bits):
    """The compensated algorithm meets its effective budget itself (to within one channel)."""
    import copy

    from cmpq.storage.estimate import estimate
    from cmpq.storage.io import bits_summary, layer_summary

    cfg = cmpq.CMPQConfig(bits=bits, alloc_kmeans_iters=5, kmeans_iters=10)
    est = estimate(copy.deepcopy(tiny_llama), cfg)
    q = cmpq.quantize(copy.deepcopy(tiny_llama), None, cfg, calib=calib_ids, device="cpu", log=None)
    real = bits_summary(layer_summary(m) for m in q.modules() if isinstance(m, CMPQLinear))
    assert real["effective_bits"] <= bits
    widest_channel = 16 * 256 + 32  # an FP16 column of the largest layer
    assert bits * real["quantized_weights"] - 8 * real["quantized_bytes"] <= widest_channel
    assert est["effective_bits"] == pytest.approx(bits, abs=1e-3)


def test_cli_estimate(tiny_llama, tmp_path, capsys):
    from cmpq.cli import main

    tiny_llama.save_pretrained(tmp_path / "m")
    assert main(["estimate", str(tmp_path / "m"), "--bits", "2.5", "3", "--algorithm", "paper", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["bits"] for r in rows] == [2.5, 3.0] and rows[0]["effective_bits"] < rows[1]["effective_bits"]
    assert rows[0]["other_fp16_bytes"] == 2 * sum(p.numel() for n, p in tiny_llama.named_parameters()
                                                  if "layers" not in n or "norm" in n)


def test_time_split_has_phases(tiny_llama, calib_ids):
    split = quantize_tiny(tiny_llama, calib_ids).config.quantization_config["time_split_seconds"]
    by_phase = split["linears_by_phase"]
    assert set(by_phase) == {"allocation", "kmeans", "outlier_search", "packing"}
    assert all(v >= 0 for v in by_phase.values()) and by_phase["kmeans"] > 0
    assert sum(by_phase.values()) <= split["quantize_linears"] + 0.05  # the phases are parts of it



def test_bit_flip_is_refused_and_manifest_shapes_are_checked_before_allocating(tiny_llama, calib_ids, tmp_path):
    """Issue 13, items 5 and 6: a flipped bit in packed data fails the checksum; a manifest claiming
    huge layers is refused from the file's header, before any buffer of that size exists."""
    import resource

    path = cmpq.save(quantize_tiny(tiny_llama, calib_ids), tmp_path / "m")
    f = path / "model.safetensors"
    good = f.read_bytes()
    sd = load_file(f)
    name = next(k for k in sd if k.endswith("q3_packed"))
    t = sd[name].clone()
    t.view(-1)[0] ^= 1 << 7
    sd[name] = t
    save_file(sd, f, metadata={"cmpq_format_version": str(FORMAT_VERSION)})
    with pytest.raises(CorruptModelError, match="checksum"):
        cmpq.load(path, device="cpu")
    cmpq.load(path, device="cpu", verify=False)  # the opt-out reads it
    f.write_bytes(good)
    man = json.loads((path / "cmpq_manifest.json").read_text())
    for info in list(man["layers"].values())[:4]:
        info["out_features"] = 2**28
    (path / "cmpq_manifest.json").write_text(json.dumps(man))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptModelError, match="disagree|shape"):
        cmpq.load(path, device="cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below 2^28 rows


def test_row_scales_round_trip_and_v3_folders_still_load(tiny_llama, calib_ids, tmp_path):
    """The default (compensated, row scales) saves as format v4 and loads to identical logits; a
    folder without row scales marked format v3 (as cmpq wrote before v4) still loads."""
    import copy

    fresh = copy.deepcopy(tiny_llama)  # quantize works in place
    cfg = cmpq.CMPQConfig(bits=4.0, kmeans_iters=5, alloc_kmeans_iters=5, finetune_epochs=0)
    q = cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, device="cpu", log=None)
    layers = [m for m in q.modules() if isinstance(m, CMPQLinear)]
    assert all(m.row_scale is not None for m in layers)
    eff = sum(m.effective_bits() * m.in_features * m.out_features for m in layers) / sum(
        m.in_features * m.out_features for m in layers)
    assert eff <= 4.0 + 1e-9  # the scales are paid for inside the budget
    path = cmpq.save(q, tmp_path / "v4")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format_version"] == 4
    loaded = cmpq.load(path, device="cpu")
    set_compute_dtype(q, torch.float16)
    set_compute_dtype(q, torch.float32)
    assert torch.equal(loaded(calib_ids).logits, q(calib_ids).logits)
    bad = cmpq.save(loaded, tmp_path / "bad")  # a scale that is not positive is refused by name
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if k.endswith(".row_scale"))
    sd[name][0] = -1.0
    save_file(sd, bad / "model.safetensors", metadata={"cmpq_format_version": "4"})
    with pytest.raises(CorruptModelError, match="row_scale"):
        cmpq.load(bad, device="cpu", verify=False)

    plain = cmpq.quantize(fresh, None, cmpq.CMPQConfig(bits=4.0, kmeans_iters=5, alloc_kmeans_iters=5,
                                                            finetune_epochs=0, row_scale=False),
                          calib=calib_ids, device="cpu", log=None)
    old = cmpq.save(plain, tmp_path / "v3")
    cfgj = json.loads((old / "config.json").read_text())
    cfgj["quantization_config"]["format_version"] = 3
    (old / "config.json").write_text(json.dumps(cfgj))
    sd = load_file(old / "model.safetensors")
    save_file(sd, old / "model.safetensors", metadata={"cmpq_format_version": "3"})
    (old / "cmpq_manifest.json").unlink()  # its checksums and version are v4's now
    with pytest.warns(UserWarning, match="no checksums"):
        v3 = cmpq.load(old, device="cpu")
    assert all(m.row_scale is None for m in v3.modules() if isinstance(m, CMPQLinear))
    assert torch.isfinite(v3(calib_ids).logits).all()


def test_row_scale_is_refused_for_the_paper_method():
    with pytest.raises(ValueError, match="row_scale needs algorithm 'compensated'"):
        cmpq.CMPQConfig(algorithm="paper", row_scale=True)
    assert cmpq.CMPQConfig(algorithm="paper").row_scale is False and cmpq.CMPQConfig().row_scale is True
