"""Time the rlut kernel against the best existing decode kernels and FP16 cuBLAS, one GPU call.

For each bit width (3 first), Llama-2 7B and 70B layer shape and token count T: ``kernel_rlut.linear``
vs ``dispatch.run`` (the shipped table: v4s at one token, the mma kernel at 2..16: what the
dispatcher runs today) vs ``F.linear`` with an FP16 weight. Each point: median of CUDA-event timings
of single calls, each after a 256 MiB write that flushes L2, after warm-up calls. Every kernel's
output is checked against the float64 reference first; a wrong one is reported and not timed.
Writes ``$OUT/rlut_bench.json`` after every shape and ``$OUT/rlut_bench.md``; the table is printed last.
``--groups`` also times every tile grouping the kernel is built for where there are several
(``kernel_rlut.GROUPS``: one or two 128-row tile groups per block at 5-8 tokens) as ``groups_us``.
Usage: python benchmarks/rlut_bench.py [--out DIR] [--models 7B,70B] [--bits 3,2,4] [--tokens 1,2,4,8,16]
[--reps 30] [--budget 120] [--groups]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from cmpq.kernels import dispatch
from cmpq.kernels import kernel_rlut as kr
from cmpq.kernels.testing import mix_counts, random_layer

SHAPES = {"7B": [(4096, 4096), (11008, 4096), (4096, 11008)],  # out x in
          "70B": [(8192, 8192), (28672, 8192), (8192, 28672)]}
SPARSE_FRAC = 5e-4  # CSR outliers per weight (the format's typical 0.05%)


def timer(reps: int):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def bench(fn) -> float:
        for _ in range(3):
            fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return 1000 * statistics.median(s.elapsed_time(e) for s, e in ev)

    return bench


def rel_err(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def table(rows: list[dict], meta: dict) -> str:
    lines = ["# rlut vs best existing (v4s at 1 token, mma at 2..16) vs FP16 cuBLAS", "",
             f"{meta['device']}, {meta['date']}, torch {meta['torch']}; {meta['method']}", "",
             "| bits | layer (out x in) | T | FP16 us | best us | rlut us | rlut vs FP16 | rlut vs best | rlut bw | rlut err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        sp = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
        bw = "-" if r["rlut_us"] is None else f"{r['bytes'] / (r['rlut_us'] * 1e-6) / meta['copy_bw_Bps']:.0%}"
        lines.append(f"| {r['bits']:g} | {r['out']}x{r['in']} | {r['T']} | {f(r['fp16_us'])} | {f(r['best_us'])} | "
                     f"{f(r['rlut_us'])} | {sp(r['fp16_us'], r['rlut_us'])} | {sp(r['best_us'], r['rlut_us'])} | {bw} | "
                     f"{r['rlut_err']:.1e} |")
    return "\n".join(lines) + "\n"


def copy_bandwidth(bench) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6)


def main() -> None:
    t0 = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/rlut"))
    ap.add_argument("--models", default="7B,70B")
    ap.add_argument("--bits", default="3,2,4")
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of wall clock; later points are skipped")
    ap.add_argument("--groups", action="store_true", help="time each tile grouping where the kernel has several")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if kr.library() is None:
        raise SystemExit(f"rlut unavailable: {kr.library_error()}")
    bench = timer(args.reps)
    bw = copy_bandwidth(bench)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, copy_bw_Bps=bw,
                method=f"median of {args.reps} CUDA-event timings of one call, L2 flushed before each, 3 warm-up calls")
    print(f"{meta['device']}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    tokens = [int(t) for t in args.tokens.split(",")]
    for bits in [float(b) for b in args.bits.split(",")]:
        for model in args.models.split(","):
            for out, n_in in SHAPES[model]:
                if time.time() - t0 > args.budget:
                    print(f"budget reached: skipping {bits:g} bits {out}x{n_in}", flush=True)
                    continue
                counts, n_act = mix_counts(n_in, bits)
                gen = torch.Generator().manual_seed(out + n_in)
                layer = random_layer(out, n_in, counts, n_act, round(SPARSE_FRAC * out * n_in), device="cuda",
                                     generator=gen, pack=False)
                tp = time.time()
                lay = kr.prepare(layer)
                layer.prepare_runtime()
                rt = layer.runtime()
                torch.cuda.synchronize()
                prep_s = time.time() - tp
                w16 = layer.dequantize(torch.float16)
                w64 = w16.double()
                nbytes = sum(layer.storage_bytes().values())
                for T in tokens:
                    x = torch.randn(T, n_in, device="cuda").half()
                    ref = x.double() @ w64.T
                    y_r = kr.linear(x, lay)
                    y_b = dispatch.run(x, rt)
                    e_r = rel_err(y_r, ref) if y_r is not None else float("nan")
                    e_b = rel_err(y_b, ref) if y_b is not None else float("nan")
                    ok_r, ok_b = e_r < 2e-3, e_b < 2e-3
                    row = dict(bits=bits, out=out, **{"in": n_in}, T=T, bytes=nbytes + 2 * T * (n_in + out),
                               fp16_us=bench(lambda: F.linear(x, w16)),
                               best_us=bench(lambda: dispatch.run(x, rt)) if ok_b else None,
                               rlut_us=bench(lambda: kr.linear(x, lay)) if ok_r else None,
                               rlut_err=e_r, best_err=e_b, prepare_s=round(prep_s, 2),
                               plan=list(kr._params(lay, T, False, None)[1:]))
                    options = kr.GROUPS[kr.ntl_of(T)]
                    if args.groups and len(options) > 1:
                        row["groups_us"] = {}
                        for q in options:
                            y_q = kr.linear(x, lay, groups=q)
                            ok = y_q is not None and rel_err(y_q, ref) < 2e-3
                            row["groups_us"][q] = bench(lambda q=q: kr.linear(x, lay, groups=q)) if ok else None
                        print(f"  tile groups per block -> us: {row['groups_us']}", flush=True)
                    rows.append(row)
                    print(f"{bits:g} bits {out}x{n_in} T={T}: fp16 {row['fp16_us']:.1f} us, best "
                          f"{row['best_us'] or float('nan'):.1f}, rlut {row['rlut_us'] or float('nan'):.1f} "
                          f"(err {e_r:.1e} / {e_b:.1e}; grid {row['plan']})", flush=True)
                layer = lay = w16 = w64 = rt = None  # free before the next shape (the timing lambdas are done)
                torch.cuda.empty_cache()
                with open(os.path.join(args.out, "rlut_bench.json"), "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = table(rows, meta)
    with open(os.path.join(args.out, "rlut_bench.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
