"""Fused kernels for ``CMPQLinear``, behind the operator ``torch.ops.cmpq.linear`` (cmpq/nn/ops.py).

- ``layout``: the runtime layout every kernel reads, built once per layer at load time.
- ``dispatch``: which kernel serves a call (``TABLE`` of measured winners, ``choose``), ``force``
  for benchmarks and tests, ``run``.
- CUDA C++ behind ctypes, compiled with nvcc at first use: ``kernel_v4`` (v4s, one token),
  ``cuda_decode`` (v3b, 1..16 tokens; the shared build/plan machinery), ``kernel_mma`` (tensor
  cores, 2..16 tokens), ``dequant`` (prefill: dequantize + cuBLAS; also the Triton dequantizer).
- Triton: ``lut_gemv`` (decode where nvcc is missing). Imported lazily, so the package works
  without Triton. Tests call the kernels directly on CPU tensors under ``TRITON_INTERPRET=1``.
- Kernels of the quantizer, not of the operator: ``feedback`` (the compensated pass's column loop),
  ``gather_weight`` (fine-tuning's weight gather and gradient scatter), ``lloyd`` (k-means' Lloyd
  loop, the default on CUDA: ``cmpq.algorithm.kmeans.FUSED_LLOYD``).
"""

from cmpq.kernels.dispatch import KERNELS, TABLE, choose, force, forced, triton_available

__all__ = ["KERNELS", "TABLE", "choose", "force", "forced", "triton_available"]
