"""Horizontal fusion at inference: linears that read the same input (q/k/v, gate/up) in one launch.

Each CMPQ decode launch has a fixed cost of several microseconds (table build, split-K epilogue),
which dominates 4096x4096 layers. ``fuse_shared_inputs(model)`` marks, in every decoder block, the
``CMPQLinear`` siblings that a Hugging Face block calls one after another on the same tensor. The
first call of a group computes every member's output in one launch (``kernel_v4.decode_group``) and
hands the others theirs when they are called. Modules, weights and ``state_dict`` are unchanged.

A member takes a precomputed output only if the calls were consecutive (no other ``CMPQLinear``
call in between, in group order) and its input is the very tensor the first member saw (same
storage, shape, strides and version counter); anything else computes normally. So a model that
calls them differently, or Inductor reordering them, loses the fusion but stays correct.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch
from torch import nn

# (parent, members in call order) of the blocks we know; members missing or not CMPQ are skipped
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)

_TICK = itertools.count()


def tick() -> int:
    """Stamp of a CMPQLinear call (every call takes one, fused or not)."""
    return next(_TICK)


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.device)


def _kernel_outputs(layers: list, x: torch.Tensor) -> list[torch.Tensor] | None:
    """One launch for all members (CUDA, fp16/bf16, one token, the dispatch table picks v4s for
    every member), else None."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.numel() != x.shape[-1]:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    from cmpq.kernels import choose, kernel_v4

    if any(choose(1, layer.out_features * layer.in_features) != "v4s" for layer in layers):
        return None
    rts = [layer.runtime() for layer in layers]
    if any(rt is None for rt in rts):
        return None
    outs = kernel_v4.decode_group(rts, x)
    if outs is None:
        return None
    # each layout's bias is bias / row_scale (layout.build): scale as torch.ops.cmpq.linear does
    return [y if y is None or m.row_scale is None else y * m.row_scale.to(y.dtype) for y, m in zip(outs, layers)]


class SharedInputGroup:
    """Members of one group; ``call(i, x, stamp)`` returns member i's output or None (compute it)."""

    def __init__(self, layers: list, compute: Callable | None = None) -> None:
        self.layers = layers
        self.compute = compute or _kernel_outputs
        self.pending: list | None = None  # outputs computed by member 0, taken one by one
        self.key: tuple = ()  # the input they were computed for
        self.stamp = -1  # member 0's call stamp

    def call(self, index: int, x: torch.Tensor, stamp: int) -> torch.Tensor | None:
        if index == 0:
            self.pending = None
            outs = self.compute(self.layers, x)
            if outs is not None and len(self.layers) > 1:
                self.pending, self.key, self.stamp = outs, _key(x), stamp
            return None if outs is None else outs[0]
        p, self.pending = self.pending, None
        if p is None or stamp != self.stamp + index or _key(x) != self.key or p[index] is None:
            return None
        out, p[index] = p[index], None
        if index + 1 < len(self.layers):
            self.pending = p  # the next member may still take its own
        return out


def fuse_shared_inputs(model: nn.Module, compute: Callable | None = None) -> int:
    """Group the CMPQ linears of every decoder block that share an input; returns the group count.
    ``compute`` (tests) replaces the fused kernel: ``compute(layers, x) -> outputs | None``."""
    from cmpq.model.blocks import find_blocks
    from cmpq.nn.linear import CMPQLinear

    _, blocks = find_blocks(model)
    n = 0
    for block in blocks:
        for parent_name, names in GROUPS:
            parent = getattr(block, parent_name, None)
            members = [getattr(parent, m, None) for m in names] if parent is not None else []
            members = [m for m in members if isinstance(m, CMPQLinear)]
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = SharedInputGroup(members, compute)
            for i, m in enumerate(members):
                m._group = (group, i)
            n += 1
    return n


def unfuse(model: nn.Module) -> None:
    from cmpq.nn.linear import CMPQLinear

    for m in model.modules():
        if isinstance(m, CMPQLinear):
            m._group = None


@contextlib.contextmanager
def fused(model: nn.Module) -> Iterator[int]:
    """``fuse_shared_inputs`` for the duration of a ``with`` block (yields the group count)."""
    n = fuse_shared_inputs(model)
    try:
        yield n
    finally:
        unfuse(model)
