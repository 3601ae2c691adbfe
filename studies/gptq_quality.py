"""Why is GPTQ g128 worse than RTN g128 at 4 bits on SmolLM2-135M (already Q4_1)? Reduced-scale CPU study.

Step 1 (``hessians``) runs the full-precision model once over three token sets with hooks on every
block linear and keeps, per block input (q/k/v share one, gate/up share one), ``X^T X`` summed over
the set: ``cal`` (the calibration windows, C4), ``wiki`` (the WikiText-2 windows perplexity is measured
on) and ``c4val`` (C4 validation windows: held out, calibration distribution). It also keeps the
full-precision hidden state after every block on the first WikiText-2 window.

Step 2 (``run``) quantizes a fresh copy of the model with one variant and records:
* perplexity on the WikiText-2 windows;
* per linear, the layer objective ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` on each set's full-precision
  inputs (``tr(dW H dW^T) / tr(W H W^T)``): calibration error vs held-out error;
* per block, the relative deviation of the hidden state from the full-precision one (WikiText-2 window 0),
  to see errors accumulate through the blocks.
Variants: ``--method rtn|gptq``, ``--bits``, ``--act-order``, ``--damp``, ``--static-groups``, and
``--inputs seq`` (the standard walk: each block calibrated on the outputs of the already quantized
blocks) or ``--inputs fp`` (every layer from the full-precision model's inputs, the step-1 Hessians).

    python studies/gptq_quality.py hessians --nsamples 16 --calib-seqlen 2048 --windows 8
    python studies/gptq_quality.py run --method rtn --bits 4 --out benchmarks/results/gptq-quality-smollm2-cpu.json
    python studies/gptq_quality.py run --method gptq --bits 4 --inputs seq --out ...
    python studies/gptq_quality.py report --out ...      # Markdown table of all rows
    python studies/gptq_quality.py hybrid --bits 4 --inputs seq   # GPTQ weights with some layers RTN
"""

from __future__ import annotations

import os


import argparse
import datetime
import json
import time
from pathlib import Path

import torch

SHARE = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # Llama: linears reading one tensor


def key_of(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{head}.{SHARE.get(leaf, leaf)}"


def block_linears(model) -> dict[str, torch.nn.Linear]:
    from cmpq.model.blocks import find_blocks, find_linears

    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}


def load(a):
    from cmpq.model.loading import load_model

    return load_model(a.model, dtype=torch.float32, device="cpu")


def token_sets(tok, a) -> dict[str, torch.Tensor]:
    from cmpq.data.tokens import eval_windows
    from cmpq.options import RunOptions
    from cmpq.quantize import resolve_calibration

    cal = resolve_calibration(tok, RunOptions(calib="c4", nsamples=a.nsamples, seqlen=a.calib_seqlen, seed=0)).ids
    wiki = eval_windows(tok, "wikitext2", 2048, nsamples=a.windows).ids
    c4val = eval_windows(tok, "c4", 2048, nsamples=a.heldout_windows).ids
    return {"cal": cal, "wiki": wiki, "c4val": c4val}


@torch.no_grad()
def mode_hessians(a) -> None:
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = load(a)
    sets = token_sets(tok, a)
    lins = block_linears(model)
    out = {"meta": {"nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen, "windows": a.windows,
                    "heldout_windows": a.heldout_windows}, "ids": sets}
    for set_name, ids in sets.items():
        acc: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}
        hooks = []
        for name, lin in lins.items():
            k = key_of(name)
            if k != name:
                continue

            def hook(m, args, k=k):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if k not in acc:
                    acc[k] = torch.zeros(x.shape[1], x.shape[1])
                acc[k].addmm_(x.T, x)
                count[k] = count.get(k, 0) + x.shape[0]

            hooks.append(lin.register_forward_pre_hook(hook))
        t0 = time.perf_counter()
        try:
            for i in range(0, ids.shape[0], a.batch):
                model.model(input_ids=ids[i : i + a.batch], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out[set_name] = {k: (v / count[k]).float() for k, v in acc.items()}
        print(f"{set_name}: {ids.shape[0]} x {ids.shape[1]} tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    out["fp_hidden"] = block_hidden(model, sets["wiki"][:1])
    torch.save(out, cache / "hessians.pt")


@torch.no_grad()
def block_hidden(model, ids) -> list[torch.Tensor]:
    from cmpq.model.blocks import find_blocks

    _, blocks = find_blocks(model)
    hs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, args, out: hs.append((out[0] if isinstance(out, tuple) else out).clone()))
             for b in blocks]
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return hs


