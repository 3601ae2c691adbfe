"""Wall time and peak GPU memory of a whole CMPQ run on Llama-2-7B/13B-shaped random models (issue 5).

Each shape is built from its config with random weights, saved as safetensors on local disk, loaded
back on the CPU as `cmpq quantize` does, quantized (3 bits, random calibration tokens 128 x 2048)
and saved. Reported per run: catch / calibration forward / linear quantization (allocation, k-means,
outlier search, packing) / checkpoint / save seconds, and peak GPU memory. ``--tiny`` runs a tiny
shape on the CPU in seconds, to check the script.

    python benchmarks/quantize_speed.py                       # 7B and 13B, then 13B under 8 GiB
    python benchmarks/quantize_speed.py --tiny                # CPU smoke test
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # benchmarks/kernels.py shadows `kernels`

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def build(shape: str, where: Path, dtype: torch.dtype) -> Path:
    """Random-weight model saved as safetensors (normal, std 0.02: the init scale of the real ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = where / shape
    if (path / "config.json").is_file():
        return path
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype=str(dtype).split(".")[1])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.data = (torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02).to(dtype)
    model.model.rotary_emb.__init__(cfg)  # buffers were left empty by to_empty
    model.save_pretrained(path, safe_serialization=True)
    return path


def run(path: Path, out: Path, device: torch.device, nsamples: int, seqlen: int, bits: float, batch: int,
        cap: str | None, offload: bool) -> dict:
    from transformers import AutoModelForCausalLM

    import cmpq

    t0 = time.perf_counter()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    cfg = cmpq.CMPQConfig(bits=bits, nsamples=nsamples, seqlen=seqlen, calib_batch_size=batch)
    t0 = time.perf_counter()
    cmpq.quantize(model, None, cfg, calib=ids, device=device, checkpoint_dir=Path(str(out) + ".partial"),
                  offload_activations=offload, max_gpu_memory=cap, log=None)
    quant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cmpq.save(model, out)
    save_s = time.perf_counter() - t0
    qc = model.config.quantization_config
    return {"load_s": round(load_s, 2), "quantize_s": round(quant_s, 2), "save_s": round(save_s, 2),
            "split_s": qc["time_split_seconds"], "peak_gpu_gib": qc.get("peak_gpu_memory_gib"),
            "max_gpu_memory": cap, "offload_activations": offload,
            "weights_file_gb": round((out / "model.safetensors").stat().st_size / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, small calibration (smoke test)")
    ap.add_argument("--shapes", nargs="+", default=["7b", "13b"])
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--capped", default="13b:8GiB", help="shape:cap run last under --max-gpu-memory ('' to skip)")
    ap.add_argument("--workdir", default=None, help="where the random models are built (default: a temp folder)")
    ap.add_argument("--out", default="benchmarks/results/quantize-speed.json")
    a = ap.parse_args()
    if a.tiny:
        a.shapes, a.nsamples, a.seqlen, a.batch, a.capped = ["tiny"], 4, 64, 2, "tiny:1GiB"
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cmpq-bench-"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    plan = [(s, None) for s in a.shapes]
    if a.capped:
        s, cap = a.capped.split(":")
        plan.append((s, cap))  # last: the allocator cap stays set for the process
    rows = []
    for shape, cap in plan:
        path = build(shape, work, dtype)
        out = work / f"{shape}-q{'-capped' if cap else ''}"
        shutil.rmtree(out, ignore_errors=True)
        r = {"shape": shape, **run(path, out, device, a.nsamples, a.seqlen, a.bits, a.batch, cap, False)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "device": name, "bits": a.bits,
                                       "nsamples": a.nsamples, "seqlen": a.seqlen, "batch": a.batch, "runs": rows},
                                      indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
