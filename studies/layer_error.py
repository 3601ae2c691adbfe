"""Layer-level check of error compensation on SmolLM2: output error ||X (W - Q)^T||^2 on
calibration (C4) and held-out (WikiText-2) tokens, compensated vs not, for a few linears.

    CMPQ_DATA_DIR=../shared/data python studies/layer_error.py --nsamples 8
"""
from __future__ import annotations

import argparse

import torch

from cmpq.algorithm.compensated import quantize_compensated
from cmpq.algorithm.distortion import layer_options
from cmpq.algorithm.budget import solve
from cmpq.data.tokens import calibration_windows, eval_windows
from cmpq.model.loading import load_model


def capture(model, ids, names):
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--bits", type=float, default=3.3)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--layers", default="model.layers.5.self_attn.q_proj,model.layers.5.mlp.down_proj,model.layers.20.mlp.gate_proj")
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    names = a.layers.split(",")
    cal = capture(model, calibration_windows(tok, "c4", a.nsamples, 512, 0).ids, names)
    held = capture(model, eval_windows(tok, "wikitext2", 2048, nsamples=2).ids, names)
    mods = dict(model.named_modules())
    for n in names:
        W = mods[n].weight.detach().float()
        X = cal[n].float()
        H = X.T @ X
        opts = layer_options(W, H.diagonal().clone(), (1, 2, 3, 4), 0, 25)
        widths = torch.tensor(opts.widths)[solve([opts], a.bits * W.numel())[0]]
        for drop_first in (False,):
            Xc = X
            if drop_first:  # without the attention-sink tokens (position 0 of each window)
                keep = torch.ones(X.shape[0], dtype=torch.bool)
                keep[:: 512] = False
                Xc = X[keep]
            Hc = Xc.T @ Xc
            row = {}
            for comp in (False, True):
                Q = quantize_compensated(W, Hc, widths, 0, 50, a.damp, 128, comp).dequantize()
                for tag, Xe in (("calib", cal[n]), ("held", held[n])):
                    row[(comp, tag)] = float(((Xe.float() @ (W - Q).T) ** 2).sum() / (Xe.float() @ W.T).pow(2).sum())
            print(f"{n} {'no-sink' if drop_first else 'all'}: rel err calib {row[(False,'calib')]:.4f} -> {row[(True,'calib')]:.4f} (comp); "
                  f"held {row[(False,'held')]:.4f} -> {row[(True,'held')]:.4f}", flush=True)


if __name__ == "__main__":
    main()