@torch.no_grad()
def linear_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every block linear's input on ``ids`` ``[n, t]``, as ``[n*t, in]``. With ``t == 1`` these are
    exactly the first token of each window (a causal model's first position sees only itself)."""
    lins = block_linears(model)
    X: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(lambda m, args, n=n: X.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).clone()))
             for n, lin in lins.items()]
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return X


def tok_err(W: torch.Tensor, Wq: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (W - Wq).T).norm() / (x @ W.T).norm())


def rel_err(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    dW = (W - Wq).double()
    Hd = H.double()
    return float(((dW @ Hd) * dW).sum() / ((W.double() @ Hd) * W.double()).sum())


@torch.no_grad()
def mode_run(a) -> None:
    from cmpq.baselines.gptq import gptq_quantize
    from cmpq.baselines.rtn import rtn_quantize
    from cmpq.baselines.runners import quantize_baseline
    from cmpq.eval.perplexity import perplexity

    data = torch.load(Path(a.cache) / "hessians.pt")
    model, tok = load(a)
    lins = block_linears(model)
    orig = {n: lin.weight.data.clone() for n, lin in lins.items()}
    opts = dict(damp=a.damp, act_order=a.act_order, static_groups=a.static_groups)
    if a.first_token_weight != 1:
        opts["first_token_weight"] = a.first_token_weight
    tag = Path(a.cache) / ("weights-" + "".join(c if c.isalnum() else "_" for c in name(vars(a) | {"inputs": a.inputs})) + ".pt")
    t0 = time.perf_counter()
    if a.stage == "eval":  # weights from an earlier `--stage quant` call
        saved = torch.load(tag)
        for n, lin in lins.items():
            lin.weight.data = saved["weights"][n]
        t0 -= saved["quantize_s"]
    elif a.method == "fp":
        pass
    elif a.method == "rtn":
        for lin in lins.values():
            lin.weight.data = rtn_quantize(lin.weight.data, a.bits, a.group_size)
    elif a.inputs == "fp":  # every layer from the full-precision inputs
        Hcal = data["cal"]
        if a.first_token_weight != 1:  # count each window's first token m times instead of once
            ids = data["ids"]["cal"]
            X0 = linear_inputs(model, ids[:, :1])
            n_tok = ids.numel()
            Hcal = {k: (H * n_tok + (a.first_token_weight - 1) * X0[k].T @ X0[k]) / n_tok for k, H in Hcal.items()}
        groups: dict[str, list[str]] = {}
        for n in lins:
            groups.setdefault(key_of(n), []).append(n)
        for k, names in groups.items():
            W = torch.cat([orig[n] for n in names])
            Wq = gptq_quantize(W, Hcal[k], a.bits, a.group_size, a.damp, 128, a.act_order, a.static_groups)
            for n, w in zip(names, Wq.split([orig[n].shape[0] for n in names])):
                lins[n].weight.data = w.contiguous()
    else:  # the standard walk
        quantize_baseline(model, None, "gptq", a.bits, group_size=a.group_size, calib=data["ids"]["cal"], device="cpu",
                          log=None, batch_size=a.batch, **opts)
    q_s = time.perf_counter() - t0
    if a.stage == "quant":
        torch.save({"weights": {n: lin.weight.data for n, lin in lins.items()}, "quantize_s": q_s}, tag)
        print(f"saved {tag} after {q_s:.0f}s", flush=True)
        return
    layers = {}
    for n, lin in lins.items():
        k = key_of(n)
        layers[n] = {s: rel_err(orig[n], lin.weight.data, data[s][k]) for s in ("cal", "wiki", "c4val")}
    quant = {n: lin.weight.data for n, lin in lins.items()}
    for n, lin in lins.items():  # the full-precision model's inputs
        lin.weight.data = orig[n]
    first = linear_inputs(model, data["ids"]["wiki"][:, :1])  # each window's first token (the attention sink)
    other = linear_inputs(model, data["ids"]["wiki"][:1, :257])
    other = {n: x[1:] for n, x in other.items()}  # window 0, tokens 1..256
    for n, lin in lins.items():
        lin.weight.data = quant[n]
    by_type: dict[str, dict] = {}
    for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        names = [n for n in lins if n.endswith(t)]
        med = lambda xs: sorted(xs)[len(xs) // 2]
        by_type[t] = {"first_token_err": med([tok_err(orig[n], lins[n].weight.data, first[n]) for n in names]),
                      "other_token_err": med([tok_err(orig[n], lins[n].weight.data, other[n]) for n in names]),
                      "layer_err_wiki": med([layers[n]["wiki"] for n in names])}
    hs = block_hidden(model, data["ids"]["wiki"][:1])
    drift = [float((h - f).norm() / f.norm()) for h, f in zip(hs, data["fp_hidden"])]
    t1 = time.perf_counter()
    ppl = perplexity(model, data["ids"]["wiki"], a.batch, log=None, label="wiki")
    row = {"method": a.method, "bits": a.bits, "group_size": a.group_size,
           "inputs": a.inputs if a.method == "gptq" else None, **(opts if a.method == "gptq" else {}),
           "wiki_ppl": round(ppl, 3), "eval_windows": int(data["ids"]["wiki"].shape[0]),
           "calibration": f"c4 {data['meta']['nsamples']} x {data['meta']['calib_seqlen']}",
           "heldout": f"c4 validation {data['meta']['heldout_windows']} x 2048",
           "layer_err_mean": {s: sum(v[s] for v in layers.values()) / len(layers) for s in ("cal", "wiki", "c4val")},
           "by_type": by_type, "hidden_drift": drift, "layers": layers, "quantize_s": round(q_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
           "machine": "CPU (reduced scale)", "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "label": a.label}
    print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "hidden_drift", "by_type")}), flush=True)
    for t, v in by_type.items():
        print(f"  {t:10s} median rel. output error: first token {v['first_token_err']:.4f}, other tokens "
              f"{v['other_token_err']:.4f}, layer objective (wiki) {v['layer_err_wiki']:.5f}", flush=True)
    print("hidden drift by block:", " ".join(f"{d:.3f}" for d in drift), flush=True)
    rows = json.load(open(a.out)) if os.path.exists(a.out) else []
    rows.append(row)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


