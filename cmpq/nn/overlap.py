"""Prefill overlap for a whole model: its CMPQ layers linked in call order (``cmpq.kernels.prefetch``).

``with overlapped(model):`` every prefill call (more than 16 tokens, CUDA) starts dequantizing the
next layer's weight on a side stream before its own GEMM, so the dequantization runs beside the
GEMM instead of before it. The order is the module order, which is the call order of the Hugging
Face decoders we know (q, k, v, o, gate, up, down per block); a model that calls its layers in
another order only loses the overlap (the prepared weight is dropped, never used for another layer).
Costs one extra dequantized weight of memory (the largest layer's, in the activations' dtype).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from cmpq.kernels import prefetch


@contextlib.contextmanager
def overlapped(model: nn.Module) -> Iterator[int]:
    """Link ``model``'s CUDA CMPQ layers for the ``with`` block; yields how many were linked."""
    from cmpq.nn.linear import CMPQLinear

    chain = []
    for m in model.modules():
        if isinstance(m, CMPQLinear) and m.outlier_weight.is_cuda:
            rt = m.runtime()
            if rt is not None:
                chain.append(rt)
    prefetch.link(chain)
    try:
        yield len(chain)
    finally:
        prefetch.clear()
