"""Horizontal fusion at inference: linears that read the same input (q/k/v, gate/up) in one launch.

Each CMPQ decode launch has a fixed cost of several microseconds (table build, split-K epilogue),
which dominates 4096x4096 layers. ``fuse_shared_inputs(model)`` marks, in every decoder block, the
``CMPQLinear`` siblings that a Hugging Face block calls one after another on the same tensor. The
first call of a group computes every member's output in one launch (``kernel_v4.decode_group``) and
hands the others theirs when they are called. Modules, weights and ``state_dict`` are unchanged.

Compiled, Python state between calls does not exist: ``group_shared_inputs`` rewrites the graph
instead. Every set of ``cmpq::linear`` nodes that read one input becomes one ``cmpq::linear_group``
node (cmpq/nn/ops.py), whose CUDA kernel is the same one-launch decode; ``compile_backend()`` is
Inductor with that pass first (``cmpq.generate`` uses it for ``compile=True, fuse=True``).

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
    """One launch for all members (``ops.group_kernel``: CUDA, fp16/bf16, one token, v4s for every
    member), else None."""
    if not x.is_cuda:
        return None
    from cmpq.nn import ops

    return ops.group_kernel(x, [layer.runtime() for layer in layers], [layer.row_scale for layer in layers])


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


# -- compiled: a graph pass ---------------------------------------------------------------------
def _is_linear(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.ops.cmpq.linear, torch.ops.cmpq.linear.default)
            and len(node.args) == 15 and not node.kwargs)


def _depends_on(node: torch.fx.Node, targets: list, order: dict) -> bool:
    """Whether ``node`` is computed from any node in ``targets``. Only nodes placed after the first
    target can be, so the walk stops there instead of visiting the whole graph above each linear."""
    if not targets:
        return False
    first, wanted, seen = order[targets[0]], set(targets), set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in wanted:
            return True
        if n in seen or order[n] < first:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _hoist(node: torch.fx.Node, before: torch.fx.Node, order: dict) -> bool:
    """Move ``node`` and what it is computed from above ``before`` where needed; False (nothing
    moved) if one of them has side effects or reads a placeholder defined later."""
    late: list[torch.fx.Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if order[n] < order[before] or n in late:
            continue
        if n.op not in ("call_function", "call_method", "get_attr") or n.is_impure():
            return False
        late.append(n)
        stack.extend(n.all_input_nodes)
    for n in sorted(late, key=order.__getitem__):  # graph order is a topological order
        before.prepend(n)
    return True


def group_shared_inputs(gm: torch.fx.GraphModule) -> int:
    """Rewrite every set of two or more ``cmpq::linear`` nodes that read the same input (and do not
    depend on one another) into one ``cmpq::linear_group`` node; returns the number of groups.
    Correct for any token count: the group operator launches once only where its kernel applies
    and otherwise runs each member as ``cmpq::linear`` would."""
    import operator

    from cmpq.nn import ops  # noqa: F401 - registers torch.ops.cmpq.*

    graph = gm.graph
    by_input: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in graph.nodes:
        if _is_linear(n) and isinstance(n.args[0], torch.fx.Node):
            by_input.setdefault(n.args[0], []).append(n)
    groups = 0
    for x, nodes in by_input.items():
        order = {n: i for i, n in enumerate(graph.nodes)}  # again per input: each rewrite moves nodes
        members: list[torch.fx.Node] = []
        for n in nodes:  # graph order; a member computed from an earlier one's output cannot join
            if not _depends_on(n, members, order):
                members.append(n)
        if len(members) < 2:
            continue
        first = members[0]
        try:
            tensors, meta = ops.flatten_members([m.args[1:] for m in members])
        except TypeError:  # a width or row count that is not a plain int (a symbolic size)
            continue
        if not all(_hoist(t, first, order) for t in tensors if isinstance(t, torch.fx.Node)):
            continue
        with graph.inserting_before(first):
            grp = graph.call_function(torch.ops.cmpq.linear_group.default, (x, tensors, meta))
            outs = [graph.call_function(operator.getitem, (grp, i)) for i in range(len(members))]
        for m, y in zip(members, outs):
            m.replace_all_uses_with(y)
            graph.erase_node(m)
        groups += 1
    if groups:
        graph.lint()
        gm.recompile()
    return groups


def compile_backend(inner: str = "inductor") -> Callable:
    """A ``torch.compile`` backend: ``group_shared_inputs`` on the graph Dynamo captured, then
    ``inner``. ``torch.compile(step, backend=compile_backend())``."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        group_shared_inputs(gm)
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)

    return backend
