"""Which kernel serves a ``CMPQLinear`` call: a table of measured winners, not environment variables.

``choose(tokens, weights)`` reads ``TABLE`` (first row that fits wins); ``force(name)`` overrides it
for a ``with`` block (benchmarks, tests). ``run(x, rt)`` calls the chosen kernel on the layer's
runtime layout and, where it does not apply (library not built, widths or token count it does
not take, a forced plan that does not fit), the next one in ``FALLBACK``; None means the PyTorch
reference path (dequantize + ``F.linear``), which also serves every CPU, fp32 and empty input.

Kernels:
- ``v4s``: one token, CUDA (kernel_v4.cu). ``v3b``: 1..16 tokens, CUDA (lut_cuda.cu).
- ``mma``: 1..16 tokens, CUDA tensor cores (kernel_mma.cu; needs the layout's fragment part).
- ``prefill``: dequantize into a scratch weight (dequant_cuda.cu, else Triton) and cuBLAS; any count.
- ``triton``: the Triton fallbacks (no nvcc): lut_gemv up to 16 tokens, the Triton dequantizer above.
- ``reference``: no kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Iterator

import torch

from cmpq.kernels.layout import Runtime

KERNELS = ("v4s", "v3b", "mma", "prefill", "triton", "reference")
MAX_DECODE_TOKENS = 16  # the decode kernels' limit (v3b, mma, lut_gemv)

# (max tokens, max weights = out * in, kernel); None = no limit. Measured on one H200, 2026-11-30,
# random layers in the layout `quantize` writes, CUDA graph over > 192 MiB of weights (notes in
# benchmarks/notes-kernels.md, tables in benchmarks/results/, summary in docs/results.md).
TABLE: tuple[tuple[int | None, int | None, str], ...] = (
    # one token, up to 100 M weights: v4s. kernel-variants-h200.md, 3 bits, v4s vs v3b: 11.1 vs 17.1 us
    # (4096x4096), 18.5 vs 23.6 (11008x4096), 18.7 vs 24.0 (4096x11008), 24.8 vs 30.0 (8192x8192);
    # 2 and 4 bits the same way.
    (1, 100_000_000, "v4s"),
    # one token, larger (the 70B MLP shapes, 235 M weights): v3b 66.3 / 67.5 us vs v4s 73.1 / 69.9;
    # after v4s's cheaper refill (kernel-variants-refill-h200.md) 67.7 vs 69.9 on 28672x8192 and a
    # tie within 1% on 8192x28672 (67.8 vs 67.1).
    (1, None, "v3b"),
    # 2..16 tokens: mma. kernel-mma-h200.md: faster than v3b at every shape, width and token count
    # (4096x11008, 3 bits: 28.3 vs 43.5 us at 2 tokens, 90.5 vs 122.6 at 16). Against prefill
    # (kernels-h200.json vs kernels-prefill-h200.json): faster at 4 and 8 tokens on all 45
    # shape x width points, at 16 tokens on 36 of 45 (every 3-bit one; prefill was up to 7% faster on
    # the nine others, e.g. 86.9 vs 93.8 us on 4096x11008 at 4 bits). 2 tokens: prefill not measured.
    (MAX_DECODE_TOKENS, None, "mma"),
    # more tokens: dequantize + cuBLAS, the only path built for them (docs/results.md: 0.28-0.88x
    # FP16 from 64 to 2048 tokens).
    (None, None, "prefill"),
)

# where a kernel that does not apply hands the call
FALLBACK = {"v4s": "v3b", "mma": "v3b", "v3b": "triton", "prefill": "reference", "triton": "reference"}

_forced: str | None = None
_HAS_TRITON: bool | None = None


def triton_available() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def choose(tokens: int, weights: int) -> str:
    """The kernel for a call with ``tokens`` rows of input on a layer of ``weights`` (out x in)."""
    if _forced is not None:
        return _forced
    for max_tokens, max_weights, name in TABLE:
        if (max_tokens is None or tokens <= max_tokens) and (max_weights is None or weights <= max_weights):
            return name
    return "reference"


def forced() -> str | None:
    """The kernel ``force`` imposes right now, or None."""
    return _forced


@contextlib.contextmanager
def force(name: str) -> Iterator[None]:
    """Serve every call in the ``with`` block with kernel ``name`` (one of ``KERNELS``), whatever the
    table says; where it does not apply the call falls back as usual (``FALLBACK``). For benchmarks
    and tests: ``force("reference")`` turns the kernels off, ``force("triton")`` skips the CUDA
    ones. Process-wide (the kernels run below the dispatcher, on whatever thread calls them)."""
    global _forced
    if name not in KERNELS:
        raise ValueError(f"unknown cmpq kernel {name!r}; one of {', '.join(KERNELS)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


# -- runners: each returns the output, or None where it does not apply ---------------------------
def _v4s(rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    from cmpq.kernels import kernel_v4

    return kernel_v4.decode(rt, x)


def _v3b(rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    from cmpq.kernels import cuda_decode

    return cuda_decode.decode(rt, x)


def _mma(rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    from cmpq.kernels import kernel_mma

    return kernel_mma.decode(rt, x)


def _prefill(rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    if not triton_available():  # dequant.py holds the Triton dequantizer beside the CUDA one
        return None
    from cmpq.kernels.dequant import prefill

    return prefill(rt, x)


def _triton(rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    if not triton_available():
        return None
    if x.numel() // x.shape[-1] <= MAX_DECODE_TOKENS:
        from cmpq.kernels.lut_gemv import decode

        return decode(rt, x)
    from cmpq.kernels.dequant import prefill

    return prefill(rt, x, cuda=False)


RUNNERS: dict[str, Callable[[Runtime, torch.Tensor], torch.Tensor | None]] = {
    "v4s": _v4s, "v3b": _v3b, "mma": _mma, "prefill": _prefill, "triton": _triton}


def run(x: torch.Tensor, rt: Runtime) -> torch.Tensor | None:
    """``x @ W^T + bias`` (shape ``[..., out]``, dtype of ``x``) from the chosen kernel, or None for
    the reference path: not CUDA, not fp16/bf16, no rows, or no kernel applies."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != rt.n_in:
        return None
    if x.device != rt.device:
        return None
    tokens = x.numel() // x.shape[-1]
    if tokens == 0:
        return None
    return serve(choose(tokens, rt.out * rt.n_in), rt, x)


def serve(name: str, rt: Runtime, x: torch.Tensor) -> torch.Tensor | None:
    """Kernel ``name``'s output, or the first of its fallbacks that applies; None: reference path."""
    while name != "reference":
        y = RUNNERS[name](rt, x)
        if y is not None:
            return y
        name = FALLBACK[name]
    return None
