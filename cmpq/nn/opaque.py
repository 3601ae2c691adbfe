"""``torch.compile`` support: each ``CMPQLinear`` call is one opaque op, ``cmpq::linear``.

The decode kernels are launched through ctypes and keep per-layer caches (repacked layouts, plans),
which dynamo cannot trace. Wrapped as a custom op, a layer is a single node whose output shape is
known (``[..., out_features]``), so the whole decoder step compiles as one graph: the model's small
ops (norms, rotary, residuals, activations) fuse into a few Triton kernels around our kernels,
with no graph break per linear. The op finds its layer through an integer handle, a constant of
the traced graph.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def register(layer: torch.nn.Module) -> int:
    """A handle for ``layer`` (held weakly: registering does not keep a layer alive)."""
    h = next(_NEXT)
    _LAYERS[h] = layer
    return h


@torch.library.custom_op("cmpq::linear", mutates_args=())
def cmpq_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"cmpq::linear: layer handle {handle} is gone (the model was freed)")
    return layer.forward_eager(x)


@cmpq_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
