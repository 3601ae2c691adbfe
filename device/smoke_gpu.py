"""One-minute GPU smoke test of the default quantization path before a long device call.

The quality grid spends most of a 10-minute call; a device mismatch in code last run on CPU would
waste it. This quantizes a tiny random Llama on CUDA with the default config (compensated pass,
row scales, fine-tuning with held-out selection), saves, loads, and checks the loaded model's
logits against the in-memory one and against a CPU dequantized reference. Exit code 1 on failure.
Usage (device): python3 device/smoke_gpu.py [cuda|cpu]
"""
from __future__ import annotations

import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cmpq
from cmpq.config import CMPQConfig


def main(dev: str) -> int:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    cmpq.quantize(model, calib=calib, config=CMPQConfig(bits=3.0, finetune_epochs=2), device=dev, log=print)
    print(f"quantized in {time.perf_counter() - t0:.1f}s; finetune record:",
          model.config.quantization_config.get("finetune"))
    model = model.half().to(dev)
    x = calib[:2].to(dev)
    with torch.no_grad():
        ref = model(x).logits.float()
    with tempfile.TemporaryDirectory() as d:
        cmpq.save(model, d + "/m")
        loaded = cmpq.load(d + "/m", device=dev, dtype=torch.float16)
        with torch.no_grad():
            got = loaded(x).logits.float()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    print(f"saved/loaded vs in-memory, max rel err {err:.2e}")
    return 0 if err < 2e-2 and torch.isfinite(got).all() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
