"""Why codebook fine-tuning stopped paying on the CPU protocol: one quantized model, several passes.

Quantizes SmolLM2-135M once without fine-tuning (the compensated default at ``--bits``), then runs
``cmpq.model.distill.finetune`` from copies of that same model with different learning rates, and
once without the straight-through projection onto the stored 8-bit codebook grids (the values then
train in float32; the study evaluates them in memory, never saves them). Each pass reports its
training KL, held-out KL per epoch (the curve says what each epoch did, also where held-out
selection rolled it back), the epoch it kept, and WikiText-2 perplexity of what it kept.

``--scale-lrs`` adds passes that also train format v4's row scales (the product keeps them fixed),
each at its own step relative to the scale itself: ``s = s0 * (1 + k * u)`` with ``u`` trained beside
the values, ``k`` chosen so that one Adam step of ``u`` (``lr`` x the values' RMS) moves ``s`` by the
given fraction. Earlier passes trained ``s`` directly with the values' step, tens of percent of a
scale per step, and every epoch got worse (docs/results.md, "Row scales").

    CMPQ_DATA_DIR=../shared/data python studies/finetune_sweep.py --bits 3.36 --out studies/results/ft-sweep.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time

import torch

import cmpq
from cmpq.config import CMPQConfig
from cmpq.data.tokens import eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model import distill
from cmpq.model.loading import load_model
from cmpq.options import RunOptions
from cmpq.quantize import resolve_calibration


def scale_tunable(base: type, lr: float, scale_lr: float) -> type:
    """``TunableLinear`` whose row scales train too, each step moving them by about ``scale_lr``."""

    class ScaleTunable(base):
        def __init__(self, layer) -> None:
            super().__init__(layer)
            v_rms = float(self.values.detach().pow(2).mean().sqrt().clamp(min=1e-8))
            self.k = scale_lr / (lr * v_rms)  # one Adam step of u (~ lr * v_rms) -> scale_lr of s
            self.u = torch.nn.Parameter(torch.zeros(layer.out_features, device=self.values.device))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = distill._Gather.apply(self.stored(), self.where)
            if self.row_scale is not None:
                s = self.row_scale * (1 + self.k * self.u)
                w = w * s.half().float()[:, None]  # the scale as FP16 stores it
            return torch.nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

        @torch.no_grad()
        def write_back(self):
            layer = super().write_back()
            if self.row_scale is not None:
                layer.row_scale = (self.row_scale * (1 + self.k * self.u)).half()
                layer._dense_cache = None
            return layer

    return ScaleTunable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=3.36)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lrs", default="5e-3,1e-3,2e-4")
    ap.add_argument("--no-projection-lr", type=float, default=5e-3, help="0: skip that pass")
    ap.add_argument("--scale-lrs", default="", help="also train row scales at these relative steps (values at "
                    "the first of --lrs)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cpu")
    base, tok = load_model("smollm2-135m")
    wiki = eval_windows(tok, "wikitext2", 2048, nsamples=a.windows).ids
    calib = resolve_calibration(tok, RunOptions(calib="c4", nsamples=a.nsamples, seqlen=a.calib_seqlen))
    ids = calib.ids
    teacher = distill.teacher_states(base, ids, dev)
    t0 = time.perf_counter()
    cmpq.quantize(base, tok, CMPQConfig(bits=a.bits, finetune_epochs=0), calib=calib, device=dev, log=None)
    rows = [{"pass": "quantized, no fine-tuning", "wiki2": round(perplexity(base, wiki, log=None), 3),
             "quantize_seconds": round(time.perf_counter() - t0, 1)}]
    print(rows[-1], flush=True)
    passes = [(f"lr={lr}", float(lr), True) for lr in a.lrs.split(",")]
    if a.no_projection_lr:
        passes.append((f"lr={a.no_projection_lr}, no 8-bit projection", a.no_projection_lr, False))
    passes += [(f"lr={a.lrs.split(',')[0]}, row scales at {s}", float(a.lrs.split(",")[0]), float(s))
               for s in a.scale_lrs.split(",") if s]
    plain_stored, plain_class = distill.TunableLinear.stored, distill.TunableLinear
    for name, lr, project in passes:
        model = copy.deepcopy(base)
        if isinstance(project, float):
            distill.TunableLinear = scale_tunable(plain_class, lr, project)
        else:
            distill.TunableLinear.stored = plain_stored if project else (lambda self: self.values)
        t0 = time.perf_counter()
        try:
            rec = distill.finetune(model, ids, teacher, dev, epochs=a.epochs, lr=lr)
        finally:
            distill.TunableLinear, plain_class.stored = plain_class, plain_stored
        rows.append({"pass": name, **rec, "wiki2_kept": round(perplexity(model, wiki, log=None), 3),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        with open(a.out, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": "CPU, 2 cores",
                       "bits": a.bits, "nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen,
                       "wiki2_windows": a.windows, "epochs": a.epochs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
