"""Tiny driver for ncu: one 4096x11008 3-bit layer, two calls per kernel (the first builds its plan;
ncu -k/-c picks the kernels). One-token kernels by name (``cmpq.kernels.dispatch.RUNNERS``); ``mmaN``
is the tensor-core kernel at N tokens (``mma4``; ``mma8,mma16``: its time doubles from 8 to 16
tokens with the same grid and no spills, H100 2026-12-07, and the profile should say why);
``rlutN`` the standalone register-lookup kernel (its own layout, ``kernel_rlut.prepare``) at N
tokens. Used by kernel_variants.sh and device_ncu.sh."""
import sys

import torch

from cmpq.kernels import dispatch  # noqa: E402
from cmpq.kernels.testing import mix_counts, random_layer  # noqa: E402

variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["v3b", "v4s"]
counts, n_act = mix_counts(11008, 3.0)
layer = random_layer(4096, 11008, counts, n_act, round(5e-4 * 4096 * 11008), device="cuda",
                     generator=torch.Generator().manual_seed(0), pack=False)
x = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
rt = layer.runtime()
rlut = None
if any(v.startswith("rlut") for v in variants):
    from cmpq.kernels import kernel_rlut

    assert kernel_rlut.library(), kernel_rlut.library_error()
    rlut = kernel_rlut.prepare(layer)


def run(v: str) -> torch.Tensor | None:
    for name in ("mma", "rlut"):
        if v.startswith(name) and v[len(name):].isdigit():
            xt = torch.randn(int(v[len(name):]), 11008, device="cuda", dtype=torch.float16)
            return dispatch.RUNNERS["mma"](rt, xt) if name == "mma" else kernel_rlut.linear(xt, rlut)
    return dispatch.RUNNERS[v](rt, x)


for v in variants:
    for _ in range(2):
        y = run(v)
        assert y is not None, f"{v} does not apply"
torch.cuda.synchronize()
print("done", variants)
