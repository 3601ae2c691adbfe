"""One launch for the linears that share an input vs one launch each (issue 4, one token, v4s).

SmolLM2-135M's q/k/v and gate/up, Llama-2-7B's q/k/v (3 x 4096x4096) and gate/up (2 x 11008x4096), 13B's and 70B's q/k/v-shaped
groups, 3 bits, random layers in the layout ``quantize`` produces: ``kernel_v4.decode_group`` vs
``kernel_v4.decode`` per layer, both timed as in benchmarks/kernel_bench.py (CUDA graph over rotating
sets > 192 MiB, median of do_bench). Writes ``--out`` (JSON) and prints a table.
Usage (GPU): python benchmarks/group_launch.py --out benchmarks/results/group-launch-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os

import torch

from kernel_bench import ROTATE_BYTES, layer_bytes, time_graph  # noqa: E402
from cmpq.kernels import kernel_v4  # noqa: E402
from cmpq.kernels.testing import mix_counts, random_layer  # noqa: E402

GROUPS = {  # name: (member shapes out x in)
    "135M q/k/v (SmolLM2: 576 + 2 x 192)": [(576, 576), (192, 576), (192, 576)],
    "135M gate/up": [(1536, 576)] * 2,
    "7B q/k/v": [(4096, 4096)] * 3,
    "7B gate/up": [(11008, 4096)] * 2,
    "13B q/k/v": [(5120, 5120)] * 3,
    "70B q/k/v (GQA: 8192 + 2 x 1024)": [(8192, 8192), (1024, 8192), (1024, 8192)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/group-launch-h200.json")
    ap.add_argument("--bits", type=float, default=3.0)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shapes in GROUPS.items():
        def make():
            ls = []
            for out, n_in in shapes:
                counts, n_act = mix_counts(n_in, a.bits)
                ls.append(random_layer(out, n_in, counts, n_act, round(5e-4 * out * n_in), device="cuda",
                                       generator=gen, pack=False))
            return ls
        first = make()
        nbytes = sum(layer_bytes(l) for l in first)
        sets = [first] + [make() for _ in range(max(1, min(15, math.ceil(ROTATE_BYTES / nbytes))) - 1)]
        n_in = shapes[0][1]
        xs = [torch.randn(1, n_in, device="cuda", dtype=torch.float16) for _ in sets]
        rsets = [[l.runtime() for l in ls] for ls in sets]  # the runtime layouts, built once here
        for rts, x in zip(rsets, xs):  # correctness on every set before timing
            for y, rt in zip(kernel_v4.decode_group(rts, x), rts):
                torch.testing.assert_close(y, kernel_v4.decode(rt, x), rtol=1e-3, atol=1e-3)
        sep = time_graph([lambda rts=rts, x=x: [kernel_v4.decode(rt, x) for rt in rts] for rts, x in zip(rsets, xs)],
                         len(sets))
        grp = time_graph([lambda rts=rts, x=x: kernel_v4.decode_group(rts, x) for rts, x in zip(rsets, xs)], len(sets))
        rows.append(dict(group=name, shapes=shapes, bits=a.bits, separate_us=sep, group_us=grp, speedup=sep / grp))
        print(f"{name}: separate {sep:.1f} us, one launch {grp:.1f} us ({sep / grp:.2f}x)", flush=True)
        del sets, rsets, first
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, method="median of do_bench over a CUDA graph rotating sets (> 192 MiB)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n| group | separate launches us | one launch us | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['separate_us']:.1f} | {r['group_us']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
