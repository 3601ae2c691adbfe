"""Quality grid on one model: CMPQ vs RTN, GPTQ, AWQ, LLM-MQ and HQQ, plus the paper's ablations.

Every cell quantizes a deep copy of the same base model with the same calibration windows and is
evaluated on the same windows; each figure carries nominal and effective bits (all bytes counted),
perplexity per data set, quantization time, peak GPU memory, machine and date. The JSON is written
after every cell and a cell already in it is not recomputed (resumable across device calls).
Baselines are fake-quantized (dequantized weights in a plain model); CMPQ cells run packed layers.

``--workers N`` (N > 1) runs the pending cells in N worker processes sharing the one GPU (cells of a
135M model are launch-bound, so the GPU has room for several). The parent starts the workers at once
(each loads the model and the windows itself), checks the JSON meanwhile, then writes a queue file (in a
temporary folder) of the pending cells in priority order; each worker claims the next unclaimed unit under an ``fcntl``
lock (all LLM-MQ budgets form one unit, so its budget-independent layer scores are computed once),
and merges every finished cell into the JSON under the same lock (re-read, add, temp file +
``os.replace``). A worker starts no cell that its estimate (``COST_S`` scaled by the slowdown it has
measured on its own cells) says would end after the ``--max-minutes`` deadline; a serial run scales
``COST_S`` by its own measured pace the same way (faster or slower). Worker output is
relayed line by line prefixed ``[wI]``. The parent writes the Markdown table and the PNG once at the
end, and exits non-zero if a worker crashed (the other workers' cells are kept). A cell that runs out
of GPU memory beside the others goes back to the queue once, behind every fresh cell, and is claimed
again only when fewer workers hold cells than when it failed (``next_unit``). Each cell records
``gpu_workers``: how many processes shared the GPU when it ran (its timings are not comparable to
serial ones when > 1).

    python benchmarks/quality.py --model smollm2-135m --ablations --max-minutes 8       # GPU
    python benchmarks/quality.py --model smollm2-135m --ablations --max-minutes 7 --workers 6  # GPU, parallel
    python benchmarks/quality.py --model smollm2-135m --quick --methods fp16 rtn       # CPU smoke
"""

from __future__ import annotations

import os
import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import cmpq
from cmpq.baselines.runners import hqq_available, quantize_baseline
from cmpq.config import CMPQConfig
from cmpq.data.tokens import Windows, eval_windows
from cmpq.eval.perplexity import perplexity
from cmpq.model.loading import load_model, resolve_model_path
from cmpq.nn.linear import CMPQLinear, cache_dense_weights
from cmpq.options import RunOptions
from cmpq.quantize import resolve_calibration
from cmpq.storage.io import FORMAT_VERSION, bits_summary, layer_summary

ALL_METHODS = ("fp16", "cmpq", "rtn", "gptq", "awq", "llmmq", "hqq", "rtn-pc")
# H200 seconds per cell (quantize + batched eval of both sets), from core-smollm2-135m.json and
# the baselines' cost relative to CMPQ; used only to skip cells that would overrun --max-minutes.
COST_S = {"fp16": 8, "rtn": 9, "rtn-pc": 9, "hqq": 12, "gptq": 25, "awq": 30, "llmmq": 15, "llmmq-first": 80,
          "cmpq": 35, "cmpq-compensated": 240}
# cmpq-compensated: a default cell with seven sharing one H100, 220-233 s from taking it to its result
# (2026-12-07 evening, results/quality-ablations-2.5-h100-log.txt; 153 s alone). It was 410 (the 4.3-bit
# cell alone on 2026-12-06, before the fine-tuning fixes), which made that call decline six cells that
# would have fitted.
OUTLIER_ABLATIONS = {  # paper Table 6: the remaining kind of outlier makes up 0.5% of the weights
    "w/o O_q": {"act_outlier_frac": 0.005, "weight_outlier_frac": 0.0},
    "w/o O_act": {"act_outlier_frac": 0.0, "weight_outlier_frac": 0.005},
    "w/o outliers": {"act_outlier_frac": 0.0, "weight_outlier_frac": 0.0},
}


