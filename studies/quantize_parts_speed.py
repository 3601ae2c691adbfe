"""Two parts of the 7B-shaped default, old form against new, timed alone on one GPU.

1. The walk's Hessian sum for one batch of 8 x 2,048 tokens with token weights: the TF32 GEMM on
   float32 copies that ``WeightedHessian.add`` made until 2026-12-08, against ``add_half_gram`` (one
   half-precision GEMM with a float32 output), at the 7B inputs (4,096 and 11,008 channels).
2. The fine-tuning's gradient scatter of one 11008 x 4096 layer with a 2/3/4-bit mix: one atomic add
   per weight, against the tile-summed adds (``scatter_grad``'s ``books``).

Why alone: the device time to run the 7B default did not come in the session that built both, and
these two numbers say what each change is worth without it. Usage:
    python studies/quantize_parts_speed.py --out studies/results/quantize-parts-speed.json
(``--small``: tiny shapes, for a CPU smoke test of the script itself.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from cmpq.model.calibration import add_half_gram


def _timed(fn, dev: torch.device, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _tf32_gram(total: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """The form ``WeightedHessian.add`` used before ``add_half_gram``."""
    x = x.float()
    xw = x * w[:, None]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        total.addmm_(xw.T, x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def hessians(dev: torch.device, tokens: int, widths: list[int]) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for d in widths:
        x = torch.randn(tokens, d, device=dev, generator=g).half()
        w = torch.rand(tokens, device=dev, generator=g) + 0.1
        w[0] = 1000.0  # a sink token
        a = torch.zeros(d, d, device=dev)
        b = torch.zeros(d, d, device=dev)
        before = _timed(lambda: _tf32_gram(a, x, w), dev)
        half_ok = add_half_gram(b, x, w)
        after = _timed(lambda: add_half_gram(b, x, w), dev) if half_ok else None
        a.zero_(), b.zero_()
        _tf32_gram(a, x, w)
        add_half_gram(b, x, w) if half_ok else _tf32_gram(b, x, w)
        rel = float((a - b).norm() / a.norm())
        rows.append({"part": "hessian", "tokens": tokens, "channels": d, "tf32_ms": round(before, 3),
                     "half_ms": None if after is None else round(after, 3), "half_path": half_ok,
                     "relative_difference": rel})
        print(rows[-1], flush=True)
    return rows


def scatter(dev: torch.device, out_f: int, in_f: int) -> list[dict]:
    from cmpq.kernels import gather_weight

    if not gather_weight.fused_available(torch.zeros(1, 1, dtype=torch.int32, device=dev)):
        return [{"part": "scatter", "skipped": "needs CUDA with Triton"}]
    g = torch.Generator(device=dev).manual_seed(1)
    bits = torch.tensor([2, 3, 4], device=dev)[torch.randint(0, 3, (in_f,), device=dev, generator=g)]
    size = (2 ** bits).to(torch.int32)
    base = torch.cumsum(size, 0, dtype=torch.int32) - size
    n = int(size.sum())
    where = (base[None, :] + (torch.rand(out_f, in_f, device=dev, generator=g) * size[None, :]).to(torch.int32)).contiguous()
    grad = torch.randn(out_f, in_f, device=dev, generator=g).half()
    books = (base, size, int(size.max()))
    per_weight = _timed(lambda: gather_weight.scatter_grad(grad, where, None, n, None), dev)
    tiled = _timed(lambda: gather_weight.scatter_grad(grad, where, None, n, books), dev)
    ref = gather_weight.scatter_grad_reference(grad, where, None, n)
    got = gather_weight.scatter_grad(grad, where, None, n, books)
    row = {"part": "scatter", "shape": [out_f, in_f], "per_weight_ms": round(per_weight, 3), "tile_summed_ms": round(tiled, 3),
           "max_abs_difference": float((got - ref).abs().max())}
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = hessians(dev, 256 if a.small else 16384, [64, 96] if a.small else [4096, 11008])
    rows += scatter(dev, *((64, 96) if a.small else (11008, 4096)))
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
