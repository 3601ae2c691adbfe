"""How far cmpq's Lloyd k-means (``kmeans_1d``) is from the optimum (``kmeans_1d_exact``) on real
weight columns of SmolLM2-135M: mean SSE ratio per codebook size, over a sample of columns, for
plain Lloyd (two starts) and with ``--swaps`` merge-and-split rounds.

    python studies/kmeans_gap.py --columns 40
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

from cmpq.algorithm import kmeans
from cmpq.algorithm.kmeans import kmeans_1d, kmeans_1d_exact
from cmpq.model.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", type=int, default=40)
    ap.add_argument("--swaps", type=int, default=9)
    ap.add_argument("--swap-batch", type=int, default=None, help="moves per batched Lloyd run (kmeans.SWAP_BATCH)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", default="model.layers.3.self_attn.q_proj,model.layers.10.mlp.down_proj,model.layers.25.mlp.up_proj")
    a = ap.parse_args()
    if a.swap_batch:
        kmeans.SWAP_BATCH = a.swap_batch
    model, _ = load_model("smollm2-135m")
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in a.layers.split(","):
        W = mods[name].weight.detach().float()
        cols = torch.randperm(W.shape[1], generator=g)[: a.columns]
        x = W[:, cols].T.contiguous()
        for k in (4, 8, 16):
            opt = torch.tensor([kmeans_1d_exact(x[r], k)[1] for r in range(x.shape[0])], dtype=torch.float64)
            row = {"layer": name, "k": k}
            for label, swaps in (("lloyd", 0), (f"swaps{a.swaps}", a.swaps)):
                c = kmeans_1d(x, k, swaps=swaps)
                got = ((x[:, :, None] - c[:, None, :]) ** 2).min(dim=2).values.double().sum(dim=1)
                t = got / opt.clamp(min=1e-30)
                row[f"{label}_mean_ratio"] = round(float(t.mean()), 4)
                row[f"{label}_max_ratio"] = round(float(t.max()), 4)
            rows.append(row)
            print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": "CPU, 2 cores", "columns": a.columns,
                       "swaps": a.swaps, "swap_batch": kmeans.SWAP_BATCH,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
