"""How much of a compiled, graphed 7B-shaped decode step is the linears, and how much everything
else (attention over the KV cache, norms, rotary, sampling, the LM head, launch gaps)?

Measured by difference, without a profiler (nsys is not on the GPU machine; CUDA graphs hide the
kernels from torch.profiler): the same step is timed with the decoder blocks' linears as they are
(FP16, then CMPQ 3 bits) and with every one of them replaced by a module that returns a zero
buffer made once (no kernel). The last is the step's floor whatever the linears cost, so
``fp16 / floor`` is the most any weight-only kernel can gain end to end at that batch size, and
``step - floor`` is the linears' share of each step. It answers why the batch-8 step did not
move when the 8-token layers got 20-45% faster (2026-12-07).

On a GPU each row also has, from the same process and the same layers, ``layers_ms``: every block
linear timed on its own as ``benchmarks/kernel_bench.py`` times a layer (a CUDA graph over the 32
instances of that layer), summed per step; and the median SM clock while the step and the layers
ran (``nvidia-smi``, where it exists). The first run (2026-12-07, H100) found CMPQ's linears 13-16%
slower in the step than the bench's sums from another run, FP16's 2-5%; these columns compare the two
in one run, and test whether a lower clock during the long decode explains it.

    python studies/decode_step_split.py --batch 1 8 --out X.json          (GPU; --tiny: CPU smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import time

import torch
from torch import nn

from cmpq.generate import generate_ids

@functools.cache
def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


decode_bench = _load("decode_bench", "decode.py")


class FreeLinear(nn.Module):
    """A linear that costs nothing: the first ``rows`` rows of a zero buffer shared by every
    module of the same output width (nothing downstream writes into its input in place)."""

    def __init__(self, buf: torch.Tensor):
        super().__init__()
        self.buf = buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.buf[:rows].view(*x.shape[:-1], self.buf.shape[-1])


def free_linears(model, max_rows: int) -> nn.Module:
    """Every ``nn.Linear`` (or CMPQ linear) inside the decoder blocks replaced by ``FreeLinear``."""
    bufs: dict[int, torch.Tensor] = {}
    dev = next(model.parameters()).device
    for block in model.model.layers:
        for name, m in list(block.named_modules()):
            out = getattr(m, "out_features", None)
            if out is None or not name:
                continue
            if out not in bufs:
                bufs[out] = torch.zeros(max_rows, out, dtype=torch.float16 if dev.type == "cuda" else torch.float32,
                                        device=dev)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, FreeLinear(bufs[out]))
    return model


@contextlib.contextmanager
def sm_clock(dev):
    """Yields a list that holds, after the block, the median SM clock (MHz) sampled every 100 ms
    by ``nvidia-smi`` while the block ran (empty where there is no GPU or no nvidia-smi)."""
    out: list[float] = []
    if dev.type != "cuda" or shutil.which("nvidia-smi") is None:
        yield out
        return
    p = subprocess.Popen(["nvidia-smi", f"--id={torch.cuda.current_device()}", "--query-gpu=clocks.sm",
                          "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    try:
        yield out
    finally:
        p.terminate()
        vals = [float(v) for v in p.communicate()[0].split() if v.replace(".", "", 1).isdigit()]
        if vals:
            out.append(statistics.median(vals))


def layers_ms(model, batch: int, dev) -> float | None:
    """Milliseconds per step of the blocks' linears, each timed on its own as kernel_bench times a
    layer: a CUDA graph over the instances of one layer name (one per block), summed over names."""
    if dev.type != "cuda":
        return None
    time_graph = _load("kernel_bench", "kernel_bench.py").time_graph
    blocks = model.model.layers
    names = [n for n, m in blocks[0].named_modules() if n and getattr(m, "out_features", None)]
    total_us = 0.0
    with torch.no_grad():
        for n in names:
            mods = [b.get_submodule(n) for b in blocks]
            xs = [torch.randn(batch, 1, m.in_features, device=dev, dtype=torch.float16) for m in mods]
            total_us += time_graph([lambda m=m, x=x: m(x) for m, x in zip(mods, xs)], len(mods)) * len(mods)
    return total_us / 1e3


def step_ms(model, vocab: int, batch: int, prompt: int, new: int, dev) -> float:
    """Milliseconds per compiled, graphed token step (the loop after the first new token)."""
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    generate_ids(model, ids, min(4, new))  # warm-up
    torch._dynamo.reset()
    out, _, dec, _ = generate_ids(model, ids, new, compile=dev.type == "cuda")
    return 1e3 * dec / (out.shape[1] - prompt - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny random Llama")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    cfg = decode_bench.TINY if a.tiny else decode_bench.LLAMA7B
    if a.tiny:
        a.prompt_len, a.new_tokens = 8, 6
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "shape": "tiny" if a.tiny else "llama-2-7b", "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
           "method": "ms per compiled, CUDA-graphed decode step (cmpq.generate.generate_ids); floor = the decoder "
                     "blocks' linears replaced by a zero buffer (no kernel)", "rows": []}

    def save():
        if a.out:
            with open(a.out + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(a.out + ".tmp", a.out)

    t0 = time.time()
    for variant in ("fp16", "floor", "cmpq"):  # the floor before cmpq: a run cut short still bounds
        model = decode_bench.llama(cfg, dev)
        if variant == "cmpq":
            decode_bench.quantize_random(model, a.bits, dev, log=lambda *_: None)
        elif variant == "floor":
            free_linears(model, max(a.batch) * a.prompt_len)
        for b in a.batch:
            with sm_clock(dev) as clk:
                ms = step_ms(model, cfg["vocab_size"], b, a.prompt_len, a.new_tokens, dev)
            row = {"variant": variant, "batch": b, "step_ms": round(ms, 4), "step_sm_mhz": clk[0] if clk else None}
            if variant != "floor":
                with sm_clock(dev) as clk:
                    lm = layers_ms(model, b, dev)
                row.update(layers_ms=None if lm is None else round(lm, 4), layers_sm_mhz=clk[0] if clk else None)
            res["rows"].append(row)
            print(f"[{time.time() - t0:.0f}s] {row}", flush=True)
            save()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["variant"], r["batch"]): r["step_ms"] for r in res["rows"]}
    for b in a.batch:
        f, c, z = by[("fp16", b)], by[("cmpq", b)], by[("floor", b)]
        s = {"batch": b, "fp16_linears_ms": round(f - z, 4), "cmpq_linears_ms": round(c - z, 4),
             "floor_ms": z, "cmpq_vs_fp16": round(f / c, 3), "bound_vs_fp16": round(f / z, 3)}
        for v in ("fp16", "cmpq"):  # the linears in the step against the same layers timed alone
            lm = next(r.get("layers_ms") for r in res["rows"] if r["variant"] == v and r["batch"] == b)
            if lm:
                s[f"{v}_step_over_layers"] = round((by[(v, b)] - z) / lm, 3)
        res.setdefault("split", []).append(s)
        print(s, flush=True)
    save()


if __name__ == "__main__":
    main()
