"""Fused kernels for ``CMPQLinear``. ``dispatch`` returns the layer's output from a fused kernel
when one applies to this input (device, dtype, batch size), or None to use the PyTorch reference.

- CUDA, fp16/bf16 input, no autograd: 1..16 tokens -> ``cuda_decode.decode`` (CUDA C++
  shared-memory lookup-table kernels, compiled once with nvcc: v4s/v3b for one token, mma for
  2..16) or, where that is unavailable (no nvcc, layer with widths other than 2/3/4),
  ``lut_gemv.decode`` (Triton, v2); more tokens -> ``dequant.prefill`` (dequantize with
  ``dequant_cuda.cu``, or Triton without nvcc, then cuBLAS). Everything else (CPU, no Triton, fp32,
  gradients) -> None.
- ``CMPQ_KERNELS=0`` turns the kernels off; ``CMPQ_KERNELS=triton`` skips the CUDA kernels.
- ``CMPQ_DECODE_VARIANT`` (default ``cuda_decode.DEFAULT_VARIANT``) picks the one-token CUDA kernel:
  ``v3b`` or ``v4s`` (``kernel_v4.cu``).
- ``CMPQ_DECODE_MULTI`` (default ``cuda_decode.DEFAULT_MULTI``) picks the 2..16-token CUDA kernel:
  ``v3b`` (CUDA cores) or ``mma`` (``kernel_mma.cu``: tensor cores, mma.sync m16n8k16).

Triton is imported lazily, so the package works without it. Tests call ``decode``/``prefill``
directly on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

MAX_DECODE_TOKENS = 16
_HAS_TRITON: bool | None = None


def triton_available() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def dispatch(layer: "torch.nn.Module", x: torch.Tensor) -> torch.Tensor | None:
    if os.environ.get("CMPQ_KERNELS", "1") == "0":
        return None
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != layer.in_features:
        return None
    if layer.outlier_weight.device != x.device or (torch.is_grad_enabled() and x.requires_grad):
        return None
    tokens = x.numel() // x.shape[-1]
    if tokens == 0:
        return None
    rt = layer.runtime()
    if rt is None:
        return None
    cuda = os.environ.get("CMPQ_KERNELS", "1") != "triton"
    if tokens <= MAX_DECODE_TOKENS and cuda:
        from cmpq.kernels import cuda_decode

        y = cuda_decode.decode(rt, x)
        if y is not None:
            return y
    if not triton_available():
        return None
    if tokens <= MAX_DECODE_TOKENS:
        from cmpq.kernels.lut_gemv import decode

        return decode(rt, x)
    from cmpq.kernels.dequant import prefill

    return prefill(rt, x, cuda)
