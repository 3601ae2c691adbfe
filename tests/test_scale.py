"""Resumable runs (kill a real process, resume, compare bytes), activation offload, the GPU memory cap."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cmpq
from cmpq.algorithm import kmeans
from cmpq.cli import main
from cmpq.model.memory import (AUTO_CHUNK_SHARE, MAX_AUTO_CHUNK_ELEMENTS, MemoryCapError, auto_chunk_elements,
                               estimate_walk_memory, parameter_bytes, parse_bytes, plan_memory, stays_resident)
from cmpq.quantize import staying_on
from cmpq.storage.checkpoint import CheckpointMismatch

TIMING_KEYS = ("quantize_seconds", "time_split_seconds", "peak_gpu_memory_gib")



def args(base, out, *extra):
    return ["quantize", str(base), "--bits", "3", "--algorithm", "paper", "--output", str(out), "--calib", "offline", "--nsamples", "4",
            "--seqlen", "64", "--calib-batch-size", "2", "--device", "cpu", *extra]


def folder_bytes(path):
    cfg = json.loads((path / "config.json").read_text())
    for k in TIMING_KEYS:
        cfg["quantization_config"].pop(k, None)
    return (path / "model.safetensors").read_bytes(), cfg, (path / "cmpq_manifest.json").read_text()


@pytest.fixture
def one_thread():
    """Byte-identity across processes needs the same CPU kernels: pin one thread (MKL may otherwise
    pick fewer threads on a busy machine and sum in another order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    torch.set_num_threads(n)


def test_killed_run_resumes_to_identical_output(folder4, tmp_path, capsys, one_thread):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args(folder4, ref, "--no-checkpoint")) == 0
    partial = tmp_path / "out.partial"

    env = {**os.environ, **one_thread, "CMPQ_TEST_DIE_AFTER_BLOCK": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "cmpq.cli", *args(folder4, out)], env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # SIGKILLed right after block 1 was checkpointed
    assert not out.exists()
    state = json.loads((partial / "state.json").read_text())
    assert state["blocks_done"] == 2
    assert sorted(f.name for f in partial.iterdir()) == [
        "block_00000.safetensors", "block_00001.safetensors", "hidden_00001.safetensors", "state.json"]

    capsys.readouterr()
    assert main(args(folder4, out)) == 2  # without --resume the partial run is refused
    assert "--resume" in capsys.readouterr().err
    assert main(args(folder4, out, "--resume", "--seed", "1")) == 2  # different calibration draw
    err = capsys.readouterr().err
    assert "different run" in err and "seed" in err and "calibration_sha256" in err

    assert main(args(folder4, out, "--resume")) == 0
    assert "resumed after block 2/4" in capsys.readouterr().out
    assert not partial.exists()  # removed once the final save succeeded
    assert folder_bytes(out) == folder_bytes(ref)


def test_api_refuses_existing_checkpoint_and_offload_is_identical(tiny_llama, calib_ids, tmp_path):
    cfg = cmpq.CMPQConfig(bits=3.2, algorithm="paper")
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    a = cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, calib_batch_size=2, device="cpu", log=None,
                      checkpoint_dir=tmp_path / "c")
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    # the dense weights of quantized layers would meet their empty `weight` markers (a size mismatch)
    tiny_llama.load_state_dict({k: v for k, v in base.items() if sa.get(k, v).shape == v.shape}, strict=False)
    with pytest.raises(CheckpointMismatch, match="resume"):
        cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, device="cpu", log=None, checkpoint_dir=tmp_path / "c")

    from transformers import LlamaForCausalLM

    fresh = LlamaForCausalLM(tiny_llama.config).eval()
    fresh.load_state_dict(base)
    b = cmpq.quantize(fresh, None, cfg, calib=calib_ids, device="cpu", log=None, offload_activations=True)
    sb = b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cmpq.save(a, tmp_path / "m")
    assert not (tmp_path / "c").exists()


