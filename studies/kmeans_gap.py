"""How far cmpq's Lloyd k-means (``kmeans_1d``) is from the optimum (``kmeans_1d_exact``) on real
weight columns of SmolLM2-135M: mean SSE ratio per codebook size, over a sample of columns.

    python studies/kmeans_gap.py --columns 40
"""
from __future__ import annotations

import argparse
import json

import torch

from cmpq.algorithm.kmeans import kmeans_1d, kmeans_1d_exact
from cmpq.model.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", type=int, default=40)
    ap.add_argument("--layers", default="model.layers.3.self_attn.q_proj,model.layers.10.mlp.down_proj,model.layers.25.mlp.up_proj")
    a = ap.parse_args()
    model, _ = load_model("smollm2-135m")
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in a.layers.split(","):
        W = mods[name].weight.detach().float()
        cols = torch.randperm(W.shape[1], generator=g)[: a.columns]
        x = W[:, cols].T.contiguous()
        for k in (4, 8, 16):
            lloyd = kmeans_1d(x, k).half().float()
            ratios = []
            for r in range(x.shape[0]):
                _, opt = kmeans_1d_exact(x[r], k)
                got = float(((x[r, :, None] - lloyd[r, None, :]) ** 2).min(dim=1).values.double().sum())
                ratios.append(got / max(opt, 1e-30))
            t = torch.tensor(ratios)
            rows.append({"layer": name, "k": k, "mean_ratio": round(float(t.mean()), 4), "max_ratio": round(float(t.max()), 4)})
            print(rows[-1], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
