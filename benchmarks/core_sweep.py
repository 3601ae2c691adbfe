"""CMPQ on one model at several budgets: perplexity, true bits per weight, time, peak memory.

Every budget is quantized from the same base weights, saved, loaded back from disk, and the
loaded model is evaluated, so the figures are those of what a user would ship.

    python benchmarks/core_sweep.py --model smollm2-135m --bits 2 2.2 2.5 3 3.2 3.5 4
"""

from __future__ import annotations

import sys
import argparse
import copy
import datetime
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import cmpq
from cmpq.storage.io import FORMAT_VERSION
from cmpq.data.tokens import eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model.loading import load_model
from cmpq.nn.linear import cache_dense_weights
from cmpq.storage.io import MANIFEST, bits_summary


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def folder_bits(path: Path) -> dict:
    return bits_summary(json.loads((path / MANIFEST).read_text())["layers"].values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 2.8, 3, 3.36, 3.6, 4, 4.3],
                    help="budgets: effective bits for the default algorithm, nominal for --algorithm paper")
    ap.add_argument("--algorithm", choices=("compensated", "paper"), default="compensated")
    ap.add_argument("--datasets", nargs="+", default=["wikitext2", "c4"])
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None, help="cap evaluation windows (quick runs)")
    ap.add_argument("--quantizer", default="kmeans")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/core-<model>.json)")
    a = ap.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base, tok = load_model(a.model, device="cpu", dtype=dtype)
    windows = {ds: eval_windows(tok, ds, a.seqlen, nsamples=a.max_windows) for ds in a.datasets}
    rows = []

    base.to(dev)
    fp = {ds: perplexity(base, w.ids, label=f"fp {ds}") for ds, w in windows.items()}
    rows.append({"method": str(dtype).replace("torch.", ""), "bits": 16.0, "effective_bits": 16.0, "ppl": fp})
    base.to("cpu")

    for bits in a.bits:
        model = copy.deepcopy(base)
        cfg = cmpq.CMPQConfig(bits=bits, algorithm=a.algorithm, quantizer=a.quantizer)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        cmpq.quantize(model, tok, cfg, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, device=dev, log=None)
        qtime = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        qc = model.config.quantization_config
        with tempfile.TemporaryDirectory() as td:
            path = cmpq.save(model, Path(td) / f"cmpq-{bits}", tokenizer=tok)
            del model
            info = folder_bits(path)
            loaded = cmpq.load(path, device=dev, dtype=dtype)
        cache_dense_weights(loaded)
        ppl = {ds: perplexity(loaded, w.ids, label=f"cmpq {bits} {ds}") for ds, w in windows.items()}
        del loaded
        row = {"method": "cmpq", "algorithm": a.algorithm, "format": FORMAT_VERSION, "bits": bits, **info, "ppl": ppl, "quantize_seconds": round(qtime, 2),
               "time_split_seconds": qc["time_split_seconds"], "peak_gpu_memory_gib": peak,
               "calibration": qc["calibration"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "model": a.model,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"cmpq": cmpq.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "eval": {ds: w.description for ds, w in windows.items()},
        "seqlen": a.seqlen,
        "rows": rows,
    }
    out = Path(a.out or f"benchmarks/results/core-{a.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{a.model} on {result['machine']}, {result['date']}")
    print("| method | nominal bits | effective bits | " + " | ".join(a.datasets) + " | quant. time (s) | peak GPU mem (GiB) |")
    print("|---|---|---|" + "---|" * len(a.datasets) + "---|---|")
    for r in rows:
        pk = f"{r['peak_gpu_memory_gib']:.2f}" if r.get("peak_gpu_memory_gib") else "-"
        print(f"| {r['method']} | {r['bits']} | {r['effective_bits']:.3f} | "
              + " | ".join(f"{r['ppl'][d]:.2f}" for d in a.datasets)
              + f" | {r.get('quantize_seconds', '-')} | {pk} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