def test_resume_refuses_other_weights_of_the_same_architecture(tiny_llama, calib_ids, tmp_path):
    """Issue 13, item 2: the run identity covers the weights, not only the config."""
    from transformers import LlamaForCausalLM

    cfg = cmpq.CMPQConfig(bits=3.2, algorithm="paper")
    other = LlamaForCausalLM(tiny_llama.config).eval()  # same config, other random weights
    cmpq.quantize(tiny_llama, None, cfg, calib=calib_ids, device="cpu", log=None, checkpoint_dir=tmp_path / "c")
    with pytest.raises(CheckpointMismatch):
        cmpq.quantize(other, None, cfg, calib=calib_ids, device="cpu", log=None, checkpoint_dir=tmp_path / "c",
                      resume=True)


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8 gib") == 8 * 2**30
    assert parse_bytes("12GB") == 12 * 10**9
    assert parse_bytes("1.5G") == 3 * 2**29
    assert parse_bytes("7500MiB") == 7500 * 2**20
    assert parse_bytes("4096") == 4096
    for bad in ("", "eight GiB", "8 GiBs", "-1GiB", "0", "8XB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def llama_on_meta(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**kw))


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40)


def test_estimator_on_7b_shape():
    m = llama_on_meta(**LLAMA2_7B)
    e = estimate_walk_memory(m, 128, 2048, 8, offload=False, dtype=torch.float16)
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention + MLP + two norms
    assert e.block == 2 * block
    assert e.hidden == 128 * 2048 * 4096 * 2  # 2 GiB of fp16 hidden states
    assert e.rest == 2 * (2 * 32000 * 4096 + 4096)  # embeddings, lm_head, final norm
    assert e.search == max(min(kmeans.CHUNK_ELEMENTS, 4096 * 11008) * 40, 4096 * 11008 * 24)
    off = estimate_walk_memory(m, 128, 2048, 8, offload=True, dtype=torch.float16)
    assert off.hidden == 0 and off.total < e.total
    assert 2 * 2**30 < e.total < 16 * 2**30  # the target: under 16 GiB


def test_plan_offloads_then_shrinks_chunks_then_refuses():
    m = llama_on_meta(**LLAMA2_13B)
    kw = dict(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.float16)
    full = estimate_walk_memory(m, offload=False, **kw).total
    p = plan_memory(m, full + 1, **kw)
    assert not p.offload and p.notes == []
    assert full <= 8 * 2**30  # the 13B-in-8-GiB case fits even without offload, by this estimate
    p = plan_memory(m, full - 1, **kw)
    assert p.offload and p.estimate.total < full and "offloaded" in p.notes[0]
    with pytest.raises(MemoryCapError, match=r"GiB over the 1\.00 GiB cap"):
        plan_memory(m, 2**30, **kw)


def test_plan_lowers_chunk_and_results_do_not_depend_on_it():
    m = llama_on_meta(**LLAMA2_7B)  # largest layer 45M weights: the default 32M-value chunk dominates the search
    kw = dict(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.float16)
    cap = estimate_walk_memory(m, offload=True, chunk_elements=1 << 24, **kw).total
    assert cap < estimate_walk_memory(m, offload=True, **kw).total
    p = plan_memory(m, cap, **kw)
    assert p.offload and p.chunk_elements == 1 << 24 and "chunk lowered" in p.notes[-1]
    x = torch.randn(300, 200)
    ref = kmeans.kmeans_1d(x, 8)
    old = kmeans.CHUNK_ELEMENTS
    kmeans.CHUNK_ELEMENTS = 1000  # five rows per chunk
    try:
        assert torch.equal(kmeans.kmeans_1d(x, 8), ref)
    finally:
        kmeans.CHUNK_ELEMENTS = old


