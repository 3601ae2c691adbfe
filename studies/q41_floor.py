"""Why 4-bit per-channel codebooks cannot reach FP16 on SmolLM2: its weights are already Q4_1.

The GGUF stores every row of every matrix in blocks of 32 consecutive input channels, each block
with its own scale and minimum and 16 levels. So a (row, 32-column block) holds at most 16
distinct values, while one input channel (a column) collects values from every row's own grid.
This study measures, on the real weights:

- distinct values per (row, block of 32) and per column;
- the relative weight error ``||W - W_hat||_F / ||W||_F`` at 4 bits with groups of 32, 64 and 128
  along the input, of min-max RTN (integer zero point, as the RTN/GPTQ baselines) and of min-max with
  a float minimum (Q4_1's own form), and of a 16-entry 1-D k-means codebook per input channel (what
  CMPQ stores at 4 bits, without compensation or fine-tuning).

If the float-minimum grid at g32 is ~0 and per-channel k-means is not, CMPQ's 4-bit floor on this model is the
pre-quantized grid, not the algorithm.

    python studies/q41_floor.py --blocks 0 10 20 29
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from cmpq.algorithm.kmeans import kmeans_1d, assign_nearest
from cmpq.baselines.rtn import rtn_quantize
from cmpq.model.blocks import find_blocks, find_linears
from cmpq.model.loading import load_model


def rel_err(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w - w_hat).norm() / w.norm())


def per_channel_kmeans(w: torch.Tensor, k: int) -> torch.Tensor:
    cols = w.t().contiguous()  # [in, out]: one codebook per input channel
    cb = kmeans_1d(cols, k)
    idx = assign_nearest(cols, cb)
    return cb.gather(1, idx).t()


def minmax_float_offset(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Q4_1's own grid: per group, ``min + d * round((w - min) / d)`` with ``d = (max - min) / (2^b - 1)``
    and a float minimum (RTN's integer zero point would move the grid)."""
    out, n = w.shape
    pad = -n % group  # a ragged last group (576 = 4 x 128 + 64) is its own group, padded with its minimum
    wp = torch.cat([w, w[:, -1:].expand(out, pad)], 1) if pad else w
    g = wp.reshape(out, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return (lo + d * torch.round((g - lo) / d)).reshape(out, -1)[:, :n]


def distinct_per_block(w: torch.Tensor, block: int = 32) -> float:
    out, n = w.shape
    blocks = w[:, : n // block * block].reshape(out, n // block, block)
    s = blocks.sort(-1).values
    return float(((s[..., 1:] != s[..., :-1]).sum(-1) + 1).float().mean())


def distinct_per_column(w: torch.Tensor) -> float:
    s = w.t().sort(-1).values
    return float(((s[:, 1:] != s[:, :-1]).sum(-1) + 1).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--out", default="studies/results/q41-floor.json")
    a = ap.parse_args()
    model, _ = load_model("smollm2-135m")
    _, blocks = find_blocks(model)
    rows = []
    for i in a.blocks:
        for name, lin in find_linears(blocks[i]).items():
            w = lin.weight.detach().float()
            r = {"layer": f"{i}.{name}", "shape": list(w.shape),
                 "distinct_per_row_block32": round(distinct_per_block(w), 2),
                 "distinct_per_column": round(distinct_per_column(w), 1)}
            for g in (32, 64, 128):
                r[f"rtn4_g{g}"] = round(rel_err(w, rtn_quantize(w, 4, g)), 5)
                r[f"minmax4_float_offset_g{g}"] = round(rel_err(w, minmax_float_offset(w, 4, g)), 5)
            r["kmeans16_per_channel"] = round(rel_err(w, per_channel_kmeans(w, 16)), 5)
            rows.append(r)
            print(r, flush=True)
    keys = [k for k in rows[0] if k.startswith(("rtn", "minmax", "kmeans", "distinct"))]
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 5) for k in keys}
    print("mean:", mean)
    Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": "CPU (dev machine)",
                                       "model": "smollm2-135m (Q4_1 GGUF)", "mean": mean, "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
