"""``torch.ops.cmpq.linear``: a ``CMPQLinear`` call as a real PyTorch operator.

Why an operator: the kernels launch through ctypes and pick a kernel per call, which
``torch.compile`` cannot trace and ``torch.export`` cannot serialise. As a custom op whose
arguments are the layer's own tensors (its stored buffers and its runtime layout) plus plain ints,
a layer is one graph node with a known output shape. A decoder step compiles as one graph (the
model's norms, rotary and residuals fuse around our kernels), and an exported program holds
everything it needs: no registry of layers, no handle, nothing looked up at run time.

- Default implementation (CPU, and any device or dtype without a kernel): the reference,
  ``F.linear(x, dequantize(...), bias)``, in the dtype of ``x``.
- CUDA: ``cmpq.kernels.dispatch.run`` on the runtime layout (the measured table picks the
  kernel); the reference where none applies or the layer has no runtime layout.
- ``register_fake``: ``[..., out_features]`` in the dtype of ``x``.
- Autograd: the gradient of ``x`` is ``grad_out @ W_hat`` (``W_hat`` dequantized by the reference,
  in the gradient's dtype), so adapters trained on top of a frozen cmpq model (LoRA and the like)
  work. The stored tensors are buffers and get no gradient; training them is
  ``cmpq.model.distill``'s job, through its own module.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from cmpq.storage import codebook
from cmpq.storage.packing import unpack_channels


def dequantize(channels: list[torch.Tensor], packed: list[torch.Tensor], codes: list[torch.Tensor],
               bounds: list[torch.Tensor], outlier_channels: torch.Tensor, outlier_weight: torch.Tensor,
               sparse_crow: torch.Tensor, sparse_col: torch.Tensor, sparse_val: torch.Tensor,
               row_scale: torch.Tensor | None, bits: list[int], in_features: int, out_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The dense ``W_hat`` ``[out, in]`` the stored tensors stand for (docs/format.md), in ``dtype``.

    Plain PyTorch and free of data-dependent shapes, so it also runs under fake tensors (the
    backward of ``cmpq::linear`` is traced by ``torch.compile``)."""
    dev = outlier_weight.device
    w = torch.empty(out_features, in_features, dtype=dtype, device=dev)
    for b, ch, pk, cd, bd in zip(bits, channels, packed, codes, bounds):
        n = ch.numel()
        if n == 0:
            continue
        cb = codebook.decode(cd, bd)  # fp16 [n, 2**b]
        idx = unpack_channels(pk, b, out_features)  # [out, n]
        flat = idx + (torch.arange(n, device=dev) * (2**b)).unsqueeze(0)
        w[:, ch.long()] = cb.reshape(-1)[flat].to(dtype)
    if outlier_channels.numel():
        w[:, outlier_channels.long()] = outlier_weight.to(dtype)
    if sparse_col.numel():
        rows = torch.repeat_interleave(torch.arange(out_features, device=dev),
                                       (sparse_crow[1:] - sparse_crow[:-1]).long(), output_size=sparse_col.numel())
        w[rows, sparse_col.long()] = sparse_val.to(dtype)
    if row_scale is not None:  # format v4: W = diag(row_scale) @ (the rest)
        w = (w.float() * row_scale.float()[:, None]).to(dtype)
    return w


def _reference(x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
               sparse_val, row_scale, bias, bits, out_features):
    w = dequantize(channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
                   sparse_val, row_scale, bits, x.shape[-1], out_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("cmpq::linear", mutates_args=())
def linear(x: torch.Tensor, channels: list[torch.Tensor], packed: list[torch.Tensor], codes: list[torch.Tensor],
           bounds: list[torch.Tensor], outlier_channels: torch.Tensor, outlier_weight: torch.Tensor,
           sparse_crow: torch.Tensor, sparse_col: torch.Tensor, sparse_val: torch.Tensor,
           row_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], runtime: list[torch.Tensor],
           bits: list[int], out_features: int) -> torch.Tensor:
    """``x @ W_hat^T + bias`` of a CMPQ layer. ``channels``/``packed``/``codes``/``bounds``: one entry
    per bit width in ``bits`` (the ``q{b}_*`` buffers); ``row_scale``: the per-row scales or None;
    ``runtime``: the layer's runtime layout in ``cmpq.kernels.layout.names`` order, or empty. The
    reference implementation (any device)."""
    return _reference(x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
                      sparse_val, row_scale, bias, bits, out_features)


def _runtime(x, channels, sparse_val, runtime, bits, out_features):
    """The layer's ``Runtime`` view of its flat runtime tensors, or None (none built, or it does not fit)."""
    from cmpq.kernels.layout import Runtime

    if not runtime:
        return None
    return Runtime.from_tensors(runtime, bits, [c.numel() for c in channels], out_features, x.shape[-1], sparse_val)


@linear.register_kernel("cuda")
def _linear_cuda(x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
                 sparse_val, row_scale, bias, runtime, bits, out_features):
    from cmpq.kernels import dispatch

    y = None
    rt = _runtime(x, channels, sparse_val, runtime, bits, out_features)
    if rt is not None:
        y = dispatch.run(x, rt)
        if y is not None and row_scale is not None:  # the layout's bias is bias / row_scale (layout.build)
            y = y * row_scale.to(y.dtype)
    if y is None:
        y = _reference(x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
                       sparse_val, row_scale, bias, bits, out_features)
    return y


