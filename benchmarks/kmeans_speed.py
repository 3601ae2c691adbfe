"""Time CMPQ's per-layer quantization (allocation, two k-means passes, outlier search, packing)
on Llama-2-7B/70B-shaped random layers. Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from cmpq.algorithm.layer import quantize_weight
from cmpq.config import CMPQConfig
from cmpq.nn.linear import pack_linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672)]  # [out, in]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results/kmeans-speed.json")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, device=dev, dtype=torch.float16) * 0.02
        act = torch.rand(in_f, device=dev) ** 4 * 100
        cfg = CMPQConfig(bits=a.bits, algorithm="paper")  # times the paper's layer step
        for rep in range(3):  # first run includes warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            parts = quantize_weight(w, act, cfg)
            layer = pack_linear(parts, None)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        err = ((layer.dequantize(torch.float32) - w.float()).norm() / w.float().norm()).item()
        rows.append({"shape": [out_f, in_f], "bits": a.bits, "seconds": round(dt, 4), "rel_err": err,
                     "effective_bits": layer.effective_bits()})
        print(f"{out_f}x{in_f}: {dt:.3f}s  rel.err {err:.4f}  eff.bits {layer.effective_bits():.3f}", flush=True)
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
