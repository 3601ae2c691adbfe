"""Does overlapping a layer's dequantization with the previous layer's GEMM bring prefill to FP16?

Prefill dequantizes each CMPQ layer into a scratch FP16 weight and calls cuBLAS; serially that was
0.74 / 0.86 / 0.89x FP16 on the 7B shapes at 2,048 tokens (H100, 2026-12-07, notes-kernels.md).
``cmpq.nn.overlap`` builds layer i+1's weight on a side stream during layer i's GEMM. A per-layer
benchmark cannot show that (it needs a previous layer), so this times a chain: ``--blocks`` 7B-shaped
decoder blocks' linears in call order (q, k, v, o, gate, up, down; 3 bits, random layers with row
scales as the default stores them), each fed a fixed input of ``--tokens`` tokens, eager, CUDA events
around the whole chain, median of ``--reps``. Rows: FP16 ``F.linear``, CMPQ serial, CMPQ overlapped.

    PYTHONPATH=$PWD python studies/prefill_overlap.py --out $OUT/prefill-overlap.json     (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F

from cmpq.kernels import prefetch
from cmpq.kernels.testing import mix_counts, random_layer
from cmpq.nn.overlap import overlapped

BLOCK = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
         ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    layers, dense = [], []
    for _ in range(a.blocks):
        for _, out, n_in in BLOCK:
            counts, n_act = mix_counts(n_in, a.bits)
            layer = random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen,
                                 pack=False)
            layer.row_scale = (torch.rand(out, generator=gen) * 0.5 + 0.75).half().cuda()
            layer.prepare_runtime()
            layers.append(layer)
            dense.append(torch.randn(out, n_in, device="cuda", dtype=torch.float16) * 0.02)
    model = torch.nn.Sequential(*layers)
    rows = []
    for T in a.tokens:
        x4, x11 = (torch.randn(T, n, device="cuda", dtype=torch.float16) for n in (4096, 11008))
        ins = [x11 if n_in == 11008 else x4 for _ in range(a.blocks) for _, _, n_in in BLOCK]

        def fp16():
            for w, x in zip(dense, ins):
                F.linear(x, w)

        def cmpq():
            for layer, x in zip(layers, ins):
                layer(x)

        with torch.no_grad():
            r = dict(tokens=T, layers=len(layers), fp16_ms=timed(fp16, a.reps), serial_ms=timed(cmpq, a.reps))
            for k in prefetch.stats:
                prefetch.stats[k] = 0
            with overlapped(model):
                r["overlap_ms"] = timed(cmpq, a.reps)
            r["prefetch"] = dict(prefetch.stats)
        r["serial_vs_fp16"], r["overlap_vs_fp16"] = r["fp16_ms"] / r["serial_ms"], r["fp16_ms"] / r["overlap_ms"]
        print(f"{T} tokens, {len(layers)} linears: fp16 {r['fp16_ms']:.2f} ms, serial {r['serial_ms']:.2f} "
              f"({r['serial_vs_fp16']:.2f}x), overlapped {r['overlap_ms']:.2f} ({r['overlap_vs_fp16']:.2f}x); "
              f"prefetch {r['prefetch']}", flush=True)
        rows.append(r)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, bits=a.bits, blocks=a.blocks, reps=a.reps,
                method="eager chain of 7B-block linears, CUDA events around the chain, median")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
