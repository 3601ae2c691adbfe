"""Compare cmpq's GPTQ with the authors' reference implementation on the same layer and Hessian.

The reference (IST-DASLab/gptq, `gptq.py` + `quant.py`) is not part of cmpq: fetch it yourself and
pass its folder. Runs on CPU. Prints a table and writes JSON.

    python studies/check_gptq_reference.py --ref-dir /path/to/IST-DASLab/gptq
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
from torch import nn

from cmpq.baselines.gptq import HessianAccumulator, gptq_quantize
from cmpq.baselines.rtn import rtn_quantize


def correlated_inputs(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))  # a few loud channels, like real activations
    return (torch.randn(n, d, generator=g) @ mix) * scale


def _load_reference(ref_dir: str, name: str):
    """Module ``name`` of the reference checkout, by path (so the checkout need not go on sys.path)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(name, os.path.join(ref_dir, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-dir", required=True)
    ap.add_argument("--out", default="benchmarks/results/gptq-vs-reference.json")
    a = ap.parse_args()
    torch.cuda.synchronize = lambda *args, **kw: None  # the reference calls it unconditionally
    Quantizer = _load_reference(a.ref_dir, "quant").Quantizer  # first: gptq.py imports it as `quant`
    GPTQ = _load_reference(a.ref_dir, "gptq").GPTQ

    g = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in ((256, 576), (576, 1536)):
        x = correlated_inputs(4096, in_f, g)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        for bits in (2, 3, 4):
            for act_order in (False, True):
                lin = nn.Linear(in_f, out_f, bias=False)
                lin.weight.data = w.clone()
                ref = GPTQ(lin)
                for chunk in x.split(512):
                    ref.add_batch(chunk, None)
                ref.quantizer = Quantizer()
                ref.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
                ref.fasterquant(blocksize=128, percdamp=0.01, groupsize=128, actorder=act_order)
                w_ref = lin.weight.data.clone()

                acc = HessianAccumulator(in_f)
                acc.add(x)
                w_ours = gptq_quantize(w, acc.H, bits, group_size=128, damp=0.01, block_size=128, act_order=act_order)

                def out_err(wq: torch.Tensor) -> float:
                    return ((x @ (wq - w).T).norm() / (x @ w.T).norm()).item()

                rows.append({
                    "shape": [out_f, in_f], "bits": bits, "act_order": act_order,
                    "same_level_fraction": ((w_ours - w_ref).abs() < 1e-5).float().mean().item(),  # equal up to float rounding
                    "max_abs_diff": (w_ours - w_ref).abs().max().item(),
                    "output_rel_err_ours": out_err(w_ours), "output_rel_err_reference": out_err(w_ref),
                    "output_rel_err_rtn": out_err(rtn_quantize(w, bits, 128)),
                })
                r = rows[-1]
                print(f"{out_f}x{in_f} {bits}b act_order={act_order!s:5}: same grid level {r['same_level_fraction']:.5f}, "
                      f"output err ours {r['output_rel_err_ours']:.4f} ref {r['output_rel_err_reference']:.4f} "
                      f"rtn {r['output_rel_err_rtn']:.4f}", flush=True)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": "CPU", "torch": torch.__version__, "reference": "IST-DASLab/gptq gptq.py (fetched)",
           "calibration": "4096 correlated random tokens", "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
