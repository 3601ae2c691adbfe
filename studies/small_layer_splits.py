"""Where a small layer's one-token time goes: v4s at every split count vs FP16, and the floor.

SmolLM2-135M end to end is slower than FP16 (0.74x compiled, H100, 2026-12-07) although its
layers are 3-bit: at 0.1-0.9 M weights a layer is latency, not bytes. The planner picks a split
count S (kernel_v4.plan); with S > 1 the launch also writes partial sums, bumps a counter and lets
the last block reduce them. This times, for each SmolLM2 shape, FP16 ``F.linear``, v4s as planned
and v4s forced to every S that fits, plus two floors: an empty kernel (``y.zero_()`` on the
output) and a 1-element copy, all as benchmarks/kernel_bench.py times a layer (CUDA graph over
rotating sets, median of do_bench). If S = 1 is as fast as the plan and near FP16, the split-K
epilogue is not the fixed cost and a "no split" kernel would not close the gap.

    PYTHONPATH=$PWD python studies/small_layer_splits.py --out $OUT/small-layer-splits.json   (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from kernel_bench import ROTATE_BYTES, SHAPES, time_graph  # noqa: E402

from cmpq.kernels import kernel_v4  # noqa: E402
from cmpq.kernels.testing import mix_counts, random_layer  # noqa: E402

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--models", default="135M")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model in a.models.split(","):
        for out, n_in in SHAPES[model]:
            counts, n_act = mix_counts(n_in, a.bits)
            n = max(2, min(64, math.ceil(ROTATE_BYTES / (out * n_in * 2))))  # FP16 copies beyond L2
            ls = [random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda", generator=gen,
                               pack=False) for _ in range(n)]
            rts = [l.runtime() for l in ls]
            ws = [torch.randn(out, n_in, device="cuda", dtype=torch.float16) for _ in range(n)]
            xs = [torch.randn(1, n_in, device="cuda", dtype=torch.float16) for _ in range(n)]
            ys = [torch.empty(1, out, device="cuda", dtype=torch.float16) for _ in range(n)]
            planned = kernel_v4._params(rts[0], None)[2]
            r = dict(model=model, shape=[out, n_in], bits=a.bits, planned_splits=planned,
                     fp16_us=time_graph([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)], n),
                     empty_kernel_us=time_graph([lambda y=y: y.zero_() for y in ys], n),
                     planned_us=time_graph([lambda rt=rt, x=x: kernel_v4.decode(rt, x) for rt, x in zip(rts, xs)], n),
                     by_splits={})
            for s in SPLITS:
                if kernel_v4._params(rts[0], s) is None:
                    continue
                r["by_splits"][s] = time_graph([lambda rt=rt, x=x: kernel_v4.decode(rt, x, splits=s)
                                               for rt, x in zip(rts, xs)], n)
            best = min(r["by_splits"], key=r["by_splits"].get)
            print(f"{model} {out}x{n_in}: fp16 {r['fp16_us']:.2f} us, empty kernel {r['empty_kernel_us']:.2f}, "
                  f"v4s planned S={planned} {r['planned_us']:.2f}, best S={best} {r['by_splits'][best]:.2f}; "
                  + " ".join(f"S{s}={t:.2f}" for s, t in r["by_splits"].items()), flush=True)
            rows.append(r)
            del ls, rts, ws
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, method="median of do_bench over a CUDA graph rotating sets (> 192 MiB)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
