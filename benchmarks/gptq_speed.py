"""Where GPTQ's time goes: a whole-model GPTQ run on a small random Llama (CPU by default), timed by
phase, optionally under the torch profiler, with a digest of the quantized weights (to check that a
speed change leaves the result bit-identical).

    python benchmarks/gptq_speed.py                         # 2 blocks, 1024/2752, calibration 16 x 512
    python benchmarks/gptq_speed.py --profile               # + torch profiler table (top ops)
    python benchmarks/gptq_speed.py --impl /tmp/orig        # time another copy of cmpq/baselines (before/after)
    python benchmarks/gptq_speed.py --json benchmarks/results/gptq-speed-cpu.json
    python benchmarks/gptq_speed.py --loop --threads 1       # the column loop alone, us per column

Phases: ``hessian`` (the hooks' X^T X accumulation), ``forward`` (the block forwards, hooks excluded),
``gptq`` (the per-layer solver: Cholesky and column loop).
"""

from __future__ import annotations

import os
import sys
import argparse
import datetime
import hashlib
import importlib.util
import json
import time

import torch


def build(hidden: int, inter: int, blocks: int, heads: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=heads, max_position_embeddings=4096)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, 0.02)
    return m


def digest(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def load_impl(folder: str | None):
    """``cmpq.baselines.gptq`` / ``runners`` from this checkout, or the two files in ``folder``
    (loaded as modules under ``cmpq.baselines`` so their relative imports resolve)."""
    import cmpq.baselines.gptq as g
    import cmpq.baselines.runners as r

    if folder is None:
        return g, r
    mods = []
    for name in ("gptq", "runners"):
        spec = importlib.util.spec_from_file_location(f"cmpq.baselines._alt_{name}", os.path.join(folder, f"{name}.py"),
                                                      submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "cmpq.baselines"
        sys.modules[spec.name] = mod
        if name == "runners":  # make its `from .gptq import ...` see the alternative gptq
            sys.modules["cmpq.baselines.gptq"], keep = mods[0], sys.modules["cmpq.baselines.gptq"]
            try:
                spec.loader.exec_module(mod)
            finally:
                sys.modules["cmpq.baselines.gptq"] = keep
        else:
            spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1]


def loop_cost(gmod, rows: int, n: int = 1024, repeats: int = 3) -> float:
    """Seconds per column of the solver's column loop alone (Cholesky factor precomputed), best of
    ``repeats``. With a handful of rows the tensor work is nil and this is the per-column host cost
    (Python + dispatcher), the floor of the loop on a GPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, n, generator=g)
    H = x.T @ x
    Hinv = gmod._inverse_hessian_cholesky(H, 0.01, H.diagonal().mean())
    W = torch.randn(rows, n, generator=g) * 0.02
    real = gmod._inverse_hessian_cholesky
    gmod._inverse_hessian_cholesky = lambda *args: Hinv
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            gmod.gptq_quantize(W, H, 3, 128)
            best = min(best, time.perf_counter() - t0)
    finally:
        gmod._inverse_hessian_cholesky = real
    return best / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2752)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--no-share", action="store_true", help="share_hessians=False (one Hessian and solve per linear)")
    ap.add_argument("--impl", default=None, help="folder holding an alternative gptq.py + runners.py")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default=None)
    ap.add_argument("--loop", action="store_true", help="only time the column loop per column (8 and 4096 rows)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    gmod, rmod = load_impl(a.impl)
    if a.loop:
        row = {"label": a.label or (a.impl or "working tree"), "kind": "column loop, us per column (n=1024, 3 bits, g128)",
               **{f"rows_{r}": round(loop_cost(gmod, r) * 1e6, 1) for r in (8, 1024, 4096)},
               "threads": torch.get_num_threads(), "machine": "CPU", "date": datetime.date.today().isoformat()}
        print(json.dumps(row))
        if a.json:
            rows = json.load(open(a.json)) if os.path.exists(a.json) else []
            rows.append(row)
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return

    # phase timers: wrap the accumulator's add and the solver
    t = {"hessian": 0.0, "gptq": 0.0}
    acc_cls = gmod.HessianAccumulator
    add0 = acc_cls.add

    def add(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return add0(self, *args, **kw)
        finally:
            t["hessian"] += time.perf_counter() - t0

    acc_cls.add = add
    solver0 = rmod.gptq_quantize

    def solver(*args, **kw):
        t0 = time.perf_counter()
        try:
            return solver0(*args, **kw)
        finally:
            t["gptq"] += time.perf_counter() - t0

    rmod.gptq_quantize = solver
    model = build(a.hidden, a.inter, a.blocks, a.heads)
    ids = torch.randint(0, 1000, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    prof = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        prof.__enter__()
    t0 = time.perf_counter()
    rep = rmod.quantize_baseline(model, None, "gptq", a.bits, group_size=a.group_size, calib=ids, device="cpu",
                                 log=None, batch_size=a.batch, act_order=a.act_order,
                                 **({"share_hessians": False} if a.no_share else {}))
    total = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    row = {"label": a.label or (a.impl or "working tree"), "total_s": round(total, 2),
           "hessian_s": round(t["hessian"], 2), "gptq_s": round(t["gptq"], 2),
           "forward_and_rest_s": round(total - t["hessian"] - t["gptq"], 2), "weights_digest": digest(model),
           "shape": {"hidden": a.hidden, "inter": a.inter, "blocks": a.blocks}, "nsamples": a.nsamples,
           "seqlen": a.seqlen, "batch": a.batch, "bits": a.bits, "group_size": a.group_size,
           "act_order": a.act_order, "share_hessians": None if a.impl else not a.no_share,
           "gptq_solves": rep.get("gptq_solves"), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": "CPU", "date": datetime.date.today().isoformat()}
    print(json.dumps(row))
    if a.json:
        rows = json.load(open(a.json)) if os.path.exists(a.json) else []
        rows.append(row)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