@linear.register_fake
def _linear_fake(x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col,
                 sparse_val, row_scale, bias, runtime, bits, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    (x, channels, packed, codes, bounds, outlier_channels, outlier_weight, sparse_crow, sparse_col, sparse_val,
     row_scale, _bias, runtime, bits, out_features) = inputs
    ctx.bits, ctx.groups, ctx.in_features, ctx.out_features = list(bits), len(channels), x.shape[-1], out_features
    ctx.n_runtime = len(runtime)
    ctx.save_for_backward(*channels, *packed, *codes, *bounds, outlier_channels, outlier_weight, sparse_crow,
                          sparse_col, sparse_val, row_scale)


def _backward(ctx, grad: torch.Tensor):
    g, saved = ctx.groups, ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = dequantize(list(saved[:g]), list(saved[g:2 * g]), list(saved[2 * g:3 * g]), list(saved[3 * g:4 * g]),
                       *saved[4 * g:], ctx.bits, ctx.in_features, ctx.out_features, grad.dtype)
        grad_x = grad @ w
    none = [None] * g  # one per tensor of a list input: autograd wants the inputs' structure back
    return (grad_x, none, none, none, none) + (None,) * 7 + ([None] * ctx.n_runtime, None, None)


linear.register_autograd(_backward, setup_context=_setup_context)


# -- several layers that read one input: cmpq::linear_group ------------------------------------
# Why a second operator: one token through a small layer is latency, not bytes (a launch, a split-K
# reduction), so q/k/v or gate/up in one launch beats three (cmpq/nn/fuse.py measured 6 us saved per
# launch removed). Eager calls fuse through Python state between calls; a compiled graph cannot, so
# cmpq.nn.fuse's graph pass rewrites the ``cmpq::linear`` nodes that share an input into this one.
# Its arguments are the members' ``cmpq::linear`` arguments, flattened: ``tensors`` holds, per member,
# channels, packed, codes, bounds (``g`` each), the outlier columns and weights, the sparse crow, col
# and val, the row scales, the bias, then the runtime layout (``r``); ``meta`` holds, per member,
# ``g, r, out_features`` then the ``g`` bit widths.

def flatten_members(members: Sequence[tuple]) -> tuple[list, list[int]]:
    """(tensors, meta) of ``linear_group`` from each member's ``cmpq::linear`` arguments after ``x``."""
    tensors, meta = [], []
    for (channels, packed, codes, bounds, och, owt, crow, scol, sval, row_scale, bias, runtime, bits,
         out_features) in members:
        g = len(channels)
        tensors += [*channels, *packed, *codes, *bounds, och, owt, crow, scol, sval, row_scale, bias, *runtime]
        meta += [g, len(runtime), int(out_features), *[int(b) for b in bits]]
    return tensors, meta


def split_members(tensors: Sequence, meta: Sequence[int]) -> list[tuple]:
    """The inverse of ``flatten_members``: each member's ``cmpq::linear`` arguments after ``x``."""
    members, t, m = [], 0, 0
    while m < len(meta):
        g, r, out_features = meta[m : m + 3]
        bits = list(meta[m + 3 : m + 3 + g])
        m += 3 + g
        lists = [list(tensors[t + i * g : t + (i + 1) * g]) for i in range(4)]
        t += 4 * g
        och, owt, crow, scol, sval, row_scale, bias = tensors[t : t + 7]
        t += 7
        runtime = list(tensors[t : t + r])
        t += r
        members.append((*lists, och, owt, crow, scol, sval, row_scale, bias, runtime, bits, out_features))
    if t != len(tensors):
        raise ValueError(f"linear_group: {len(tensors)} tensors for a layout of {t}")
    return members


def group_kernel(x: torch.Tensor, runtimes: list, row_scales: list) -> list[torch.Tensor] | None:
    """Every member's output from one launch per ``kernel_v4.MAX_GROUP`` members (CUDA, fp16/bf16,
    one token, each member's runtime layout given and the dispatch table picking v4s for it), scaled
    by its row scales where given; None where that does not apply (the caller runs them one by one)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or x.numel() != x.shape[-1]:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    from cmpq.kernels import choose, kernel_v4

    if any(rt is None or choose(1, rt.out * rt.n_in) != "v4s" for rt in runtimes):
        return None
    outs: list[torch.Tensor] = []
    for i in range(0, len(runtimes), kernel_v4.MAX_GROUP):
        part = kernel_v4.decode_group(runtimes[i : i + kernel_v4.MAX_GROUP], x)
        if part is None:
            return None
        outs += part
    # each layout's bias is bias / row_scale (layout.build): scale as cmpq::linear does
    return [y if s is None else y * s.to(y.dtype) for y, s in zip(outs, row_scales)]


@torch.library.custom_op("cmpq::linear_group", mutates_args=())
def linear_group(x: torch.Tensor, tensors: list[Optional[torch.Tensor]], meta: list[int]) -> list[torch.Tensor]:
    """``[cmpq::linear(x, *member) for member in split_members(tensors, meta)]``: layers that read
    the same ``x``. The reference implementation (any device)."""
    return [_reference(x, *m[:11], m[12], m[13]) for m in split_members(tensors, meta)]


@linear_group.register_kernel("cuda")
def _linear_group_cuda(x, tensors, meta):
    members = split_members(tensors, meta)
    rts = [_runtime(x, m[0], m[8], m[11], m[12], m[13]) for m in members]
    outs = group_kernel(x, rts, [m[9] for m in members])
    if outs is None:
        outs = [_linear_cuda(x, *m) for m in members]
    return outs


@linear_group.register_fake
def _linear_group_fake(x, tensors, meta):
    return [x.new_empty((*x.shape[:-1], m[13])) for m in split_members(tensors, meta)]
