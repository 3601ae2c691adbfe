"""Fused kernels for ``CMPQLinear``. ``dispatch`` returns the layer's output from a fused kernel
when one applies to this input (device, dtype, batch size), or None to use the PyTorch reference."""

from __future__ import annotations

import torch


def dispatch(layer: "torch.nn.Module", x: torch.Tensor) -> torch.Tensor | None:
    return None
