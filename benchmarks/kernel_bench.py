"""Per-layer decode timing: CMPQ kernels vs FP16 ``F.linear`` (cuBLAS) on Llama-2 shapes.

Each point is the median (``triton.testing.do_bench``) of a CUDA graph that runs the layer over
several weight/input sets in turn (so nothing sits in L2), divided by the number of sets; the graph
also removes Python launch overhead, as in a graph-captured decode loop. The device-to-device copy
bandwidth is measured in the same run; "bw" is (packed layer + activations + output bytes) / time
as a fraction of it. Usage: ``python benchmarks/kernel_bench.py [--out PATH] [--quick]
[--impl dispatch|cuda|triton|prefill] [--force KERNEL] [--models 7B,70B] [--bits 3] [--batches 1,4,16]
[--sweep] [--max-minutes M] [--peer gemlite]``. ``--impl dispatch`` (default) times exactly what ``CMPQLinear.forward``
runs (the kernel ``cmpq.kernels.dispatch.TABLE`` picks; ``--force v4s`` etc. imposes one through
``cmpq.kernels.force``); ``cuda`` times the v3b CUDA kernel, ``triton`` the Triton kernel
(cmpq/kernels/lut_gemv.py), ``prefill`` the dequantize + cuBLAS path at any token count; prefill rows
also carry ``fp16_transposed_us``, FP16 cuBLAS with the weight in the layout prefill hands it
(``[in, out]`` contiguous), so a row's gap to FP16 splits into the dequantization and the GEMM layout.
A Markdown table is written next to the JSON.

``--peer gemlite`` times, in the same run and the same way, what a user would pick instead: gemlite's
Triton weight-only kernels (HQQ/vLLM's; asymmetric INT with an FP16 scale and zero per group of
128, 4 and 2 bits) on the same shapes and token counts, as ``peer_rows`` in the JSON. gemlite is not
a dependency: install its wheel (pure Python) beside the package.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import time
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from cmpq.kernels import KERNELS, cuda_decode, force  # noqa: E402
from cmpq.kernels.lut_gemv import decode as triton_decode  # noqa: E402
from cmpq.kernels.testing import mix_counts, random_layer  # noqa: E402

SHAPES = {  # out x in
    "135M": [(576, 576), (192, 576), (1536, 576), (576, 1536)],  # SmolLM2-135M: q/o, k/v, gate/up, down
    "7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "13B": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "70B": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
BITS = [2.0, 2.5, 3.0, 3.5, 4.0]
BATCHES = [1, 4, 16]
ROTATE_BYTES = 192 << 20  # > 3x the H100/H200 L2


def time_graph(fns, n: int) -> float:
    """Median microseconds of one call, from a CUDA graph that calls all ``fns`` once each."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ms = do_bench(g.replay, warmup=5, rep=40, return_mode="median")
    return 1e3 * ms / n


DEFAULT_OUT = "benchmarks/results/kernels-h200.json"


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def layer_bytes(layer) -> int:
    return sum(layer.storage_bytes().values())


def _sweep_layers(out: int, n_in: int) -> list:
    """3-bit layers of one shape for the split sweeps: enough copies (2..12) that a graph replay over
    them reads more than ROTATE_BYTES, so L2 holds none of them."""
    counts, n_act = mix_counts(n_in, 3.0)
    gen = torch.Generator().manual_seed(1)
    nl = max(2, min(12, math.ceil(ROTATE_BYTES / (out * n_in * 0.4))))
    return [random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen, pack=False)
            for _ in range(nl)]


