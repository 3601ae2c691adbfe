"""Quality grid on one model: CMPQ vs RTN, GPTQ, AWQ, LLM-MQ and HQQ, plus the paper's ablations.

Every cell quantizes a deep copy of the same base model with the same calibration windows and is
evaluated on the same windows; each figure carries nominal and effective bits (all bytes counted),
perplexity per data set, quantization time, peak GPU memory, machine and date. The JSON is written
after every cell and a cell already in it is not recomputed (resumable across device calls).
Baselines are fake-quantized (dequantized weights in a plain model); CMPQ cells run packed layers.

    python benchmarks/quality.py --model smollm2-135m --ablations --max-minutes 8       # GPU
    python benchmarks/quality.py --model smollm2-135m --quick --methods fp16 rtn       # CPU smoke
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder would be on sys.path and benchmarks/kernels.py would shadow the
# `kernels` package that transformers looks for.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import copy
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import cmpq
from cmpq.baselines.runners import hqq_available, quantize_baseline
from cmpq.config import CMPQConfig
from cmpq.data.tokens import Windows, eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model.loading import load_model
from cmpq.nn.linear import CMPQLinear, cache_dense_weights
from cmpq.quantize import resolve_calibration
from cmpq.storage.io import bits_summary, layer_summary

ALL_METHODS = ("fp16", "cmpq", "rtn", "gptq", "awq", "llmmq", "hqq", "rtn-pc")
# H200 seconds per cell (quantize + batched eval of both sets), from core-smollm2-135m.json and
# the baselines' cost relative to CMPQ; used only to skip cells that would overrun --max-minutes.
COST_S = {"fp16": 8, "rtn": 9, "rtn-pc": 9, "hqq": 12, "gptq": 25, "awq": 30, "llmmq": 15, "llmmq-first": 80,
          "cmpq": 35}
OUTLIER_ABLATIONS = {  # paper Table 6: the remaining kind of outlier makes up 0.5% of the weights
    "w/o O_q": {"act_outlier_frac": 0.005, "weight_outlier_frac": 0.0},
    "w/o O_act": {"act_outlier_frac": 0.0, "weight_outlier_frac": 0.005},
    "w/o outliers": {"act_outlier_frac": 0.0, "weight_outlier_frac": 0.0},
}


def cell(method: str, bits: float, series: str, group_size: int | None = None, opts: dict | None = None,
         table: str = "main") -> dict:
    c = {"method": method, "bits": float(bits), "group_size": group_size, "options": opts or {},
         "series": series, "table": table}
    c["key"] = json.dumps({k: c[k] for k in ("method", "bits", "group_size", "options")}, sort_keys=True)
    return c


def grid(a: argparse.Namespace) -> list[dict]:
    """Cells in priority order: what matters most runs first when time is short."""
    m, out = set(a.methods), []
    if "fp16" in m:
        out.append(cell("fp16", 16, "FP16"))
    if "cmpq" in m:  # usually imported from the core sweep, so free
        out += [cell("cmpq", b, "CMPQ") for b in a.cmpq_budgets]
    for meth, series, gs in (("rtn", "RTN g128", 128), ("gptq", "GPTQ g128", 128), ("awq", "AWQ g128", 128)):
        if meth in m:
            out += [cell(meth, b, series, gs) for b in a.bits]
    if "llmmq" in m:
        out += [cell("llmmq", b, "LLM-MQ (layer-wise IntProg)") for b in a.llmmq_budgets]
    if "hqq" in m:
        for gs in (64, 128):
            out += [cell("hqq", b, f"HQQ g{gs}", gs) for b in a.bits]
    if "rtn-pc" in m:
        out += [cell("rtn", b, "RTN per-channel", None) for b in a.bits]
    if a.ablations:
        out += ablations()
    return out


def ablations() -> list[dict]:
    """Paper Tables 6, 1, 7, 4, 5 on this model (defaults otherwise: kmeans, c4, 128 windows)."""
    out = []
    for bits in (3, 4):
        out += [cell("cmpq", bits, f"CMPQ {k}", opts=o, table="ablation") for k, o in OUTLIER_ABLATIONS.items()]
    out += [cell("cmpq", 3, "CMPQ 3-bit plain (no 2/4 mix)", opts={"edge_frac": 0.0}, table="ablation"),
            cell("cmpq", 3, "CMPQ 3-bit 10%/10% 2/4-bit mix", opts={"edge_frac": 0.1}, table="ablation")]
    out += [cell("cmpq", b, "CMPQ uniform quantizer", opts={"quantizer": "uniform"}, table="ablation") for b in (3, 4)]
    out += [cell("cmpq", 3, f"CMPQ nsamples={n}", opts={"nsamples": n}, table="ablation") for n in (1, 2, 5, 10, 20, 100)]
    out += [cell("cmpq", 3, "CMPQ calib=offline", opts={"calib": "offline"}, table="ablation")]
    out += [cell("cmpq", 2, f"CMPQ {k}", opts=o, table="ablation") for k, o in OUTLIER_ABLATIONS.items()]
    out += [cell("cmpq", 2, "CMPQ uniform quantizer", opts={"quantizer": "uniform"}, table="ablation")]
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _strip_paths(desc: str) -> str:
    return re.sub(r" from \S+", "", desc)


def cmpq_bits(model) -> tuple[float, float]:
    """(nominal, effective) bits per weight of a packed CMPQ model, every stored byte counted."""
    b = bits_summary(layer_summary(m) for m in model.modules() if isinstance(m, CMPQLinear))
    return b["nominal_bits"], b["effective_bits"]


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        self.base, self.tok = load_model(a.model, device="cpu", dtype=self.dtype)
        self.windows = {ds: eval_windows(self.tok, ds, a.seqlen, nsamples=a.max_windows) for ds in a.datasets}
        self.calibs: dict[tuple, Windows] = {}
        self.llmmq_cache: dict = {}

    def calibration(self, name: str, nsamples: int) -> Windows:
        k = (name, nsamples)
        if k not in self.calibs:
            cfg = CMPQConfig(nsamples=nsamples, seqlen=self.a.calib_seqlen, seed=self.a.seed)
            self.calibs[k] = resolve_calibration(self.tok, name, cfg)
        return self.calibs[k]

    def evaluate(self, model) -> tuple[dict, float]:
        t0 = time.perf_counter()
        model.to(self.dev)
        ppl = {ds: perplexity(model, w.ids, self.a.eval_batch_size, log=None, label=ds) for ds, w in self.windows.items()}
        return ppl, round(time.perf_counter() - t0, 2)

    def run(self, c: dict) -> dict:
        a, opts = self.a, dict(c["options"])
        if c["method"] == "fp16":
            ppl, ev = self.evaluate(self.base)
            self.base.to("cpu")
            return {"nominal_bits": 16.0, "effective_bits": 16.0, "ppl": ppl, "eval_seconds": ev,
                    "series": str(self.dtype).replace("torch.", "").upper()}
        model = copy.deepcopy(self.base)
        calib = self.calibration(opts.pop("calib", a.calib), opts.pop("nsamples", a.nsamples))
        if c["method"] == "cmpq":
            cfg = CMPQConfig(bits=c["bits"], nsamples=calib.ids.shape[0], seqlen=a.calib_seqlen, seed=a.seed, **opts)
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cmpq.quantize(model, self.tok, cfg, calib=calib, device=self.dev, log=None)
            qs = round(time.perf_counter() - t0, 2)
            peak = torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else None
            nom, eff = cmpq_bits(model)
            cache_dense_weights(model)
            res = {"nominal_bits": nom, "effective_bits": eff, "quantize_seconds": qs, "peak_gpu_memory_gib": peak,
                   "calibration": calib.description, "config": {k: v for k, v in cfg.to_dict().items() if k != "extra"}}
        else:
            if c["method"] == "llmmq":
                opts.update(cache=self.llmmq_cache, grad_nsamples=min(a.grad_nsamples, calib.ids.shape[0]))
            rep = quantize_baseline(model, self.tok, c["method"], c["bits"], c["group_size"], calib=calib,
                                    seed=a.seed, device=self.dev, log=None, **opts)
            res = {k: v for k, v in rep.items() if k not in ("allocation", "quant_method", "bits", "group_size")}
            res.setdefault("nominal_bits", c["bits"])
        res["ppl"], res["eval_seconds"] = self.evaluate(model)
        del model
        return res


def signature(a: argparse.Namespace, b: Bench) -> dict:
    """What must match for cells of two runs to share one table."""
    return {"model": a.model, "eval": {ds: _strip_paths(w.description) for ds, w in b.windows.items()},
            "calib": a.calib, "nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen, "seed": a.seed}


def import_core(result: dict, path: Path, sig: dict) -> int:
    """CMPQ cells already measured by benchmarks/core_sweep.py on the same model and protocol."""
    if not path.is_file():
        return 0
    core = json.loads(path.read_text())
    if {ds: _strip_paths(d) for ds, d in core.get("eval", {}).items()} != sig["eval"]:
        return 0
    have, n = {c["key"] for c in result["cells"]}, 0
    for r in core["rows"]:
        if r["method"] != "cmpq" or not r.get("calibration", "").startswith(f"{sig['calib']}: {sig['nsamples']} x {sig['calib_seqlen']} tokens, seed {sig['seed']}"):
            continue  # CMPQ with default settings and this run's calibration only
        c = cell("cmpq", r["bits"], "CMPQ")
        if c["key"] in have:
            continue
        c.update({k: r.get(k) for k in ("nominal_bits", "effective_bits", "ppl", "quantize_seconds",
                                          "peak_gpu_memory_gib", "calibration")})
        c.update(machine=core.get("machine"), date=core.get("date"), versions=core.get("versions"),
                 source=f"imported from {path.name} (core sweep; saved, reloaded, then evaluated)")
        result["cells"].append(c)
        n += 1
    return n


def write_markdown(result: dict, path: Path) -> None:
    ds = list(result["signature"]["eval"])
    head = ("| series | bits | effective bits | " + " | ".join(ds) + " | quant. time (s) | peak GPU mem (GiB) | source |\n"
            "|---|---|---|" + "---|" * len(ds) + "---|---|---|\n")
    lines = [f"# Quality: {result['model']}\n", f"Machine: {result['machine']}; updated {result['date']}; "
             f"versions {json.dumps(result['versions'])}; seed {result['signature']['seed']}.\n",
             f"Calibration: {result['signature']['calib']}, {result['signature']['nsamples']} x "
             f"{result['signature']['calib_seqlen']} tokens. Evaluation: "
             + "; ".join(f"{k}: {v}" for k, v in result["signature"]["eval"].items()) + ".\n",
             "Baselines are fake-quantized; effective bits count every byte a packed deployment would store.\n"]
    for table, title in (("main", "Methods"), ("ablation", "Ablations (CMPQ)")):
        rows = [c for c in result["cells"] if c.get("table", "main") == table and "ppl" in c]
        if not rows:
            continue
        if table == "ablation":  # the reference: CMPQ's defaults (1%/1% 2/4-bit mix at 3 bits, kmeans, both outliers)
            rows += [{**c, "series": "CMPQ default"} for c in result["cells"]
                     if c["method"] == "cmpq" and c.get("table", "main") == "main" and c["bits"] in (2, 3, 4)]
        rows.sort(key=lambda c: (c["series"], c["bits"]))
        lines.append(f"\n## {title}\n\n" + head)
        for c in rows:
            pk = c.get("peak_gpu_memory_gib")
            lines.append(f"| {c['series']} | {c['bits']:g} | {c['effective_bits']:.3f} | "
                         + " | ".join(f"{c['ppl'][d]:.2f}" for d in ds)
                         + f" | {c.get('quantize_seconds', '-')} | {f'{pk:.2f}' if pk else '-'} | "
                         f"{'core sweep' if 'imported' in c.get('source', '') else 'this run'} |\n")
    skipped = result.get("skipped", [])
    if skipped:
        lines.append("\nNot run: " + "; ".join(skipped) + "\n")
    path.write_text("".join(lines))


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = list(result["signature"]["eval"])
    fig, axes = plt.subplots(1, len(ds), figsize=(6.5 * len(ds), 5), squeeze=False)
    cells = [c for c in result["cells"] if c.get("table", "main") == "main" and "ppl" in c]
    for ax, d in zip(axes[0], ds):
        series: dict[str, list] = {}
        for c in cells:
            if c["method"] == "fp16":
                ax.axhline(c["ppl"][d], color="k", ls="--", lw=1, label=f"{c['series']} ({c['ppl'][d]:.2f})")
            else:
                series.setdefault(c["series"], []).append((c["effective_bits"], c["ppl"][d]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = dict(lw=2.5, marker="o", color="C3") if name == "CMPQ" else dict(lw=1.2, marker=".")
            ax.plot([p[0] for p in pts], [min(p[1], 1e5) for p in pts], label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight (all bytes counted)")
        ax.set_ylabel(f"{d} perplexity (log)")
        ax.set_title(f"{result['model']}: {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="rtn, gptq, awq, hqq bit widths")
    ap.add_argument("--cmpq-budgets", type=float, nargs="+", default=[2, 2.2, 2.5, 3, 3.2, 3.5, 4])
    ap.add_argument("--llmmq-budgets", type=float, nargs="+", default=[2, 2.5, 3, 3.5, 4])
    ap.add_argument("--ablations", action="store_true", help="add the paper's ablations (Tables 1, 4, 5, 6, 7)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: few short windows (defaults below shrink)")
    ap.add_argument("--datasets", nargs="+", default=["wikitext2", "c4"])
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (128; quick: 4)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (2048; quick: 128)")
    ap.add_argument("--seqlen", type=int, default=None, help="evaluation window length (2048; quick: 128)")
    ap.add_argument("--max-windows", type=int, default=None, help="cap evaluation windows (all; quick: 2)")
    ap.add_argument("--grad-nsamples", type=int, default=8, help="llmmq: windows for the LM-loss gradients")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="windows per forward (GPU 8, CPU 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="start no cell that would end after M minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--core", default=None, help="core sweep JSON to import CMPQ cells from "
                    "(default <out-dir>/core-<model>.json; 'none' to skip)")
    ap.add_argument("--fresh", action="store_true", help="discard an existing JSON with another signature")
    a = ap.parse_args(argv)
    q = a.quick
    a.nsamples = a.nsamples or (4 if q else 128)
    a.calib_seqlen = a.calib_seqlen or (128 if q else 2048)
    a.seqlen = a.seqlen or (128 if q else 2048)
    a.max_windows = a.max_windows or (2 if q else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    bench = Bench(a)
    a.eval_batch_size = a.eval_batch_size or (8 if bench.dev.type == "cuda" else 1)
    name = Path(a.model).name.removesuffix(".gguf")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath, ppath = (out / f"quality-{name}{s}" for s in (".json", ".md", ".png"))
    sig = signature(a, bench)
    result = json.loads(jpath.read_text()) if jpath.is_file() else None
    if result is not None and result.get("signature") != sig:
        if not a.fresh:
            print(f"error: {jpath} was made with another setup ({result.get('signature')}); "
                  "pass --fresh to replace it or --out-dir for another folder", file=sys.stderr)
            return 2
        result = None
    result = result or {"model": a.model, "signature": sig, "cells": []}
    versions = {"cmpq": cmpq.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                "transformers": __import__("transformers").__version__}
    result.update(machine=machine(), versions=versions, quick=q,
                  git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    core = Path(a.core) if a.core and a.core != "none" else out / f"core-{name}.json"
    if a.core != "none" and not q:
        n = import_core(result, core, sig)
        if n:
            print(f"imported {n} CMPQ cells from {core}")

    def save() -> None:
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        jpath.write_text(json.dumps(result, indent=1))

    done = {c["key"] for c in result["cells"]}
    todo = [c for c in grid(a) if c["key"] not in done]
    hqq_why = hqq_available()
    if hqq_why:
        result["hqq_unavailable"] = hqq_why
    print(f"{len(todo)} cells to run ({len(done)} already in {jpath})", flush=True)
    skipped, llmmq_seen = [], False
    for c in todo:
        kind = c["method"] if c["method"] != "rtn" or c["group_size"] else "rtn-pc"
        if kind == "llmmq":
            kind, llmmq_seen = ("llmmq" if llmmq_seen or bench.llmmq_cache else "llmmq-first"), True
        est = COST_S[kind] if bench.dev.type == "cuda" else 0.0
        elapsed = time.perf_counter() - t_start
        if a.max_minutes is not None and elapsed + est > 60 * a.max_minutes:
            skipped.append(f"{c['series']} {c['bits']:g}")
            continue
        if c["method"] == "hqq" and hqq_why:
            skipped.append(f"{c['series']} {c['bits']:g} (hqq unavailable: {hqq_why})")
            continue
        t0 = time.perf_counter()
        try:
            res = bench.run(c)
        except (RuntimeError, ValueError) as e:  # record and go on: one failing method must not sink the grid
            print(f"FAILED {c['series']} {c['bits']:g}: {e}", flush=True)
            skipped.append(f"{c['series']} {c['bits']:g} (failed: {e})")
            continue
        c.update(res)
        c.update(machine=result["machine"], versions=versions, seed=a.seed, source="this run",
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        result["cells"].append(c)
        save()
        ppl = ", ".join(f"{d} {v:.2f}" for d, v in c["ppl"].items())
        print(f"[{time.perf_counter() - t_start:6.0f}s] {c['series']} {c['bits']:g}: eff {c['effective_bits']:.3f} bits, "
              f"{ppl} ({time.perf_counter() - t0:.0f}s)", flush=True)
    result["skipped"] = skipped
    save()
    write_markdown(result, mpath)
    write_plot(result, ppath)
    print(f"wrote {jpath}, {mpath}, {ppath}; {len(skipped)} cells not run" + (f": {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