@torch.no_grad()
def mode_hybrid(a) -> None:
    """GPTQ weights (saved by ``run --stage quant``) with some linears replaced by RTN: which layers'
    GPTQ costs perplexity. Also: how many weights RTN g128 leaves unchanged (are the Q4_1 weights
    already on its grid?)."""
    from cmpq.baselines.rtn import rtn_quantize
    from cmpq.eval.perplexity import perplexity

    data = torch.load(Path(a.cache) / "hessians.pt")
    model, tok = load(a)
    lins = block_linears(model)
    orig = {n: lin.weight.data.clone() for n, lin in lins.items()}
    tag = Path(a.cache) / ("weights-" + "".join(c if c.isalnum() else "_" for c in name(vars(a))) + ".pt")
    g = torch.load(tag)["weights"]
    rtn = {n: rtn_quantize(w, a.bits, a.group_size) for n, w in orig.items()}
    n_w = sum(w.numel() for w in orig.values())
    out = {"gptq": name(vars(a)), "bits": a.bits,
           "rtn_unchanged_fraction": sum(int((rtn[n] == orig[n]).sum()) for n in orig) / n_w,
           "gptq_unchanged_fraction": sum(int((g[n] == orig[n]).sum()) for n in orig) / n_w, "ppl": {}}
    print(json.dumps(out), flush=True)
    variants = {
        "GPTQ everywhere": lambda n: False,
        "RTN for the attention linears (q/k/v/o), GPTQ for the MLP": lambda n: ".self_attn." in n,
        "RTN for the MLP, GPTQ for attention": lambda n: ".mlp." in n,
        "RTN for v_proj only": lambda n: n.endswith("v_proj"),
        "RTN for q_proj and k_proj only": lambda n: n.endswith(("q_proj", "k_proj")),
        "RTN for block 11 down_proj (creates the massive activation)": lambda n: n == "model.layers.11.mlp.down_proj",
    }
    for label, use_rtn in variants.items():
        for n, lin in lins.items():
            lin.weight.data = rtn[n] if use_rtn(n) else g[n]
        out["ppl"][label] = round(perplexity(model, data["ids"]["wiki"], a.batch, log=None), 3)
        print(f"{label}: WikiText-2 ppl {out['ppl'][label]:.3f}", flush=True)
    out.update(machine="CPU (reduced scale)", date=datetime.date.today().isoformat())
    path = Path(a.out).with_name(Path(a.out).stem + "-hybrid.json")
    rows = json.load(open(path)) if path.exists() else []
    rows.append(out)
    path.write_text(json.dumps(rows, indent=1))