def cell(method: str, bits: float, series: str, group_size: int | None = None, opts: dict | None = None,
         table: str = "main") -> dict:
    c = {"method": method, "bits": float(bits), "group_size": group_size, "options": opts or {},
         "series": series, "table": table}
    if method == "cmpq":  # a CMPQ cell belongs to one storage format: a new format makes it a new cell
        c["format"] = FORMAT_VERSION
    c["key"] = json.dumps({k: c[k] for k in ("method", "bits", "group_size", "options", "format") if k in c},
                          sort_keys=True)
    return c


def storage_format(c: dict) -> int | None:
    """The cmpq format a CMPQ cell stored (cells from before the field existed stored format 2)."""
    return c.get("format", 2) if c["method"] == "cmpq" else None


def current_cells(cells: list[dict]) -> list[dict]:
    """Every cell, except a CMPQ cell whose series and budget were re-measured in a newer format:
    tables and plots show each point once, at the newest format measured."""
    newest: dict[tuple, int] = {}
    for c in cells:
        if c["method"] == "cmpq":
            k = (c["series"], c["bits"], c.get("table", "main"))
            newest[k] = max(newest.get(k, 0), storage_format(c))
    return [c for c in cells if c["method"] != "cmpq"
            or storage_format(c) == newest[(c["series"], c["bits"], c.get("table", "main"))]]


def series_label(c: dict) -> str:
    """A CMPQ series stored in an older format than the current one says so in its name."""
    f = storage_format(c)
    return c["series"] if f is None or f == FORMAT_VERSION else f"{c['series']} (format v{f})"


def grid(a: argparse.Namespace) -> list[dict]:
    """Cells in priority order: what matters most runs first when time is short."""
    m, out = set(a.methods), []
    if "fp16" in m:
        out.append(cell("fp16", 16, "FP16"))
    if "cmpq" in m:  # the default (compensated) at effective budgets, then the paper's method at nominal ones
        out += [cell("cmpq", b, "CMPQ", opts={"algorithm": "compensated"}) for b in a.cmpq_budgets]
        out += [cell("cmpq", b, "CMPQ-paper", opts={"algorithm": "paper"}) for b in a.paper_budgets]
        for name, opts, budgets in a.cmpq_variant:  # a candidate part beside the default, same budgets
            out += [cell("cmpq", b, f"CMPQ {name}", opts={"algorithm": "compensated", **opts}, table="ablation")
                    for b in budgets]
    for meth in ("rtn", "gptq", "awq"):
        if meth in m:
            # g64 as well, so the baselines' curves reach ~4.5 effective bits (never g32 on SmolLM2:
            # its GGUF weights were 4-bit in blocks of 32 before we see them)
            for gs in a.group_sizes:
                out += [cell(meth, b, f"{meth.upper()} g{gs}", gs) for b in a.bits]
            if meth == "gptq":  # with the token weighting CMPQ's default uses (fairness)
                out += [cell(meth, b, "GPTQ g128 + token weighting", 128, opts={"token_weighting": "gradient"})
                        for b in a.bits]
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


COMPENSATED_ABLATIONS = {  # each new part of the default, off (or changed), one at a time
    "no compensation": {"compensate": False},
    "no token weighting": {"token_weighting": "none"},
    "no fine-tuning": {"finetune_epochs": 0},
    "widths 1-4": {"widths": [1, 2, 3, 4]},
    "no FP16 columns": {"fp16_columns": False},
    "no row scales": {"row_scale": False},
}


def ablations() -> list[dict]:
    """The default's parts at 2.5, 3.36 and 4.3 effective bits; then the paper's Tables 6, 1, 7, 4, 5
    on this model with the paper's method (defaults otherwise: kmeans, c4, 128 windows)."""
    out = [cell("cmpq", b, f"CMPQ {k}", opts={"algorithm": "compensated", **o}, table="ablation")
           for b in (3.36, 2.5, 4.3) for k, o in COMPENSATED_ABLATIONS.items()]
    paper = ablations_paper()
    for c in paper:  # the paper's ablations run the paper's method
        c.update(cell("cmpq", c["bits"], c["series"].replace("CMPQ", "CMPQ-paper", 1),
                      opts={"algorithm": "paper", **c["options"]}, table="ablation"))
    return out + paper


def ablations_paper() -> list[dict]:
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


