"""End-to-end decode speed: CMPQ (3 bits, fused kernels) vs FP16, same generation loop.

Batch 1 (``--batch`` B: B random prompts decoded together, the several-token kernels' case), a
128-token random prompt, 256 new tokens (greedy), ``cmpq.generate.generate_ids`` (static KV cache,
one CUDA graph per token step), plus peak GPU memory, for

  (a) ``--model`` (e.g. ``smollm2-135m``): FP16, then quantized by CMPQ in place with
      ``--nsamples`` calibration sequences (c4 from ``CMPQ_DATA_DIR``; ``--calib`` to change);
  (b) a Llama-2-7B-shaped model with random fp16 weights built on the GPU, then its linears
      quantized by ``cmpq.algorithm.layer.quantize_weights`` + ``pack_linear`` with random
      activation norms and random row scales, as the default format stores them (speed only; no
      calibration).

Usage (GPU):  python benchmarks/decode.py --model smollm2-135m --out benchmarks/results/decode-h200.json
CPU smoke test (tiny shapes, minutes -> seconds):  python benchmarks/decode.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

import cmpq  # noqa: E402
from cmpq.generate import generate_ids  # noqa: E402


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(dev) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def run(model, vocab: int, prompt_len: int, new: int, dev, label: str, graph: bool | None,
        compile_modes: tuple[bool, ...] = (False,), fuse: bool = False, batch: int = 1) -> list[dict]:
    """One row per compile mode; the same prompts and loop. ``fuse``: CMPQ linears that share an
    input run as one launch (cmpq.nn.fuse). ``tokens_per_s`` counts every row of the batch;
    ``steps_per_s`` is the loop's rate."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(dev)
    generate_ids(model, ids, min(8, new), cuda_graph=graph)  # warm-up: kernel builds, layouts, graph path
    rows = []
    for comp in compile_modes:
        if comp:
            torch._dynamo.reset()  # a fresh compile per model (dynamo's recompile limit is per code object)
        _peak_reset(dev)
        t0 = time.time()
        out, pre, dec, used = generate_ids(model, ids, new, cuda_graph=graph, compile=comp, fuse=fuse)
        n = out.shape[1] - prompt_len
        r = dict(model=label, compiled=comp, fused=fuse, batch=batch, prompt_tokens=prompt_len, new_tokens=n,
                 prefill_ms=1e3 * pre, tokens_per_s=batch * (n - 1) / dec if dec > 0 else float("nan"),
                 steps_per_s=(n - 1) / dec if dec > 0 else float("nan"), peak_gib=_peak(dev), cuda_graph=used,
                 call_s=time.time() - t0, first_tokens=out[0, prompt_len:prompt_len + 8].tolist())
        print(f"{label}{' compiled' if comp else ''} batch {batch}: {r['tokens_per_s']:.1f} tok/s, prefill {r['prefill_ms']:.1f} ms, "
              f"peak {r['peak_gib']:.2f} GiB, graph={used}, call {r['call_s']:.1f} s", flush=True)
        rows.append(r)
    return rows


@torch.no_grad()
def quantize_random(model, bits: float, dev, log=print) -> None:
    """Replace every linear of every decoder block by CMPQ (real algorithm, random activation norms),
    with per-row scales as the default algorithm stores them (format v4: one multiply per layer that
    the kernels' callers pay; before 2026-12-07 these layers had none)."""
    from torch import nn

    from cmpq.algorithm.layer import quantize_weights
    from cmpq.nn.linear import pack_linear

    cfg = cmpq.CMPQConfig(bits=bits, algorithm="paper")  # no calibration here: the paper's layer step
    gen = torch.Generator(device=dev).manual_seed(0)
    t0 = time.time()
    blocks = model.model.layers
    for bi, block in enumerate(blocks):
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        mods = [block.get_submodule(n) for n in names]
        ws = [m.weight.data.float() for m in mods]
        acts = [torch.rand(w.shape[1], generator=gen, device=dev) ** 4 * 100 + 1 for w in ws]  # heavy-tailed
        parts = quantize_weights(ws, acts, cfg, names)
        for p, w in zip(parts, ws):
            p.row_scale = (torch.rand(w.shape[0], generator=gen, device=dev) * 0.5 + 0.75).half()
        for n, m, p in zip(names, mods, parts):
            parent, _, leaf = n.rpartition(".")
            q = pack_linear(p, m.bias)
            setattr(block.get_submodule(parent) if parent else block, leaf, q)
        del ws, parts, mods
        if bi % 8 == 7:
            log(f"  quantized {bi + 1}/{len(blocks)} blocks, {time.time() - t0:.0f} s")
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def llama(cfg_kw: dict, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kw)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if dev.type == "cuda" else torch.float32)
    try:
        with torch.device(dev):
            m = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    for p in m.parameters():  # default init (std 0.02) is fine; keep it finite in fp16
        p.requires_grad_(False)
    return m


LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="anything cmpq.model.loading.load_model takes")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-model", action="store_true", help="skip part (a)")
    ap.add_argument("--skip-7b", action="store_true", help="skip part (b)")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both",
                    help="torch.compile the decode step (cmpq.generate): rows without, with, or both")
    ap.add_argument("--skip-fp16", action="store_true", help="CMPQ rows only (FP16 measured in another run)")
    ap.add_argument("--fuse", action="store_true", help="also CMPQ rows with q/k/v and gate/up fused (one launch each)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random Llamas, few tokens")
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (each step decodes this many tokens)")
    ap.add_argument("--out", default="benchmarks/results/decode-h200.json")
    a = ap.parse_args()
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py measures GPU decode speed and needs CUDA (torch.cuda.is_available() is False). "
                 "Use --tiny for a CPU smoke test.")
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    graph = False if a.no_cuda_graph else None
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[a.compile]
    if a.tiny:
        a.prompt_len, a.new_tokens = min(a.prompt_len, 16), min(a.new_tokens, 8)
    rows = []
    t_start = time.time()

    if not a.skip_model:
        if a.tiny:
            model, vocab, label = llama(dict(TINY, tie_word_embeddings=True), dev), 256, "tiny-llama"
            calib = torch.randint(0, 256, (4, 64))
            # the paper's nominal budget is reachable on any shape; the default's effective one is not
            # on a model this small (codebooks of 96-wide layers cost more than 1 bit per weight)
            qcfg = cmpq.CMPQConfig(bits=a.bits, algorithm="paper")
            tok = None
        else:
            from cmpq.model.loading import load_model

            model, tok = load_model(a.model, device=dev, dtype=torch.float16)
            vocab, label, calib = model.config.vocab_size, a.model, a.calib
            qcfg = cmpq.CMPQConfig(bits=a.bits)
        if not a.skip_fp16:
            rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} fp16", graph, modes, batch=a.batch)
        t0 = time.time()
        model = cmpq.quantize(model, tok, qcfg, calib=calib, nsamples=a.nsamples, seqlen=a.seqlen, device=dev, log=None)
        print(f"quantized {label} in {time.time() - t0:.1f} s", flush=True)
        rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} cmpq-{a.bits:g}bit", graph, modes, batch=a.batch)
        if a.fuse:
            rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} cmpq-{a.bits:g}bit fused", graph, modes, fuse=True, batch=a.batch)
        del model
        gc.collect()

    if not a.skip_7b:
        label = "tiny-llama-7b-shape" if a.tiny else "llama-2-7b-shape"
        model = llama(TINY if a.tiny else LLAMA7B, dev)
        vocab = model.config.vocab_size
        if not a.skip_fp16:
            rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} fp16", graph, modes, batch=a.batch)
        t0 = time.time()
        quantize_random(model, a.bits, dev)
        print(f"quantized {label} in {time.time() - t0:.1f} s", flush=True)
        rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} cmpq-{a.bits:g}bit", graph, modes, batch=a.batch)
        if a.fuse:
            rows += run(model, vocab, a.prompt_len, a.new_tokens, dev, f"{label} cmpq-{a.bits:g}bit fused", graph, modes, fuse=True, batch=a.batch)
        del model
        gc.collect()

    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                bits=a.bits, batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens, tiny=a.tiny,
                seconds=time.time() - t_start,
                method=f"greedy, batch {a.batch}, random prompts; cmpq.generate.generate_ids (static KV cache, CUDA graph "
                       "per token step on GPU, optionally torch.compile first); tokens/s over the token loop (the "
                       "new tokens after the first; one-time compile and capture excluded); peak = max allocated")
    if not a.tiny or a.out != ap.get_default("out"):
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['device']}, {meta['date']}, torch {meta['torch']}, {meta['seconds']:.0f} s\n")
    print("| model | batch | compiled | fused | tokens/s | vs fp16 (same loop) | prefill ms | peak GiB | CUDA graph |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = (r["model"].split(" ", 1)[0], r["compiled"])
        base.setdefault(key, r["tokens_per_s"])
        print(f"| {r['model']} | {r['batch']} | {r['compiled']} | {r.get('fused', False)} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base[key]:.2f}x | "
              f"{r['prefill_ms']:.1f} | {r['peak_gib']:.2f} | {r['cuda_graph']} |")


if __name__ == "__main__":
    main()
