"""Quick CPU comparison of CMPQ configurations on SmolLM2-135M (reduced calibration and evaluation).

Not the benchmark (``benchmarks/quality.py`` is): a development loop for the compensated
algorithm's parts. Each run quantizes a fresh copy and evaluates WikiText-2 windows.

    CMPQ_DATA_DIR=../shared/data python studies/quick_quality.py --nsamples 16 --calib-seqlen 512 \
        --windows 4 --run algorithm=paper,bits=3 --run bits=3.36
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

import cmpq
from cmpq.config import CMPQConfig
from cmpq.data.tokens import eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model.loading import load_model
from cmpq.options import RunOptions
from cmpq.quantize import resolve_calibration


def parse(spec: str) -> dict:
    out = {}
    for kv in spec.split(","):
        k, v = kv.split("=")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        if v in ("True", "False"):
            v = v == "True"
        if k == "widths":
            v = tuple(int(c) for c in str(v).split("/"))
        out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows (0: all)")
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--fp", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log", action="store_true", help="print cmpq.quantize's progress")
    ap.add_argument("--c4-windows", type=int, default=0, help="also evaluate this many C4 windows (-1: all)")
    a = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load_model("smollm2-135m")
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    evals = {"wiki2": eval_windows(tok, "wikitext2", 2048, nsamples=a.windows or None).ids}
    if a.c4_windows:
        evals["c4"] = eval_windows(tok, "c4", 2048, nsamples=a.c4_windows if a.c4_windows > 0 else None).ids

    def ppl(model) -> dict:
        return {k: round(perplexity(model, w, log=None), 3) for k, w in evals.items()}

    rows = []
    if a.fp:
        base.to(device=dev, dtype=dtype)
        rows.append({"run": str(dtype), **ppl(base)})
        base.to("cpu")
        print(rows[-1], flush=True)
        save(a, rows, dev)
    calib = resolve_calibration(tok, RunOptions(calib="c4", nsamples=a.nsamples, seqlen=a.calib_seqlen))
    for spec in a.run:
        cfg = CMPQConfig(**parse(spec))
        model, _ = load_model("smollm2-135m", device=dev, dtype=dtype)
        t0 = time.perf_counter()
        cmpq.quantize(model, tok, cfg, calib=calib, device=dev, log=print if a.log else None)
        secs = time.perf_counter() - t0
        lin = [m for m in model.modules() if hasattr(m, "effective_bits")]
        numel = sum(m.in_features * m.out_features for m in lin)
        eff = sum(m.effective_bits() * m.in_features * m.out_features for m in lin) / numel
        rows.append({"run": spec, "effective_bits": round(eff, 4), **ppl(model), "seconds": round(secs, 1),
                     **({"finetune": model.config.quantization_config["finetune"]} if cfg.finetune_epochs else {})})
        print(rows[-1], flush=True)
        save(a, rows, dev)
    save(a, rows, dev)


def save(a, rows, dev) -> None:
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "machine": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU, 2 cores",
                       "nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen, "windows": a.windows, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