def sweep_cuda() -> None:
    """Split sweep of the v3 CUDA kernel (default = BLOCKS_PER_SM * SMs blocks)."""
    for out, n_in in [(4096, 11008), (11008, 4096), (28672, 8192)]:
        ls = _sweep_layers(out, n_in)
        for T in (1, 16):
            xs = [torch.randn(T, n_in, device="cuda", dtype=torch.float16) for _ in ls]
            rts = [l.runtime() for l in ls]
            d = cuda_decode._params(rts[0], 1 if T == 1 else 16, None)[2]
            for sp in sorted({max(1, d // 4), max(1, d // 2), d, 2 * d, 4 * d}):
                if cuda_decode.plan(rts[0].groups, out, 1 if T == 1 else 16, 132, sp)[2] > cuda_decode.MAX_SMEM:
                    continue
                us = time_graph([lambda rt=rt, x=x: cuda_decode.decode(rt, x, splits=sp) for rt, x in zip(rts, xs)],
                                len(ls))
                print(f"sweep-cuda {out}x{n_in} T={T} splits={sp}{' (default)' if sp == d else ''}: {us:.1f} us", flush=True)
        del ls
        torch.cuda.empty_cache()


def sweep_mma(out_path: str) -> None:
    """The tensor-core kernel (2..16 tokens) at its default split and at the split that fills exactly
    one wave of blocks (3 per SM), on 7B and 70B shapes (benchmarks/notes-kernels.md).
    Graph-timed like the grid; rows also go to ``out_path`` as JSON."""
    from cmpq.kernels import kernel_mma

    sms, rows = cuda_decode._num_sms(torch.device("cuda")), []
    for out, n_in in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (28672, 8192), (8192, 28672)]:
        ls = _sweep_layers(out, n_in)
        rts = [l.runtime() for l in ls]
        for T in (2, 4, 8, 16):
            ntl = 1 if T <= 8 else 2
            rb, d = kernel_mma.plan(rts[0].mma.cs, rts[0].mma.ntiles, ntl, sms)[:2]
            one_wave = max(1, sms * kernel_mma.BLOCKS_PER_SM // rb)
            xs = [torch.randn(T, n_in, device="cuda", dtype=torch.float16) for _ in ls]
            for sp in sorted({d, one_wave}):
                fns = [lambda rt=rt, x=x: kernel_mma.decode(rt, x, splits=sp) for rt, x in zip(rts, xs)]
                if fns[0]() is None:
                    continue
                us = time_graph(fns, len(ls))
                tag = " (default)" if sp == d else (" (one wave)" if sp == one_wave else "")
                print(f"sweep-mma {out}x{n_in} T={T} splits={sp} blocks={rb * sp}{tag}: {us:.1f} us", flush=True)
                rows.append({"out": out, "in": n_in, "tokens": T, "splits": sp, "blocks": rb * sp, "us": us,
                             "default": sp == d, "one_wave": sp == one_wave})
        del ls, rts
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "sms": sms, "method": "CUDA-graph replay over rotating layers, median (time_graph)"}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, out_path)


def sweep() -> None:
    """Tile-size / split sweep (decode, 1 and 16 tokens) to pick defaults."""
    for out, n_in in [(4096, 11008), (11008, 4096)]:
        counts, n_act = mix_counts(n_in, 3.0)
        gen = torch.Generator().manual_seed(1)
        ls = [random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen, pack=False)
              for _ in range(12)]
        for T in (1, 16):
            xs = [torch.randn(T, n_in, device="cuda", dtype=torch.float16) for _ in ls]
            for bn in (32, 64, 128):
                for sp in (None, 16):
                    us = time_graph([lambda l=l, x=x: triton_decode(l.runtime(), x, block_n=bn, splits=sp)
                                     for l, x in zip(ls, xs)], len(ls))
                    print(f"sweep {out}x{n_in} T={T} block_n={bn} splits={sp}: {us:.1f} us", flush=True)


PEER_BITS = (4, 2)
PEER_GROUP = 128