def load_tokenizer(name: str):
    """The tokenizer alone, as :func:`load_model` loads it (the parent of --workers needs no weights)."""
    from transformers import AutoTokenizer

    where, gguf = resolve_model_path(name)
    return AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))


class Bench:
    def __init__(self, a: argparse.Namespace, with_model: bool = True) -> None:
        self.a = a
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        self.log = (lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True)) if getattr(a, "verbose", False) else None
        self.dtype = torch.float16 if self.dev.type == "cuda" else torch.float32
        if with_model:
            self.base, self.tok = load_model(a.model, device="cpu", dtype=self.dtype)
        else:
            self.base, self.tok = None, load_tokenizer(a.model)
        self.windows = {ds: eval_windows(self.tok, ds, a.seqlen, nsamples=a.max_windows) for ds in a.datasets}
        self.calibs: dict[tuple, Windows] = {}
        self.llmmq_cache: dict = {}

    def calibration(self, name: str, nsamples: int) -> Windows:
        k = (name, nsamples)
        if k not in self.calibs:
            self.calibs[k] = resolve_calibration(self.tok, RunOptions(calib=name, nsamples=nsamples,
                                                                      seqlen=self.a.calib_seqlen, seed=self.a.seed))
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
            cfg = CMPQConfig(bits=c["bits"], **opts)
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cmpq.quantize(model, self.tok, cfg, calib=calib, device=self.dev, log=self.log)
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
        if r["method"] != "cmpq" or r.get("format", 2) != FORMAT_VERSION or not r.get("calibration", "").startswith(f"{sig['calib']}: {sig['nsamples']} x {sig['calib_seqlen']} tokens, seed {sig['seed']}"):
            continue  # CMPQ with default settings and this run's calibration only
        alg = r.get("algorithm", "paper")  # core rows before 2026-12-02 ran the paper's method
        c = cell("cmpq", r["bits"], "CMPQ" if alg == "compensated" else "CMPQ-paper", opts={"algorithm": alg})
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
    cells = current_cells(result["cells"])
    for table, title in (("main", "Methods"), ("ablation", "Ablations (CMPQ)")):
        rows = [c for c in cells if c.get("table", "main") == table and "ppl" in c]
        if not rows:
            continue
        if table == "ablation":  # the references: the default at the budgets its parts are ablated at,
            # and the paper's method at the integer budgets its ablations use
            abl = {c["bits"] for c in cells if c.get("table") == "ablation" and c["series"].startswith("CMPQ ")}
            rows += [{**c, "series": f"{c['series']} default"} for c in cells
                     if c["method"] == "cmpq" and c.get("table", "main") == "main" and "ppl" in c
                     and ((c["series"] == "CMPQ" and c["bits"] in abl)
                          or (c["series"] == "CMPQ-paper" and c["bits"] in (2, 3, 4)))]
        rows = [{**c, "series": series_label(c)} for c in rows]
        rows.sort(key=lambda c: (c["series"], c["bits"]))
        lines.append(f"\n## {title}\n\n" + head)
        for c in rows:
            pk = c.get("peak_gpu_memory_gib")
            qs = c.get("quantize_seconds", "-")
            shared = (c.get("gpu_workers") or 1) > 1 and qs not in ("-", None)
            lines.append(f"| {c['series']} | {c['bits']:g} | {c['effective_bits']:.3f} | "
                         + " | ".join(f"{c['ppl'][d]:.2f}" for d in ds)
                         + f" | {qs}{'*' if shared else ''} | {f'{pk:.2f}' if pk else '-'} | "
                         f"{'core sweep' if 'imported' in c.get('source', '') else 'this run'} |\n")
    shared = sorted({c["gpu_workers"] for c in result["cells"] if (c.get("gpu_workers") or 1) > 1})
    if shared:
        lines.append(f"\n\\* Timed while {' or '.join(map(str, shared))} worker processes shared the GPU "
                     "(`--workers`): these quantization times are not comparable to the unmarked (serial) ones. "
                     "Peak GPU memory is per process, so it is unaffected.\n")
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
    cells = [{**c, "series": series_label(c)} for c in current_cells(result["cells"])
             if c.get("table", "main") == "main" and "ppl" in c]
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


# ------------------------------------------------------------------ shared by the serial and the parallel paths


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    return {"cmpq": cmpq.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "transformers": __import__("transformers").__version__}