def test_auto_chunk_grows_to_the_shared_layer_and_stays_under_its_share():
    m = llama_on_meta(**LLAMA2_7B)
    kw = dict(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.float16)
    big = 80 * 2**30
    # three widths of the 45 M-weight MLP layers share one run: 135 M values -> 2^28 (2^27 is short)
    assert auto_chunk_elements(m, big, shared_widths=3, **kw) == MAX_AUTO_CHUNK_ELEMENTS
    # one width: the first power of two that holds the largest layer, no more
    assert auto_chunk_elements(m, big, shared_widths=1, **kw) == 1 << 26
    # a card where the larger chunk would pass the share keeps a smaller one, never below the default
    seen = []
    for mem in (12 * 2**30, 16 * 2**30, 24 * 2**30):
        c = auto_chunk_elements(m, mem, shared_widths=3, **kw)
        seen.append(c)
        assert c >= kmeans.CHUNK_ELEMENTS
        if c > kmeans.CHUNK_ELEMENTS:
            assert estimate_walk_memory(m, offload=False, chunk_elements=c, shared_widths=3, **kw).total \
                <= AUTO_CHUNK_SHARE * mem
        if c < MAX_AUTO_CHUNK_ELEMENTS:
            assert estimate_walk_memory(m, offload=False, chunk_elements=2 * c, shared_widths=3, **kw).total \
                > AUTO_CHUNK_SHARE * mem
    assert seen == sorted(seen) and any(kmeans.CHUNK_ELEMENTS < c < MAX_AUTO_CHUNK_ELEMENTS for c in seen), seen
    assert auto_chunk_elements(m, 2**30, shared_widths=3, **kw) == kmeans.CHUNK_ELEMENTS
    # the shared copies count in the estimate
    one = estimate_walk_memory(m, offload=False, chunk_elements=1 << 28, **kw)
    three = estimate_walk_memory(m, offload=False, chunk_elements=1 << 28, shared_widths=3, **kw)
    assert three.search == 3 * 4096 * 11008 * 40 > one.search == 4096 * 11008 * 40


def test_cli_rejects_bad_memory_string(folder4, tmp_path, capsys):
    assert main(args(folder4, tmp_path / "q", "--max-gpu-memory", "lots")) == 2
    assert "memory size 'lots'" in capsys.readouterr().err


def test_cli_memory_cap_too_small_is_refused_before_work(folder4, tmp_path, capsys):
    assert main(args(folder4, tmp_path / "q", "--max-gpu-memory", "1KiB")) == 2
    err = capsys.readouterr().err
    assert "over the 0.00 GiB cap" in err and "hidden states" in err
    assert not (tmp_path / "q.partial").exists() and not (tmp_path / "q").exists()


def test_a_model_stays_on_the_card_only_when_it_fits_beside_the_walk_and_then_shrinks_the_chunk():
    m = llama_on_meta(**LLAMA2_7B).half()  # as a GPU run loads it
    kw = dict(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.float16)
    size = parameter_bytes(m)
    assert 13 * 2**30 > size > 12 * 2**30  # 6.7 G fp16 parameters
    walk = estimate_walk_memory(m, offload=False, shared_widths=3, **kw).total
    assert stays_resident(m, 80 * 2**30, shared_widths=3, **kw)
    assert not stays_resident(m, 32 * 2**30, shared_widths=3, **kw)  # 12.6 GiB + the walk > 16 GiB
    # the rule, at its edge: exactly the share holds, a byte less does not
    edge = int((size + walk) / AUTO_CHUNK_SHARE) + 1
    assert stays_resident(m, edge, shared_widths=3, **kw) and not stays_resident(m, edge - 4, shared_widths=3, **kw)
    # the resident model counts against the chunk: never larger, and under the share with it
    for mem in (40 * 2**30, 48 * 2**30, 80 * 2**30):
        alone = auto_chunk_elements(m, mem, shared_widths=3, **kw)
        beside = auto_chunk_elements(m, mem, shared_widths=3, reserved=size, **kw)
        assert beside <= alone
        if beside > kmeans.CHUNK_ELEMENTS:
            assert estimate_walk_memory(m, offload=False, chunk_elements=beside, shared_widths=3, **kw).total + size \
                <= AUTO_CHUNK_SHARE * mem
    assert auto_chunk_elements(m, 40 * 2**30, shared_widths=3, reserved=size, **kw) < \
        auto_chunk_elements(m, 40 * 2**30, shared_widths=3, **kw)


class _Moves(torch.nn.Linear):
    """A module that records where it is asked to go instead of going (no GPU here)."""

    def __init__(self):
        super().__init__(2, 2)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(torch.device(args[0]))
        return self


def test_staying_on_moves_the_model_once_each_way_also_after_an_error():
    m = _Moves()
    with staying_on(m, torch.device("cuda")):
        assert m.moves == [torch.device("cuda")]
    assert m.moves == [torch.device("cuda"), torch.device("cpu")]
    m = _Moves()
    with pytest.raises(FloatingPointError):
        with staying_on(m, torch.device("cuda")):
            raise FloatingPointError("mid-run")
    assert m.moves == [torch.device("cuda"), torch.device("cpu")]
    m = _Moves()
    for where in (None, torch.device("cpu")):  # not asked, or already there: no move at all
        with staying_on(m, where):
            pass
    assert m.moves == []
