"""Weight error of per-channel codebooks with and without per-row scales, on SmolLM2's real weights.

For every linear of a few blocks: relative squared error ``||W - W_hat||^2 / ||W||^2`` of a
``2**b``-entry 1-D k-means codebook per input channel, fitted (a) on ``W``, (b) on ``W / s`` with
row weights ``s^2`` and scaled back, ``s`` each row's RMS (what ``CMPQConfig.row_scale`` does,
without compensation), (c) the same with ``s`` each row's max |w|. No calibration data: this asks
only whether one codebook serves rows of different size better once they are scaled.

    python studies/row_scale_weights.py --blocks 0 10 20 29 --out studies/results/row-scale-weights.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d
from cmpq.model.blocks import find_blocks, find_linears
from cmpq.model.loading import load_model


def fit(w: torch.Tensor, k: int, s: torch.Tensor, iters: int = 30) -> torch.Tensor:
    cols = (w / s[:, None]).t().contiguous()
    cb = kmeans_1d(cols, k, max_iter=iters, weight=(s**2)[None, :].expand_as(cols).contiguous())
    return cb.gather(1, assign_nearest(cols, cb)).t() * s[:, None]


def rel(w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((w - q).norm() / w.norm()) ** 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--out", default="studies/results/row-scale-weights.json")
    a = ap.parse_args()
    model, _ = load_model("smollm2-135m")
    _, blocks = find_blocks(model)
    rows = []
    for i in a.blocks:
        for name, lin in find_linears(blocks[i]).items():
            w = lin.weight.detach().float()
            for bits in (3, 4):
                k = 2**bits
                r = {"block": i, "layer": name, "bits": bits,
                     "none": rel(w, fit(w, k, torch.ones(w.shape[0]))),
                     "rms": rel(w, fit(w, k, w.pow(2).mean(1).sqrt().clamp_min(1e-8))),
                     "absmax": rel(w, fit(w, k, w.abs().amax(1).clamp_min(1e-8)))}
                rows.append(r)
                print({k2: (round(v, 5) if isinstance(v, float) else v) for k2, v in r.items()}, flush=True)
    summary = {}
    for bits in (3, 4):
        sel = [r for r in rows if r["bits"] == bits]
        summary[bits] = {m: sum(r[m] / r["none"] for r in sel) / len(sel) for m in ("rms", "absmax")}
        print(f"{bits} bits: mean error ratio to no scale: rms {summary[bits]['rms']:.3f}, "
              f"absmax {summary[bits]['absmax']:.3f} over {len(sel)} linears")
    with open(a.out, "w") as f:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": "CPU, 2 cores",
                   "rows": rows, "mean_ratio_to_no_scale": summary}, f, indent=1)


if __name__ == "__main__":
    main()
