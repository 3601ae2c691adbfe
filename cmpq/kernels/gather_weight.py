"""Fine-tuning's weight gather, ``W = (values[where] * row_scale[:, None]).to(dtype)``, in one pass
each way.

Codebook fine-tuning (``cmpq.model.distill``) rebuilds every quantized layer's dense weight from its
few trainable values on every step, and scatters the weight's gradient back onto them. In PyTorch
that is a chain of whole-weight passes: the gather writes float32, the row scale reads and writes it
again, the cast reads it once more; the backward casts the gradient to float32, scales it, and
``index_add_`` reads both. About 44 bytes of memory traffic per weight per step, against 12 here:
the forward reads the int32 index and writes the weight in the input's dtype, the backward reads the
gradient and the index and adds atomically into the float32 value vector. On a 7B model a step
touches 6.5e9 weights, so the difference is ~0.2 TB of traffic a step (byte counts). Measured on a
7B-shaped model (H100, 2026-12-07, ``docs/results.md``): 0.44 -> 0.30 s per fine-tuning window.

Same arithmetic as the PyTorch form: the product is taken in float32 and rounded once to ``dtype``;
the gradient is scaled in float32. Only the order of the float additions in the backward differs.

``gather_weight`` / ``scatter_grad`` need Triton (the tests run them on CPU tensors under
``TRITON_INTERPRET=1``); ``gather_weight_reference`` / ``scatter_grad_reference`` are the PyTorch
forms, the CPU path and the tests' oracle.
"""

from __future__ import annotations

import torch

BLOCK = 1024  # weights per program (gather)
ROWS, COLS = 128, 64  # the scatter's tile: one atomic add per column and codebook slot for 128 rows
SLOTS = 16  # the largest codebook the scatter sums per slot (4 bits)


def gather_weight_reference(values: torch.Tensor, where: torch.Tensor, row_scale: torch.Tensor | None,
                            dtype: torch.dtype) -> torch.Tensor:
    """``(values[where] * row_scale[:, None]).to(dtype)``; ``values`` float32 ``[n]``, ``where`` ``[out, in]``."""
    w = values[where.long()]
    return (w if row_scale is None else w * row_scale[:, None]).to(dtype)


def scatter_grad_reference(grad: torch.Tensor, where: torch.Tensor, row_scale: torch.Tensor | None, n: int) -> torch.Tensor:
    """The gradient of ``gather_weight`` for ``values``: float32 ``[n]``, ``out[where[r, c]] +=
    grad[r, c] * row_scale[r]``."""
    g = grad.float()
    if row_scale is not None:
        g = g * row_scale[:, None]
    out = torch.zeros(n, dtype=torch.float32, device=grad.device)
    return out.index_add_(0, where.reshape(-1).long(), g.reshape(-1))


