"""Time each decode kernel on its own (no dispatch, no fallback) against FP16 cuBLAS, one GPU call.

One token: v3b, v4s, mma; more tokens: v3b and "mma" (kernel_mma.cu, tensor cores; v4s is a
one-token kernel). Each is called through ``cmpq.kernels.dispatch.RUNNERS`` (a kernel that does
not apply is reported, not replaced by another). Method as
benchmarks/kernel_bench.py: median of do_bench over a CUDA graph that rotates weight/input sets
(> 192 MiB, nothing in L2). Every (layer, variant) is checked against the float64 reference first;
a wrong variant is reported and not timed. Writes ``$OUT/kernel_variants.json`` and ``.md``; the
table is printed last. ``--budget`` (s) stops adding points when the wall clock runs out.
Usage: python benchmarks/kernel_variants.py [--out DIR] [--models 7B,70B] [--bits 3,2,4,2.5,3.5]
[--batches 1,4,16] [--variants v3b,v4s,mma] [--budget 100] [--sweep] [--table-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from kernel_bench import ROTATE_BYTES, SHAPES, copy_bandwidth, layer_bytes, time_graph  # noqa: E402
from cmpq.kernels import cuda_decode, dispatch, kernel_mma, kernel_v4  # noqa: E402
from cmpq.kernels.testing import mix_counts, random_layer  # noqa: E402


def main() -> None:
    t_start = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--models", default="7B,70B")
    ap.add_argument("--bits", default="3,2,4,2.5,3.5")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--variants", default="v3b,v4s,mma")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds of wall clock for the timing loop")
    ap.add_argument("--sweep", action="store_true", help="split sweep of v4s at 3 bits (if time is left)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from $OUT/kernel_variants.json")
    args = ap.parse_args()
    if args.table_only:
        d = json.load(open(os.path.join(args.out, "kernel_variants.json")))
        table(d["rows"], d["meta"], os.path.join(args.out, "kernel_variants.md"))
        return
    bits_list = [float(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    os.makedirs(args.out, exist_ok=True)
    jpath, mpath = os.path.join(args.out, "kernel_variants.json"), os.path.join(args.out, "kernel_variants.md")
    if not cuda_decode.available():
        sys.exit(f"v3b unavailable: {cuda_decode.library_error()}")
    if any(v.startswith("v4") for v in variants) and kernel_v4.library() is None:
        print(f"v4 unavailable: {kernel_v4.library_error()}", flush=True)
        variants = [v for v in variants if not v.startswith("v4")]
    if "mma" in variants and kernel_mma.library() is None:
        print(f"mma unavailable: {kernel_mma.library_error()}", flush=True)
        variants = [v for v in variants if v != "mma"]
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, copy_bw_Bps=bw, variants=variants,
                method="median of do_bench over a CUDA graph rotating weight/input sets (> 192 MiB)")
    rows: list[dict] = []

    def save() -> None:
        with open(jpath, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    def out_of_time() -> bool:
        return time.time() - t_start > args.budget

    shapes = [(m, s) for m in args.models.split(",") for s in SHAPES[m]]
    fp16: dict = {}
    # bits outermost (3 bits first): a run cut short by --budget still has the target points
    for bits in bits_list:
        for model, (out, n_in) in shapes:
            if out_of_time():
                break
            if (out, n_in) not in fp16:
                nw = max(2, min(8, math.ceil(ROTATE_BYTES / (out * n_in * 2))))
                ws = [torch.randn(out, n_in, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nw)]
                for T in batches:
                    xs = [torch.randn(T, n_in, device="cuda", dtype=torch.float16) for _ in range(nw)]
                    fp16[(out, n_in, T)] = time_graph([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)], nw)
                fp16[(out, n_in)] = True
                del ws
            counts, n_act = mix_counts(n_in, bits)
            n_sparse = round(0.0005 * out * n_in)
            gen = torch.Generator().manual_seed(int(bits * 10))
            first = random_layer(out, n_in, counts, n_act, n_sparse, device="cuda", generator=gen, pack=False)
            nbytes = layer_bytes(first)
            nl = max(2, min(32, math.ceil(ROTATE_BYTES / nbytes)))
            layers = [first] + [random_layer(out, n_in, counts, n_act, n_sparse, device="cuda", generator=gen, pack=False)
                                for _ in range(nl - 1)]
            ref_w = first.dequantize(torch.float32)
            rts = [l.runtime() for l in layers]  # the runtime layouts, built once here
            for T in batches:
                xs = [torch.randn(T, n_in, device="cuda", dtype=torch.float16) for _ in range(nl)]
                ref = F.linear(xs[0].float(), ref_w)
                fpt = fp16[(out, n_in, T)]
                for v in variants:
                    if T > 1 and v not in ("v3b", "mma"):
                        continue
                    r = dict(model=model, out=out, inp=n_in, bits=bits, tokens=T, variant=v, fp16_us=fpt,
                             eff_bits=first.effective_bits())
                    try:
                        y = dispatch.RUNNERS[v](rts[0], xs[0])
                        if y is None:
                            raise RuntimeError(f"{v} does not apply here")
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        r["rel_err"] = err
                        if not err < 2e-3:
                            r["error"] = f"WRONG rel_err {err:.2e}"
                        else:
                            run = dispatch.RUNNERS[v]
                            us = time_graph([lambda rt=rt, x=x: run(rt, x) for rt, x in zip(rts, xs)], nl)
                            moved = nbytes + 2 * T * (n_in + out)
                            if v == "mma":
                                pl = kernel_mma._params(rts[0], 1 if T <= 8 else 2, None, None)
                            elif v == "v3b":
                                pl = cuda_decode._params(rts[0], next(c for c in cuda_decode.NT_CHOICES if c >= T), None)
                            else:
                                pl = kernel_v4._params(rts[0], None)
                            r.update(us=us, speedup=fpt / us, bw_frac=moved / (us * 1e-6) / bw,
                                     floor_us=moved / bw * 1e6, splits=None if pl is None else pl[2])
                    except Exception as e:  # one broken variant must not stop the others
                        r["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(r)
                    msg = (f"{r['us']:.1f}us x{r['speedup']:.2f} bw {r['bw_frac']:.0%} S={r['splits']}"
                           if "us" in r else r["error"])
                    print(f"{model} {out}x{n_in} {bits}b T={T} {v}: {msg} (fp16 {fpt:.1f})", flush=True)
                save()
            del layers, rts, first, ref_w
            torch.cuda.empty_cache()
    if args.sweep and not out_of_time() and any(v.startswith("v4") for v in variants):
        sweep(variants, rows, save, out_of_time)
    save()
    table(rows, meta, mpath)
    print(f"total {time.time() - t_start:.0f} s", flush=True)


def sweep(variants, rows, save, out_of_time) -> None:
    """Splits at 0.5x / 2x the planner's choice, 3 bits, 1 token, two shapes."""
    for out, n_in in [(4096, 11008), (28672, 8192)]:
        counts, n_act = mix_counts(n_in, 3.0)
        gen = torch.Generator().manual_seed(1)
        first = random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen, pack=False)
        nl = max(2, min(32, math.ceil(ROTATE_BYTES / layer_bytes(first))))
        ls = [first] + [random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen,
                                     pack=False) for _ in range(nl - 1)]
        xs = [torch.randn(1, n_in, device="cuda", dtype=torch.float16) for _ in ls]
        for v in variants:
            if not v.startswith("v4") or out_of_time():
                continue
            rts = [l.runtime() for l in ls]
            d = kernel_v4.plan(rts[0].groups, out, cuda_decode._num_sms(xs[0].device))[1]
            for sp in sorted({max(1, d // 2), max(1, (2 * d) // 3), (3 * d) // 2, 2 * d}):
                pl = kernel_v4.plan(rts[0].groups, out, 132, sp)
                if pl[2] > kernel_v4.MAX_SMEM:
                    continue
                us = time_graph([lambda rt=rt, x=x: kernel_v4.decode(rt, x, splits=sp) for rt, x in zip(rts, xs)], len(ls))
                rows.append(dict(sweep=True, out=out, inp=n_in, bits=3.0, tokens=1, variant=v, splits=sp,
                                 default_splits=d, us=us))
                print(f"sweep {out}x{n_in} 3b {v} splits={sp} (default {d}): {us:.1f} us", flush=True)
            save()
        del ls, first
        torch.cuda.empty_cache()


def table(rows, meta, path) -> None:
    main_rows = [r for r in rows if not r.get("sweep")]
    variants = meta["variants"]
    keys = sorted({(r["model"], r["out"], r["inp"], r["bits"], r["tokens"]) for r in main_rows},
                  key=lambda k: (k[4], k[0], k[1] * 0 + SHAPE_ORDER.get((k[1], k[2]), 99), k[3]))
    lines = ["# Decode kernel variants vs FP16 cuBLAS", "",
             f"{meta['device']}, {meta['date']}, torch {meta['torch']}, copy bandwidth {meta['copy_bw_Bps'] / 1e12:.2f} TB/s. "
             f"{meta['method']}. Cells: us (speedup over FP16, % of copy bandwidth); splits in the JSON.", "",
             "| layer | bits | T | FP16 us | " + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for k in keys:
        cells = []
        fp = None
        for v in variants:
            r = next((r for r in main_rows if (r["model"], r["out"], r["inp"], r["bits"], r["tokens"]) == k
                      and r["variant"] == v), None)
            if r is None:
                cells.append("")
                continue
            fp = r["fp16_us"]
            cells.append(f"{r['us']:.1f} ({r['speedup']:.2f}x, {100 * r['bw_frac']:.0f}%)" if "us" in r else r["error"][:40])
        lines.append(f"| {k[0]} {k[1]}x{k[2]} | {k[3]} | {k[4]} | {fp:.1f} | " + " | ".join(cells) + " |")
    sw = [r for r in rows if r.get("sweep")]
    if sw:
        lines += ["", "Split sweep (3 bits, 1 token): " + "; ".join(
            f"{r['out']}x{r['inp']} {r['variant']} S={r['splits']} (default {r['default_splits']}): {r['us']:.1f} us"
            for r in sw)]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


SHAPE_ORDER = {s: i for i, s in enumerate(s for m in SHAPES.values() for s in m)}

if __name__ == "__main__":
    main()