def cost_kind(c: dict) -> str:
    if c["method"] == "cmpq" and c["options"].get("algorithm") == "compensated":
        return "cmpq-compensated"
    return c["method"] if c["method"] != "rtn" or c["group_size"] else "rtn-pc"


def label(c: dict) -> str:
    return f"{c['series']} {c['bits']:g}"


def atomic_write(path: Path, text: str) -> None:
    """Readers (other workers, a copy of the out dir) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(qpath: Path):
    """Exclusive ``fcntl.flock`` guarding the JSON and the queue ``qpath`` of one --workers run (taken on a
    side file next to the queue, since os.replace swaps the inodes of both)."""
    with open(qpath.with_name("lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_result(a: argparse.Namespace, bench: Bench, jpath: Path, out: Path, name: str) -> dict | None:
    """The result to extend (None, after printing why, when the JSON on disk has another setup)."""
    sig = signature(a, bench)
    result = json.loads(jpath.read_text()) if jpath.is_file() else None
    if result is not None and result.get("signature") != sig:
        if not a.fresh:
            print(f"error: {jpath} was made with another setup ({result.get('signature')}); "
                  "pass --fresh to replace it or --out-dir for another folder", file=sys.stderr, flush=True)
            return None
        result = None
    result = result or {"model": a.model, "signature": sig, "cells": []}
    result.update(machine=machine(), versions=versions(), quick=a.quick,
                  git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    core = Path(a.core) if a.core and a.core != "none" else out / f"core-{name}.json"
    if a.core != "none" and not a.quick:
        n = import_core(result, core, sig)
        if n:
            print(f"imported {n} CMPQ cells from {core}", flush=True)
    return result


def default_eval_batch(dev: torch.device, workers: int) -> int:
    """Windows per evaluation forward: 8 on a GPU to itself, 2 on one shared by several workers. A
    batch's float32 logits are ``batch x seqlen x vocab x 4`` bytes (SmolLM2: 3.0 GiB at 8), allocated
    at the end of every cell, and with seven workers on one 80 GB GPU that 3 GiB allocation failed out
    of memory for five cells, two of the default's and three of the paper's (H100, 2026-12-07,
    ``results/quality-ablations-v4-h100-log.txt``). The
    perplexity is a sum over windows, the same at any batch."""
    if dev.type != "cuda":
        return 1
    return 8 if workers <= 1 else 2


OOM = "out of memory: "  # the start of a failure that may pass with fewer processes on the GPU


def run_cell(bench: Bench, c: dict, ver: dict, mach: str, gpu_workers: int) -> tuple[dict | None, str | None]:
    """(the finished cell, None) or (None, why it failed): one failing method must not sink the grid."""
    try:
        res = bench.run(c)
    except torch.OutOfMemoryError as e:  # torch's message runs to a paragraph of per-process figures
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, OOM + str(e).split(". ")[0]
    except (RuntimeError, ValueError) as e:
        return None, str(e)
    c = {**c, **res}
    c.update(machine=mach, versions=ver, seed=bench.a.seed, source="this run", date=now_iso(), gpu_workers=gpu_workers)
    return c, None


def cell_line(c: dict, elapsed: float, took: float) -> str:
    ppl = ", ".join(f"{d} {v:.2f}" for d, v in c["ppl"].items())
    return f"[{elapsed:6.0f}s] {label(c)}: eff {c['effective_bits']:.3f} bits, {ppl} ({took:.0f}s)"


# ------------------------------------------------------------------ --workers N: parent and workers


def units_of(todo: list[dict]) -> list[list[dict]]:
    """Claimable units in priority order: one cell each, except that all LLM-MQ cells form one unit
    (at the first one's place), so one worker computes their budget-independent layer scores once."""
    units, llmmq = [], None
    for c in todo:
        if c["method"] == "llmmq":
            if llmmq is None:
                llmmq = []
                units.append(llmmq)
            llmmq.append(c)
        else:
            units.append([c])
    return units


def precheck(a: argparse.Namespace, jpath: Path, hqq_why: str | None) -> list[list[dict]] | None:
    """Pending units judged from the JSON alone (no model, no data), to start the workers at once;
    None where the serial path should handle it (a JSON with another setup and no --fresh)."""
    cells = [c for c in grid(a) if not (c["method"] == "hqq" and hqq_why)]
    if jpath.is_file():
        old = json.loads(jpath.read_text())
        sig = old.get("signature", {})
        same = (all(sig.get(k) == v for k, v in (("model", a.model), ("calib", a.calib), ("nsamples", a.nsamples),
                                                  ("calib_seqlen", a.calib_seqlen), ("seed", a.seed)))
                and list(sig.get("eval", {})) == list(a.datasets))
        if not same and not a.fresh:
            return None
        if same:
            have = {c["key"] for c in old.get("cells", [])}
            cells = [c for c in cells if c["key"] not in have]
    return units_of(cells)


class Relay:
    """Worker output, line by line, prefixed and flushed (the parent's stdout usually goes to a log)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line.rstrip("\n") + "\n")
            sys.stdout.flush()

    def follow(self, proc: subprocess.Popen, i: int) -> threading.Thread:
        def pump() -> None:
            for line in proc.stdout:
                if line.strip():
                    self.say(f"[w{i}] {line.rstrip()}")

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        return t


def run_parallel(a: argparse.Namespace, argv: list[str], wall_start: float, units0: list[list[dict]],
                 hqq_why: str | None) -> int:
    name = Path(a.model).name.removesuffix(".gguf")
    out = Path(a.out_dir)
    jpath, mpath, ppath = (out / f"quality-{name}{s}" for s in (".json", ".md", ".png"))
    qdir = Path(tempfile.mkdtemp(prefix=f"quality-{name}-queue-"))  # queue and lock: nothing of them in out
    qpath = qdir / "queue.json"
    n = min(a.workers, len(units0))
    threads = a.threads or max(1, len(os.sched_getaffinity(0)) // n)
    relay, procs = Relay(), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i in range(n):  # started first: they load the model while the parent checks the JSON
        cmd = [sys.executable, "-u", os.path.abspath(__file__), *argv, "--worker-index", str(i), "--queue", str(qpath),
               "--threads", str(threads)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        procs.append((p, relay.follow(p, i)))
    relay.say(f"started {n} workers ({threads} CPU threads each), pids {[p.pid for p, _ in procs]}")

    def finish_workers() -> list[int]:
        rcs = []
        for p, t in procs:
            rcs.append(p.wait())
            t.join()
        return rcs

    try:
        bench = Bench(a, with_model=False)
        a.eval_batch_size = a.eval_batch_size or default_eval_batch(bench.dev, a.workers)
        with locked(qpath):
            result = open_result(a, bench, jpath, out, name)
            if result is None:
                atomic_write(qpath, json.dumps({"abort": "the JSON has another setup"}))
                finish_workers()
                shutil.rmtree(qdir, ignore_errors=True)
                return 2
            result["date"] = now_iso()
            atomic_write(jpath, json.dumps(result, indent=1))
        done = {c["key"] for c in result["cells"]}
        todo = [c for c in grid(a) if c["key"] not in done]
        if hqq_why:
            result["hqq_unavailable"] = hqq_why
        relay.say(f"{len(todo)} cells to run ({len(done)} already in {jpath}) on {n} workers")
        units = []
        for u in units_of(todo):
            pre = [f"hqq unavailable: {hqq_why}" if c["method"] == "hqq" and hqq_why else None for c in u]
            units.append({"cells": u, "worker": "parent" if all(pre) else None, "status": pre})
        if bench.dev.type == "cuda":
            est = sum(COST_S[cost_kind(c)] for c in todo if not (c["method"] == "hqq" and hqq_why))
            est += (COST_S["llmmq-first"] - COST_S["llmmq"]) * any(c["method"] == "llmmq" for c in todo)
            left = f"; {60 * a.max_minutes - (time.time() - wall_start):.0f}s left" if a.max_minutes is not None else ""
            relay.say(f"estimated {est:.0f}s of cells (serial H200 timings) / {n} workers = {est / n:.0f}s{left}")
        deadline = wall_start + 60 * a.max_minutes if a.max_minutes is not None else None
        with locked(qpath):
            atomic_write(qpath, json.dumps({"signature": result["signature"], "json": str(jpath), "t0": wall_start,
                                            "deadline": deadline, "workers": n, "units": units}))
        rcs = finish_workers()
    except BaseException:
        for p, _ in procs:  # our own children, by pid
            if p.poll() is None:
                p.terminate()
        shutil.rmtree(qdir, ignore_errors=True)
        raise

    crashed = {i: rc for i, rc in enumerate(rcs) if rc != 0}
    for i, rc in crashed.items():
        relay.say(f"worker {i} exited with code {rc}: its cell in progress (and the rest of its unit) not run")
    with locked(qpath):
        result = json.loads(jpath.read_text())
        q = json.loads(qpath.read_text())
        skipped = []
        for u in q["units"]:
            for c, st in zip(u["cells"], u["status"]):
                if st == "done":
                    continue
                if st == "time":
                    skipped.append(label(c))
                elif st is not None:
                    skipped.append(f"{label(c)} ({st})")
                elif u["worker"] is None and u.get("oom_error"):
                    skipped.append(f"{label(c)} (failed: {u['oom_error']}; not retried in time)")
                elif isinstance(u["worker"], int) and u["worker"] in crashed:
                    skipped.append(f"{label(c)} (not run: worker {u['worker']} crashed)")
                else:
                    skipped.append(f"{label(c)} (not run: no worker took it)")
        result["skipped"] = skipped
        result["date"] = now_iso()
        atomic_write(jpath, json.dumps(result, indent=1))
    shutil.rmtree(qdir, ignore_errors=True)
    write_markdown(result, mpath)
    write_plot(result, ppath)
    relay.say(f"wrote {jpath}, {mpath}, {ppath}; {len(skipped)} cells not run" + (f": {skipped}" if skipped else ""))
    if crashed:
        relay.say(f"error: workers {sorted(crashed)} crashed (exit codes {list(crashed.values())})")
        return 1
    return 0


def _busy(q: dict) -> int:
    """Workers holding a cell now (``active``: worker -> pid); a worker that died holds none."""
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    return sum(alive(pid) for pid in q.get("active", {}).values())


def next_unit(q: dict) -> tuple[int | None, bool]:
    """(the unit a worker should claim now or None, whether a unit is waiting for the GPU to empty).

    A unit that ran out of memory beside other workers (``oom_busy``: how many held cells then,
    itself included) is put back once, and claimed only when fewer hold cells now, or when no one
    does: the cells a shared GPU lost to memory (2026-12-07: four of seven on an 80 GB H100) then run
    in the tail of the call, where workers run out of cells anyway. Workers that died are not counted."""
    free = [j for j, unit in enumerate(q["units"]) if unit["worker"] is None]
    fresh = [j for j in free if q["units"][j].get("oom_busy") is None]
    if fresh:
        return fresh[0], False
    busy = _busy(q)
    for j in free:  # only units put back are left
        if busy == 0 or busy < q["units"][j]["oom_busy"] - 1:
            return j, False
    return None, bool(free)


def run_worker(a: argparse.Namespace) -> int:
    """One worker: load the model, wait for the parent's queue, claim units until none is left."""
    i, qpath, ppid = a.worker_index, Path(a.queue), os.getppid()
    bench = Bench(a)
    a.eval_batch_size = a.eval_batch_size or default_eval_batch(bench.dev, a.workers)
    sig = signature(a, bench)
    while not qpath.is_file():
        if os.getppid() != ppid:
            print("parent gone before the queue was written; exiting", flush=True)
            return 3
        time.sleep(0.2)
    q = json.loads(qpath.read_text())  # written once with os.replace: complete when it exists
    if "abort" in q:
        return 0
    if q["signature"] != sig:
        print(f"error: this worker's setup {sig} differs from the parent's {q['signature']}", flush=True)
        return 2
    jpath, deadline, n = Path(q["json"]), q["deadline"], q["workers"]
    ver, mach = versions(), machine()
    spent = estimated = 0.0  # this worker's measured seconds vs COST_S over its cells: the slowdown of sharing

    def record(u: int, k: int, status: str, c: dict | None = None) -> None:
        with locked(qpath):
            if c is not None:
                result = json.loads(jpath.read_text())
                if c["key"] not in {x["key"] for x in result["cells"]}:
                    result["cells"].append(c)
                result["date"] = now_iso()
                atomic_write(jpath, json.dumps(result, indent=1))
            qq = json.loads(qpath.read_text())
            qq["units"][u]["status"][k] = status
            atomic_write(qpath, json.dumps(qq))

    def release(u: int | None = None, k: int = 0, err: str = "") -> None:
        """This worker holds no cell any more; with ``u``: its cell ``k`` ran out of memory, and the
        unit goes back to the queue once (``next_unit``)."""
        with locked(qpath):
            qq = json.loads(qpath.read_text())
            if u is not None:
                unit = qq["units"][u]
                unit["oom_busy"], unit["oom_error"], unit["worker"] = _busy(qq), err, None
                unit["status"][k] = None
            qq.setdefault("active", {}).pop(str(i), None)
            atomic_write(qpath, json.dumps(qq))

    while True:
        with locked(qpath):
            qq = json.loads(qpath.read_text())
            u, waiting = next_unit(qq)
            if u is not None:
                qq["units"][u]["worker"] = i
                qq.setdefault("active", {})[str(i)] = os.getpid()
                atomic_write(qpath, json.dumps(qq))
        if u is None:
            if waiting and (deadline is None or time.time() < deadline):
                time.sleep(1.0)  # a unit waits for the GPU to empty
                continue
            break
        retry = None
        # said before any work, so a worker that dies in its first cell has still said which cells it held
        print(f"taking {', '.join(label(c) for c in qq['units'][u]['cells'])}", flush=True)
        for k, c in enumerate(qq["units"][u]["cells"]):
            kind = cost_kind(c)
            if kind == "llmmq" and not bench.llmmq_cache:
                kind = "llmmq-first"
            est = COST_S[kind] if bench.dev.type == "cuda" else 0.0
            slow = max(1.0, spent / estimated) if estimated else 1.0
            if deadline is not None and time.time() + est * slow > deadline:
                print(f"not starting {label(c)}: ~{est * slow:.0f}s would end after the deadline", flush=True)
                record(u, k, "time")
                continue
            t0 = time.perf_counter()
            done, err = run_cell(bench, c, ver, mach, n)
            took = time.perf_counter() - t0
            if est:
                spent, estimated = spent + took, estimated + est
            if err is not None:
                if err.startswith(OOM) and len(qq["units"][u]["cells"]) == 1 and "oom_busy" not in qq["units"][u]:
                    print(f"{label(c)}: {err}; back to the queue, for when fewer workers hold cells", flush=True)
                    retry = (u, k, err)
                    continue
                print(f"FAILED {label(c)}: {err}", flush=True)
                record(u, k, f"failed: {err}")
                continue
            record(u, k, "done", done)
            print(cell_line(done, time.time() - q["t0"], took), flush=True)
        release(*(retry or ()))
    print("queue empty; done", flush=True)
    return 0


# ------------------------------------------------------------------ entry point


def parse_variant(spec: str) -> tuple[str, dict, list[float]]:
    """``NAME:K=V[,K=V]:B[,B]`` -> (name, CMPQConfig fields, budgets); values as JSON where they parse."""
    from cmpq.config import CMPQConfig

    try:
        name, kvs, budgets = spec.split(":")
        opts = {}
        for kv in kvs.split(","):
            k, v = kv.split("=", 1)
            try:
                opts[k] = json.loads(v)
            except json.JSONDecodeError:
                opts[k] = v
        bits = [float(b) for b in budgets.split(",")]
        CMPQConfig(**opts)  # unknown fields and bad values fail here, before any work
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"--cmpq-variant {spec!r}: {e} (expected NAME:K=V[,K=V]:B[,B])") from None
    return name, opts, bits


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="rtn, gptq, awq, hqq bit widths")
    ap.add_argument("--cmpq-budgets", type=float, nargs="+", default=[2.3, 2.5, 2.8, 3, 3.36, 3.6, 4, 4.3, 4.6],
                    help="the default algorithm's budgets: effective bits, every byte counted")
    ap.add_argument("--paper-budgets", type=float, nargs="*", default=[2, 2.2, 2.5, 3, 3.2, 3.5, 4],
                    help="the paper's method: nominal bits (none given: no paper cells)")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64], help="rtn, gptq, awq group sizes")
    ap.add_argument("--llmmq-budgets", type=float, nargs="+", default=[2, 2.5, 3, 3.5, 4])
    ap.add_argument("--ablations", action="store_true", help="add the paper's ablations (Tables 1, 4, 5, 6, 7)")
    ap.add_argument("--cmpq-variant", type=parse_variant, action="append", default=[], metavar="NAME:K=V[,K=V]:B[,B]",
                    help="the default with config fields changed, at effective budgets B, as ablation rows "
                         "'CMPQ NAME' (e.g. 'k-means swaps:kmeans_swaps=9:3.36,4.3')")
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
    ap.add_argument("--workers", type=int, default=1, help="worker processes sharing the GPU (1: serial, in process)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (workers: CPUs / workers)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--core", default=None, help="core sweep JSON to import CMPQ cells from "
                    "(default <out-dir>/core-<model>.json; 'none' to skip)")
    ap.add_argument("--verbose", action="store_true", help="log CMPQ quantization steps (per block, with seconds) "
                    "to stdout: where a cell's time goes when it does not finish")
    ap.add_argument("--fresh", action="store_true", help="discard an existing JSON with another signature")
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent only
    ap.add_argument("--queue", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    a.nsamples = a.nsamples or (4 if q else 128)
    a.calib_seqlen = a.calib_seqlen or (128 if q else 2048)
    a.seqlen = a.seqlen or (128 if q else 2048)
    a.max_windows = a.max_windows or (2 if q else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start, wall_start = time.perf_counter(), time.time()
    if a.worker_index is not None:
        return run_worker(a)
    if a.workers < 1:
        ap.error("--workers must be at least 1")
    name = Path(a.model).name.removesuffix(".gguf")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath, ppath = (out / f"quality-{name}{s}" for s in (".json", ".md", ".png"))
    hqq_why = hqq_available()
    if a.workers > 1:
        units0 = precheck(a, jpath, hqq_why)
        if units0:
            return run_parallel(a, argv, wall_start, units0, hqq_why)

    bench = Bench(a)
    a.eval_batch_size = a.eval_batch_size or default_eval_batch(bench.dev, a.workers)
    result = open_result(a, bench, jpath, out, name)
    if result is None:
        return 2

    def save() -> None:
        result["date"] = now_iso()
        atomic_write(jpath, json.dumps(result, indent=1))

    done = {c["key"] for c in result["cells"]}
    todo = [c for c in grid(a) if c["key"] not in done]
    if hqq_why:
        result["hqq_unavailable"] = hqq_why
    print(f"{len(todo)} cells to run ({len(done)} already in {jpath})", flush=True)
    skipped, llmmq_seen = [], False
    ver, mach = versions(), result["machine"]
    spent = estimated = 0.0  # measured seconds vs COST_S over this run's cells: this machine's pace
    for c in todo:
        kind = cost_kind(c)
        if kind == "llmmq":
            kind, llmmq_seen = ("llmmq" if llmmq_seen or bench.llmmq_cache else "llmmq-first"), True
        est = COST_S[kind] if bench.dev.type == "cuda" else 0.0
        pace = spent / estimated if estimated else 1.0
        elapsed = time.perf_counter() - t_start
        if a.max_minutes is not None and elapsed + est * pace > 60 * a.max_minutes:
            print(f"not starting {label(c)}: ~{est * pace:.0f}s would end after the deadline", flush=True)
            skipped.append(label(c))
            continue
        if c["method"] == "hqq" and hqq_why:
            skipped.append(f"{label(c)} (hqq unavailable: {hqq_why})")
            continue
        t0 = time.perf_counter()
        finished, err = run_cell(bench, c, ver, mach, 1)
        if est:
            spent, estimated = spent + time.perf_counter() - t0, estimated + est
        if err is not None:
            print(f"FAILED {label(c)}: {err}", flush=True)
            skipped.append(f"{label(c)} (failed: {err})")
            continue
        result["cells"].append(finished)
        save()
        print(cell_line(finished, time.perf_counter() - t_start, time.perf_counter() - t0), flush=True)
    result["skipped"] = skipped
    save()
    write_markdown(result, mpath)
    write_plot(result, ppath)
    print(f"wrote {jpath}, {mpath}, {ppath}; {len(skipped)} cells not run" + (f": {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