def gather_weight(values: torch.Tensor, where: torch.Tensor, row_scale: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """``gather_weight_reference`` in one Triton launch (``where`` int32, contiguous)."""
    import triton

    out_f, in_f = where.shape
    w = torch.empty(out_f, in_f, dtype=dtype, device=where.device)
    total = out_f * in_f
    if total == 0:
        return w
    scale = row_scale if row_scale is not None else values  # a valid pointer; unread when HAS_SCALE is off
    _kernels["gather"][(triton.cdiv(total, BLOCK),)](
        values, where, scale, w, total, in_f, HAS_SCALE=row_scale is not None, BLOCK=BLOCK, num_warps=4)
    return w


def scatter_grad(grad: torch.Tensor, where: torch.Tensor, row_scale: torch.Tensor | None, n: int,
                 books: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """``scatter_grad_reference`` in one Triton launch (atomic float32 adds).

    ``books`` (``base``, ``size``, ``largest``; int32 ``[in]`` twice and an int): column ``c``'s weights
    index a codebook at ``values[base[c] : base[c] + size[c]]`` (``base`` -1: a column without one, e.g.
    FP16 outliers); ``largest`` is ``size.max()``, given so that no call waits for the device.
    Why: a 7B step adds 6.5e9 gradients, most of them into ~7 million codebook entries, and one atomic
    add per weight made the scatter a quarter of the step (66 of 278 ms, H100 profile 2026-12-07,
    docs/results.md). With ``books``, each program first sums its tile's gradients per column and
    codebook slot and adds those: a tile of ``ROWS`` rows makes one add per slot and column instead of
    one per weight. Weights whose index lies outside their column's codebook (sparse outliers), columns
    without one, and codebooks of more than ``SLOTS`` entries (5..8-bit widths) are added one by one."""
    import triton

    out = torch.zeros(n, dtype=torch.float32, device=grad.device)
    out_f, in_f = where.shape
    if out_f * in_f == 0:
        return out
    grad = grad.contiguous()
    scale = row_scale if row_scale is not None else out
    if books is None:
        base = torch.full((in_f,), -1, dtype=torch.int32, device=grad.device)
        size = torch.zeros(in_f, dtype=torch.int32, device=grad.device)
        slots = 1
    else:
        base, size, largest = books
        slots = triton.next_power_of_2(max(1, min(largest, SLOTS)))
    grid = (triton.cdiv(out_f, ROWS), triton.cdiv(in_f, COLS))
    _kernels["scatter"][grid](grad, where, scale, base, size, out, out_f, in_f, HAS_SCALE=row_scale is not None,
                              KMAX=slots, BR=ROWS, BC=COLS, num_warps=8)
    return out


def _build(name: str):
    import triton
    import triton.language as tl

    @triton.jit
    def gather(V_ptr, W_ptr, S_ptr, O_ptr, total, in_f, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        idx = tl.load(W_ptr + offs, mask=mask, other=0)
        v = tl.load(V_ptr + idx, mask=mask, other=0.0)
        if HAS_SCALE:
            v = v * tl.load(S_ptr + offs // in_f, mask=mask, other=1.0)
        tl.store(O_ptr + offs, v.to(O_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def scatter(G_ptr, W_ptr, S_ptr, B_ptr, K_ptr, O_ptr, out_f, in_f, HAS_SCALE: tl.constexpr,
                KMAX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        rm, cm = r < out_f, c < in_f
        m = rm[:, None] & cm[None, :]
        offs = r[:, None].to(tl.int64) * in_f + c[None, :]
        idx = tl.load(W_ptr + offs, mask=m, other=0)
        g = tl.load(G_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(S_ptr + r, mask=rm, other=1.0)[:, None]
        base = tl.load(B_ptr + c, mask=cm, other=-1)
        size = tl.load(K_ptr + c, mask=cm, other=0)
        rel = idx - base[None, :]
        book = m & (base[None, :] >= 0) & (size[None, :] <= KMAX) & (rel >= 0) & (rel < size[None, :])
        for k in tl.static_range(KMAX):  # the tile's sum per column and slot, one add each
            s = tl.sum(tl.where(book & (rel == k), g, 0.0), axis=0)
            tl.atomic_add(O_ptr + base + k, s, mask=cm & (base >= 0) & (size <= KMAX) & (k < size), sem="relaxed")
        tl.atomic_add(O_ptr + idx, g, mask=m & ~book, sem="relaxed")  # the rest one by one

    return {"gather": gather, "scatter": scatter}[name]


class _Kernels(dict):
    """Builds each kernel at first use, so importing this module needs no Triton."""

    def __missing__(self, name: str):
        self[name] = _build(name)
        return self[name]


_kernels = _Kernels()


def fused_available(where: torch.Tensor) -> bool:
    """Whether ``gather_weight``/``scatter_grad`` serve this index: on CUDA with Triton, int32
    indices (a layer whose values exceed 2^31 keeps int64 and the PyTorch form)."""
    from cmpq.kernels.dispatch import triton_available

    return where.is_cuda and where.dtype == torch.int32 and where.is_contiguous() and triton_available()