def peer_layers(out: int, n_in: int, bits: int, n: int, dev: str) -> tuple[list, list[torch.Tensor]]:
    """``n`` random gemlite layers (``W = (W_q - zero) * scale`` per group of ``PEER_GROUP``) and
    their dense FP32 weights (only the first, for the error check)."""
    from gemlite.helper import A16Wn

    layers, dense = [], []
    for i in range(n):
        w_q = torch.randint(0, 2 ** bits, (out, n_in), device=dev, dtype=torch.uint8)
        scale = torch.rand(out, n_in // PEER_GROUP, device=dev, dtype=torch.float16) * 0.01 + 0.005
        zero = torch.full_like(scale, (2 ** bits - 1) / 2)
        if i == 0:
            s = scale.float().repeat_interleave(PEER_GROUP, 1)
            z = zero.float().repeat_interleave(PEER_GROUP, 1)
            dense.append((w_q.float() - z) * s)
        layers.append(A16Wn(device=dev, dtype=torch.float16).from_weights(w_q, scale, zero, bits, PEER_GROUP))
    return layers, dense


def _peer_config() -> str | None:
    """gemlite ships tuned configs per GPU and autotunes (minutes per shape) where it has none. It
    has none for an H200, the same SM90 chip as the H100 with more memory: use the H100's."""
    import gemlite

    name = torch.cuda.get_device_name().lower()
    path = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    if "h200" in name and os.path.exists(path):
        gemlite.load_config(path)
        return path
    return None


def measure_peer(out: int, n_in: int, batches: list[int], fp16_us: dict, bw: float, model: str, dev: str) -> list[dict]:
    """gemlite rows for one shape; an error (not installed, a shape it refuses) is a row too."""
    import gemlite

    rows = []
    for bits in PEER_BITS:
        nbytes = out * n_in * bits // 8 + out * (n_in // PEER_GROUP) * 4
        nl = max(2, min(32, math.ceil(ROTATE_BYTES / nbytes)))
        try:
            layers, dense = peer_layers(out, n_in, bits, nl, dev)
        except Exception as e:  # noqa: BLE001 - a refused shape is a result
            rows.append(dict(model=model, out=out, inp=n_in, bits=bits, error=f"{type(e).__name__}: {e}"))
            continue
        for T in batches:
            xs = [torch.randn(T, n_in, device=dev, dtype=torch.float16) for _ in range(nl)]
            r = dict(peer=f"gemlite {gemlite.__version__}", model=model, out=out, inp=n_in, bits=bits,
                     group=PEER_GROUP, eff_bits=bits + 32 / PEER_GROUP, tokens=T)
            try:
                with torch.no_grad():
                    y = layers[0](xs[0])
                    ref = F.linear(xs[0].float(), dense[0])
                    r["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                    us = time_graph([lambda l=l, x=x: l(x) for l, x in zip(layers, xs)], nl)
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {e}"
                rows.append(r)
                continue
            moved = nbytes + 2 * T * (n_in + out)
            r.update(peer_us=us, fp16_us=fp16_us[(out, n_in, T)], speedup=fp16_us[(out, n_in, T)] / us,
                     bw_frac=moved / (us * 1e-6) / bw)
            rows.append(r)
            print(f"peer {r['peer']} {model} {out}x{n_in} {bits}b g{PEER_GROUP} T={T}: {us:.1f}us "
                  f"x{r['speedup']:.2f} err {r['rel_err']:.1e}", flush=True)
        del layers
        torch.cuda.empty_cache()
    return rows


def write_table(rows: list[dict], meta: dict, path: str, peer_rows: list[dict] | None = None) -> str:
    """The Markdown table of a run (also rebuilt from its JSON by ``--table-only``)."""
    lines = [f"# CMPQ layers vs FP16 cuBLAS ({meta['impl']})", "",
             f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"copy bandwidth {meta['copy_bw_Bps'] / 1e12:.2f} TB/s. {meta['method']}. Speedup = FP16 us / CMPQ us.", "",
             "| layer (out x in) | bits | eff. bits | tokens | CMPQ us | FP16 us | speedup | floor us | % copy bw |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} {r['out']}x{r['inp']} | {r['bits']} | {r['eff_bits']:.2f} | {r['tokens']} | "
                     f"{r['cmpq_us']:.1f} | {r['fp16_us']:.1f} | {r['speedup']:.2f} | {r['floor_us']:.1f} | "
                     f"{100 * r['bw_frac']:.0f} |")
    if peer_rows:
        lines += ["", "Peer, same run and timing (FP16 us as above):", "",
                  "| peer | layer (out x in) | bits, group | eff. bits | tokens | peer us | speedup | % copy bw |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in peer_rows:
            if "peer_us" not in r:
                lines.append(f"| {r.get('peer', 'gemlite')} | {r['model']} {r['out']}x{r['inp']} | {r['bits']} | | "
                             f"{r.get('tokens', '')} | error: {r['error'][:80]} | | |")
                continue
            lines.append(f"| {r['peer']} | {r['model']} {r['out']}x{r['inp']} | {r['bits']}, g{r['group']} | "
                         f"{r['eff_bits']:.2f} | {r['tokens']} | {r['peer_us']:.1f} | {r['speedup']:.2f} | "
                         f"{100 * r['bw_frac']:.0f} |")
    if meta.get("cut_short"):
        lines += ["", f"Cut short: {meta['cut_short']}."]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="7B shapes only")
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="split sweep (cuda) / block_n x splits sweep (triton)")
    ap.add_argument("--impl", choices=["dispatch", "cuda", "triton", "prefill", "mma"], default="dispatch",
                    help="prefill: the many-token path (use with e.g. --batches 64,512,2048); mma: with --sweep only")
    ap.add_argument("--force", choices=KERNELS, default=None,
                    help="with --impl dispatch: serve every call with this kernel (cmpq.kernels.force)")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new layer after this long")
    ap.add_argument("--table-only", action="store_true", help="rewrite the Markdown table from the JSON at --out")
    ap.add_argument("--models", default="7B,13B,70B")
    ap.add_argument("--bits", default=",".join(str(b) for b in BITS))
    ap.add_argument("--batches", default=",".join(str(b) for b in BATCHES))
    ap.add_argument("--peer", choices=["gemlite"], default=None,
                    help="also time a peer's low-bit kernel on every shape and token count (see the docstring)")
    args = ap.parse_args()
    if args.impl == "mma" and not args.sweep:
        ap.error("--impl mma is the tensor-core kernel's split sweep: add --sweep (the grid times it through --impl dispatch)")
    if args.table_only:
        d = json.load(open(args.out))
        print(write_table(d["rows"], d["meta"], os.path.splitext(args.out)[0] + ".md", d.get("peer_rows")))
        return
    with force(args.force) if args.force else contextlib.nullcontext():
        measure(args)


def measure(args: argparse.Namespace) -> None:
    bits_list = [float(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    models = args.models.split(",")
    if args.impl in ("cuda", "dispatch") and not cuda_decode.available():
        sys.exit(f"CUDA decode kernel unavailable: {cuda_decode.library_error()}")

    def decode(layer, x, block_n=64):
        if args.impl == "dispatch":
            with torch.no_grad():
                return layer(x)
        if args.impl == "cuda":
            return cuda_decode.decode(layer.runtime(), x)
        if args.impl == "prefill":  # many tokens: dequantize into a scratch weight, then cuBLAS
            from cmpq.kernels.dequant import prefill

            return prefill(layer.runtime(), x)
        return triton_decode(layer.runtime(), x, block_n=block_n)
    torch.manual_seed(0)
    dev = "cuda"
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        if args.impl == "mma":
            return sweep_mma(args.out if args.out != DEFAULT_OUT else "benchmarks/results/mma-splits.json")
        sweep_cuda() if args.impl == "cuda" else sweep()
    rows, peer_rows, fp16_us, fp16_t_us = [], [], {}, {}
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, copy_bw_Bps=bw, block_n=args.block_n, impl=args.impl,
                forced=args.force,
                method="median of do_bench over a CUDA graph rotating weight/input sets (> 192 MiB)")
    if args.peer:
        meta["peer_config"] = _peer_config()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:  # after every point: a run cut short still leaves its rows
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, peer_rows=peer_rows), f, indent=1)

    shapes = [(m, s) for m in models for s in SHAPES[m] if not args.quick or m == "7B"]
    t_start = time.time()
    for model, (out, n_in) in shapes:
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print(f"time budget spent: {model} {out}x{n_in} and later shapes not run", flush=True)
            meta["cut_short"] = f"after {args.max_minutes} min: {model} {out}x{n_in} and later shapes not run"
            save()
            break
        nw = max(2, min(8, math.ceil(ROTATE_BYTES / (out * n_in * 2))))
        ws = [torch.randn(out, n_in, device=dev, dtype=torch.float16) * 0.02 for _ in range(nw)]
        for T in batches:
            xs = [torch.randn(T, n_in, device=dev, dtype=torch.float16) for _ in range(nw)]
            fp16_us[(out, n_in, T)] = time_graph([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)], nw)
        if args.impl == "prefill":
            # the GEMM prefill calls: the weight dequantized transposed ([in, out] contiguous), so
            # cuBLAS gets the other operand layout; this separates that from the dequantization's cost
            ws = [w.t().contiguous().t() for w in ws]
            for T in batches:
                xs = [torch.randn(T, n_in, device=dev, dtype=torch.float16) for _ in range(nw)]
                fp16_t_us[(out, n_in, T)] = time_graph([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)], nw)
        del ws
        if args.peer:
            peer_rows += measure_peer(out, n_in, batches, fp16_us, bw, model, dev)
            save()
        for bits in bits_list:
            counts, n_act = mix_counts(n_in, bits)
            n_sparse = round(0.0005 * out * n_in)
            gen = torch.Generator().manual_seed(int(bits * 10))
            first = random_layer(out, n_in, counts, n_act, n_sparse, device=dev, generator=gen, pack=False)
            nbytes = layer_bytes(first)
            nl = max(2, min(32, math.ceil(ROTATE_BYTES / nbytes)))
            layers = [first] + [random_layer(out, n_in, counts, n_act, n_sparse, device=dev, generator=gen, pack=False)
                                for _ in range(nl - 1)]
            for T in batches:
                xs = [torch.randn(T, n_in, device=dev, dtype=torch.float16) for _ in range(nl)]
                # correctness on this exact layer before timing it
                y = decode(layers[0], xs[0], block_n=args.block_n)
                ref = F.linear(xs[0].float(), layers[0].dequantize(torch.float32))
                err = ((y.float() - ref).norm() / ref.norm()).item()
                us = time_graph([lambda l=l, x=x: decode(l, x, block_n=args.block_n) for l, x in zip(layers, xs)], nl)
                moved = nbytes + 2 * T * (n_in + out)
                r = dict(model=model, out=out, inp=n_in, bits=bits, tokens=T, cmpq_us=us,
                         fp16_us=fp16_us[(out, n_in, T)], speedup=fp16_us[(out, n_in, T)] / us,
                         bytes=moved, floor_us=moved / bw * 1e6, bw_frac=moved / (us * 1e-6) / bw,
                         eff_bits=first.effective_bits(), rel_err=err)
                if (out, n_in, T) in fp16_t_us:
                    r["fp16_transposed_us"] = fp16_t_us[(out, n_in, T)]
                rows.append(r)
                print(f"{model} {out}x{n_in} {bits}b T={T}: {us:.1f}us fp16 {r['fp16_us']:.1f}us "
                      f"x{r['speedup']:.2f} bw {r['bw_frac']:.0%} err {err:.1e}", flush=True)
                save()
            del layers, first
            torch.cuda.empty_cache()
    save()
    print("\n" + write_table(rows, meta, os.path.splitext(args.out)[0] + ".md", peer_rows))


if __name__ == "__main__":
    main()
