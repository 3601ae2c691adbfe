"""Would a per-output-row FP16 scale help per-channel codebooks? (CPU study, fake-quantized.)

A codebook is shared by all rows of its input channel, so rows of very different magnitude (q/k
heads, gate rows) compete for its entries. Dividing each row by its RMS ``s_r`` before fitting and
multiplying back after (``W ~ diag(s) Q``) lets one codebook serve them all; fitting on ``W / s``
with row weights ``s^2`` keeps the objective the true squared error. GPTQ's error feedback is row by
row with a shared inverse Hessian, so it commutes with the row scaling exactly.

The scale costs 16 bits per output row, charged here by lowering the budget by that amount. The
layers are installed as dense ``nn.Linear`` (``s * dequantize()``), so fine-tuning is off.

This is the study that led to ``CMPQConfig.row_scale`` (format v4); it patches the algorithm from
outside and so runs the built-in option off (``row_scale=False``) to measure the same thing.
It patches ``planning.layer_options`` and ``compensated.quantize_compensated``, which the walk has
called by other names since 2026-12-07 (layers of one shape quantized together): run it at the
commit that made its results (24d93d1), where it ran as written; on later code it refuses.

    python studies/row_scale.py --run bits=4.3 --run bits=3.36 --out studies/results/row-scale.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
from torch import nn

import cmpq
import cmpq.algorithm.compensated as comp
import cmpq.model.planning as planning
from cmpq.config import CMPQConfig
from cmpq.data.tokens import eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model.blocks import find_blocks, find_linears, set_module
from cmpq.model.loading import load_model
from cmpq.options import RunOptions
from cmpq.quantize import resolve_calibration

qz = sys.modules["cmpq.quantize"]  # the module (``cmpq.quantize`` the attribute is the function)
SCALES: dict[int, torch.Tensor] = {}


def row_rms(w: torch.Tensor) -> torch.Tensor:
    return w.float().pow(2).mean(1).sqrt().clamp_min(1e-8)


def patch() -> None:
    if not hasattr(planning, "layer_options"):
        raise SystemExit("studies/row_scale.py patches functions the walk no longer calls; run it at commit 24d93d1")
    layer_options, quantize_compensated = planning.layer_options, comp.quantize_compensated

    def scaled_options(weight, hdiag, widths, n_sparse, iters=25, fp16=True, row_weight=None):
        s = row_rms(weight)
        rw = s**2 if row_weight is None else row_weight * s**2 / row_weight.mean()
        return layer_options(weight / s[:, None], hdiag, widths, n_sparse, iters, fp16, rw)

    def scaled_quantize(weight, H, widths, n_sparse, *args, row_weight=None, **kw):
        s = row_rms(weight)
        SCALES[weight.data_ptr()] = s
        rw = s**2 if row_weight is None else row_weight * s**2 / row_weight.mean()
        return quantize_compensated(weight.float() / s[:, None], H, widths, n_sparse, *args, row_weight=rw, **kw)

    def dense_install(block, name, lin, parts):
        q = qz.pack_linear(parts, None)
        dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        dense.weight.data = (q.dequantize(torch.float32) * SCALES.pop(lin.weight.data_ptr())[:, None]).to(lin.weight.dtype)
        if lin.bias is not None:
            dense.bias.data = lin.bias.data.clone()
        set_module(block, name, dense)

    planning.layer_options = scaled_options
    comp.quantize_compensated = scaled_quantize
    qz._install = dense_install


def overhead_bits(model) -> float:
    _, blocks = find_blocks(model)
    lins = [lin for b in blocks for lin in find_linears(b).values()]
    return 16 * sum(l.out_features for l in lins) / sum(l.weight.numel() for l in lins)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load_model("smollm2-135m")
    extra = overhead_bits(base)
    patch()
    wiki = eval_windows(tok, "wikitext2", 2048, nsamples=a.windows).ids
    rows = []
    for spec in a.run:
        kw = dict(kv.split("=") for kv in spec.split(","))
        bits = float(kw.pop("bits"))
        cfg = CMPQConfig(bits=bits - extra, finetune_epochs=0, row_scale=False,
                         **{k: type(getattr(CMPQConfig, k))(v) for k, v in kw.items()})
        model, _ = load_model("smollm2-135m")
        t0 = time.perf_counter()
        calib = resolve_calibration(tok, RunOptions(calib="c4", nsamples=a.nsamples, seqlen=a.calib_seqlen))
        cmpq.quantize(model, tok, cfg, calib=calib)
        rows.append({"run": spec, "effective_bits_with_scales": bits, "row_scale_bits": round(extra, 4),
                     "wiki2": round(perplexity(model, wiki, log=None), 3), "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": "CPU, 2 cores",
                           "nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen, "windows": a.windows,
                           "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