def name(r: dict) -> str:
    if r["method"] == "fp":
        return "full precision (Q4_1 GGUF dequantized)"
    if r["method"] == "rtn":
        return f"RTN {r['bits']}b g{r['group_size']}"
    s = f"GPTQ {r['bits']}b g{r['group_size']} {r['inputs']}-inputs damp {r['damp']}"
    s += (" act-order" if r["act_order"] else "") + (" static" if r["static_groups"] else "")
    return s + (f" first-token x{r['first_token_weight']:g}" if r.get("first_token_weight", 1) != 1 else "")


def mode_report(a) -> None:
    rows = json.load(open(a.out))
    lines = ["| variant | WikiText-2 ppl | layer err cal | layer err wiki | layer err c4val | "
             "layers better than RTN (wiki) | v_proj / q_proj output err, first token | same, other tokens | "
             "drift after block 1 / 15 / 30 |", "|---|---|---|---|---|---|---|---|---|"]
    rtn = {r["bits"]: r for r in rows if r["method"] == "rtn"}
    rows = sorted(rows, key=lambda r: (r["method"] != "fp", r["bits"], r["method"] != "rtn"))
    for r in rows:
        e = r["layer_err_mean"]
        base = rtn.get(r["bits"])
        better = ""
        if base and r is not base and r["method"] != "fp":
            wins = sum(r["layers"][n]["wiki"] < base["layers"][n]["wiki"] for n in r["layers"])
            better = f"{wins}/{len(r['layers'])}"
        d = r["hidden_drift"]
        bt = r.get("by_type", {})
        tok = ("", "") if r["method"] == "fp" or not bt else tuple(
            f"{bt['v_proj'][k]:.3f} / {bt['q_proj'][k]:.3f}" for k in ("first_token_err", "other_token_err"))
        lines.append(f"| {name(r)} | {r['wiki_ppl']:.2f} | {e['cal']:.5f} | {e['wiki']:.5f} | {e['c4val']:.5f} | {better} | "
                     f"{tok[0]} | {tok[1]} | {d[0]:.3f} / {d[len(d) // 2 - 1]:.3f} / {d[-1]:.3f} |")
    text = "\n".join(lines)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("hessians", "run", "report", "hybrid"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", default="/tmp/gptq_quality_cache")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--method", default="gptq", choices=("fp", "rtn", "gptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--inputs", default="seq", choices=("seq", "fp"))
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--first-token-weight", type=float, default=1.0,
                    help="fp inputs: count each calibration window's first token (the attention sink) this many times")
    ap.add_argument("--label", default=None)
    ap.add_argument("--stage", default="all", choices=("all", "quant", "eval"),
                    help="quant: quantize and save the weights to the cache; eval: measure saved weights")
    ap.add_argument("--out", default="benchmarks/results/gptq-quality-smollm2-cpu.json")
    ap.add_argument("--md", default=None)
    a = ap.parse_args()
    {"hessians": mode_hessians, "run": mode_run, "report": mode_report, "hybrid": mode_hybrid}[a.mode](a)


if __name__ == "__main__":
    main()
