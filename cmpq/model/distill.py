"""Codebook fine-tuning: the stored values learn from the full-precision model, the indices stay.

After quantization every weight of a ``CMPQLinear`` is one of: a codebook entry of its channel, an
FP16 outlier column entry, or a sparse FP16 outlier. Which one is fixed (the indices and positions),
what it holds is not: this pass trains those values (and the biases) so that the quantized model's
next-token distribution matches the full-precision model's on the calibration windows (KL
divergence, the distillation of PV-Tuning and QuIP#'s fine-tuning, here with indices frozen).
Storage and kernels see the same format; only numbers in it change.

Why it pays: compensation and k-means each fit one layer to its own inputs; neither can see what an
error does to the logits downstream. The values are few (a handful per channel) so the pass cannot
overfit the calibration text the way full fine-tuning could.

The teacher is the model itself before quantization: ``teacher_states`` stores its last hidden
state (the input of ``lm_head``, which cmpq leaves unquantized) for every window, so the teacher's
logits are one matmul away and no second model is held.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cmpq.kernels import gather_weight
from cmpq.model.blocks import set_module
from cmpq.nn.linear import CMPQLinear
from cmpq.progress import bar
from cmpq.storage import codebook
from cmpq.storage.packing import pack_channels


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError("codebook fine-tuning needs the model's output embeddings (lm_head)")
    return head


@contextlib.contextmanager
def recording_head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward of ``model`` appends its ``lm_head`` input (fp16, CPU) to the
    yielded list. The compensated algorithm wraps its sensitivity pass in it: that pass already
    runs the full-precision model over every calibration window, so the teacher states come free
    instead of from a second pass (``teacher_states``) with two more whole-model transfers."""
    got: list[torch.Tensor] = []
    hook = _head(model).register_forward_pre_hook(lambda m, args: got.append(args[0].detach().half().cpu()))
    try:
        yield got
    finally:
        hook.remove()


def _student_logits(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``head``'s own output for one window ``[seq, vocab]``: the logits before any post-processing
    the model applies after ``lm_head`` (Gemma-2's soft-capping, Granite's logit scaling, Cohere's
    logit scale). The teacher's logits are ``head(teacher_state)``, so the student's must be taken
    at the same point, or the pass would train towards a different distribution on those families."""
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: got.append(out))
    try:
        model(ids, use_cache=False)
    finally:
        hook.remove()
    return got[-1][0]


@torch.no_grad()
def teacher_states(model: nn.Module, ids: torch.Tensor, device: torch.device, progress: bool = False) -> torch.Tensor:
    """Last hidden state ``[n, seq, hidden]`` (fp16, CPU) of the full-precision model per window.
    ``progress``: a bar over the windows on a terminal (one forward each, the whole model on ``device``)."""
    place = _Placement(model, device)
    pbar = bar(ids.shape[0], "teacher (full precision)", "window", enabled=progress)
    try:
        with recording_head_inputs(model) as got:
            for row in ids:
                model(row[None].to(device), use_cache=False)
                pbar.update(1)
    finally:
        pbar.close()
        place.restore()
    return torch.cat(got)


class _Placement:
    """Moves the model to ``device`` for the pass and back after."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.home = next(model.parameters()).device
        model.to(device)

    def restore(self) -> None:
        self.model.to(self.home)


class _Weight(torch.autograd.Function):
    """``(values[where] * row_scale[:, None]).to(dtype)`` whose backward adds the gradient into
    ``values`` (``cmpq.kernels.gather_weight``: one fused pass each way on a GPU, the PyTorch form
    elsewhere).

    Why not plain indexing: autograd's backward of ``values[where]`` is ``index_put_(...,
    accumulate=True)``, which on CUDA sorts every index of the layer on every step. On a 7B-shaped
    model (H100, 2026-12-06) the first epoch of fine-tuning had not ended after 220 s: the sort of
    6.5e9 keys per step fits that time (an estimate from the key count, not a profile). ``where``
    never changes during the pass, so the sort buys nothing; the gradient is scattered with atomic
    adds. The sums are the same up to the order of float additions."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, where: torch.Tensor, row_scale: torch.Tensor | None,
                dtype: torch.dtype, books: tuple | None = None) -> torch.Tensor:
        ctx.save_for_backward(where, row_scale)
        ctx.n, ctx.books = values.numel(), books
        if gather_weight.fused_available(where):
            return gather_weight.gather_weight(values, where, row_scale, dtype)
        return gather_weight.gather_weight_reference(values, where, row_scale, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        where, row_scale = ctx.saved_tensors
        if gather_weight.fused_available(where):
            return gather_weight.scatter_grad(grad, where, row_scale, ctx.n, ctx.books), None, None, None, None
        return gather_weight.scatter_grad_reference(grad, where, row_scale, ctx.n), None, None, None, None


class TunableLinear(nn.Module):
    """A ``CMPQLinear`` opened up for training: every stored value in one vector, every weight a fixed
    index into it, so ``W = values[where]`` is one differentiable gather."""

    def __init__(self, layer: CMPQLinear) -> None:
        super().__init__()
        self.layer = layer
        dev = layer.outlier_weight.device
        out_f, in_f = layer.out_features, layer.in_features
        where = torch.empty(out_f, in_f, dtype=torch.long, device=dev)
        base = torch.full((in_f,), -1, dtype=torch.int32, device=dev)  # -1: no codebook (an FP16 column)
        size = torch.zeros(in_f, dtype=torch.int32, device=dev)
        chunks, offset = [], 0
        self.slices: dict[str, tuple[int, int]] = {}
        for b in layer.bit_widths:
            ch, _, cb = layer.group(b)
            n, k = cb.shape
            if n:
                idx = layer.group_indices(b)  # [out, n]
                start = offset + torch.arange(n, device=dev) * k  # each channel's codebook in ``values``
                where[:, ch.long()] = start[None] + idx
                base[ch.long()], size[ch.long()] = start.to(torch.int32), k
            chunks.append(cb.float().reshape(-1))
            self.slices[f"q{b}_codebook"] = (offset, offset + n * k)
            offset += n * k
        n_act = layer.outlier_channels.numel()
        if n_act:
            where[:, layer.outlier_channels.long()] = offset + torch.arange(out_f * n_act, device=dev).view(out_f, n_act)
        chunks.append(layer.outlier_weight.float().reshape(-1))
        self.slices["outlier_weight"] = (offset, offset + out_f * n_act)
        offset += out_f * n_act
        nnz = layer.sparse_val.numel()
        if nnz:
            rows = torch.repeat_interleave(torch.arange(out_f, device=dev),
                                           (layer.sparse_crow[1:] - layer.sparse_crow[:-1]).long())
            where[rows, layer.sparse_col.long()] = offset + torch.arange(nnz, device=dev)
        chunks.append(layer.sparse_val.float())
        self.slices["sparse_val"] = (offset, offset + nnz)
        # int32 halves the index's memory (a 7B model: 28 GB instead of 56 GB while tuning)
        self.register_buffer("where", where.to(torch.int32) if offset + nnz < 2**31 else where)
        # where each column's codebook sits: the fused scatter sums a tile's gradients per codebook slot
        # before adding them (cmpq.kernels.gather_weight.scatter_grad)
        self.register_buffer("book_base", base)
        self.register_buffer("book_size", size)
        self.largest_book = max([2**b for b, n in layer.counts().items() if n] or [0])
        self.values = nn.Parameter(torch.cat(chunks))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.float().clone())
        # format v4's per-row scales (W = diag(s) @ values[where]) stay fixed: one scale moves a whole
        # row, and trained with the values' relative step it made every epoch worse on held-out
        # windows (CPU, SmolLM2, 2026-12-05: held-out KL 0.212 -> 0.276 at 3.36 bits, 0.064 -> 0.209 at 4.3)
        self.register_buffer("row_scale", None if layer.row_scale is None else layer.row_scale.float())
        self.target: torch.Tensor | None = None  # ``values`` as stored, set by ``project`` for one forward

    def stored(self) -> torch.Tensor:
        """``values`` as the format will store them, with a straight-through gradient: codebooks on
        their 8-bit grids (``codebook.storable``), outlier columns and sparse values in FP16. The
        loss then measures the model that will be saved, not a finer one that rounding would undo.
        Uses the target ``project`` computed for this forward, if any (and clears it: the next
        optimizer step makes it stale)."""
        v = self.values
        target, self.target = self.target, None
        if target is None:
            project([self])
            target, self.target = self.target, None
        return v + (target - v).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Weight.apply(self.stored(), self.where, self.row_scale, x.dtype,
                          (self.book_base, self.book_size, self.largest_book))
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> CMPQLinear:
        """Store the trained values in the layer (FP16, codebooks re-sorted ascending with their
        indices remapped, as the format requires) and return it."""
        layer = self.layer
        v = self.stored().detach()
        for b in layer.bit_widths:
            lo, hi = self.slices[f"q{b}_codebook"]
            ch, _, cb = layer.group(b)
            if not ch.numel():
                continue
            new, order = v[lo:hi].view(cb.shape).sort(dim=1, stable=True)  # storable already
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
            idx = layer.group_indices(b)  # [out, n]
            idx = rank.gather(1, idx.T).T  # old slot -> new slot, per channel
            layer.set_codebook(b, new)
            setattr(layer, f"q{b}_packed", pack_channels(idx.contiguous(), b))
        lo, hi = self.slices["outlier_weight"]
        layer.outlier_weight = v[lo:hi].view_as(layer.outlier_weight).half()
        lo, hi = self.slices["sparse_val"]
        layer.sparse_val = v[lo:hi].half()
        if self.bias is not None:
            layer.bias = self.bias.detach().half()
        layer._dense_cache = None
        return layer


@torch.no_grad()
def project(layers: list[TunableLinear]) -> None:
    """Set each layer's ``target``: its values as stored (``TunableLinear.stored``). The codebooks of
    one width are rounded onto their 8-bit grids together, across all layers, in one
    ``codebook.storable`` call: rows are independent, so the result is the same as layer by layer,
    and a step costs a few kernels per width instead of a few per layer and width (on a GPU the
    per-layer form was launch-bound: ~240 ATen calls and ~5 host syncs per layer per step)."""
    by_width: dict[int, list[tuple[int, int, int]]] = {}
    targets = []
    for n, t in enumerate(layers):
        targets.append(t.values.detach().half().float())
        for key, (lo, hi) in t.slices.items():
            if key.endswith("_codebook") and hi > lo:
                by_width.setdefault(1 << int(key[1:key.index("_")]), []).append((n, lo, hi))
    for k, parts in by_width.items():
        # no NaN check here (a host sync per width and step on a GPU): ``finetune`` checks its loss,
        # and what is written back is checked again when it is packed
        rounded = codebook.storable(torch.cat([layers[n].values.detach()[lo:hi].view(-1, k) for n, lo, hi in parts]),
                                    check=False)
        for (n, lo, hi), r in zip(parts, rounded.split([(hi - lo) // k for _, lo, hi in parts])):
            targets[n][lo:hi] = r.reshape(-1)
    for t, target in zip(layers, targets):
        t.target = target


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) per token, averaged (or summed) over tokens, in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.sum() if reduction == "sum" else kl.mean()


def finetune(
    model: nn.Module,
    ids: torch.Tensor,
    teacher: torch.Tensor,
    device: torch.device,
    epochs: int = 2,
    lr: float = 1e-3,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict:
    """Train every ``CMPQLinear``'s stored values (indices fixed) to match ``teacher`` (from
    ``teacher_states``) on the windows ``ids``; Adam, one window per step, linear decay to zero;
    ``lr`` is relative to each layer's value scale.

    The step: 1e-3 of the layer's RMS value. On SmolLM2-135M at 3.36 bits (CPU, 64 x 512 C4 tokens,
    ``studies/finetune_sweep.py``) 5e-3 overshot (held-out KL 0.212 -> 0.250, nothing kept), 1e-3 gave
    0.180 and WikiText-2 34.01 -> 31.27, 2e-4 gave 0.185 and 32.19. A step that still overshoots on
    another model is caught: an epoch that raises the held-out KL is undone and the step divided by
    ``BACKOFF`` for the next one.

    Keeps the best epoch, never a worse model: an eighth of the windows (all of them below eight
    windows, which cannot spare one) is held out, its KL to the teacher measured before training and after every
    epoch, and the values of the epoch with the lowest held-out KL are the ones written back (the
    quantized model as it came, if no epoch beat it). Why: one learning rate does not suit every
    budget. At 2.5 bits the pass removes a third of the perplexity; at 4.3 bits, where little error
    is left to correct, the same steps overshoot (CPU study, SmolLM2-135M, 64 x 512 tokens: training
    KL rose from 0.223 to 0.280 over two epochs and WikiText-2 went 27.79 -> 29.94).
    ``progress``: a bar over all steps (epochs x windows) with the running KL, on a terminal only
    (None: when ``log`` is set); the pass is as long as a few block walks, so it gets an ETA too.
    Returns the first and last epoch's mean training KL, the held-out KL before training and after
    each epoch, and the epoch kept (0: none)."""
    if teacher.shape[:2] != ids.shape:
        raise ValueError(f"teacher states {tuple(teacher.shape)} do not match the windows {tuple(ids.shape)}")
    head = _head(model)
    if not any(isinstance(m, CMPQLinear) for m in model.modules()):
        raise ValueError("no CMPQLinear layers to fine-tune; quantize the model first")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    # the model moves first and the layers open up on the device: ``TunableLinear`` unpacks every
    # index, which on a 7B model took ~60 s on the host (H100 machine, 2026-12-07: 78 s from the
    # end of the block walk to the first quarter-epoch line, of which ~12 s were training) and is a
    # few kernels per layer on a GPU
    swapped: list[tuple[nn.Module, str, TunableLinear]] = []
    home = next(model.parameters()).device
    try:
        place = _Placement(model, device)
        for name, m in list(model.named_modules()):
            if isinstance(m, CMPQLinear):
                t = TunableLinear(m)
                set_module(model, name, t)
                swapped.append((model, name, t))
    except torch.OutOfMemoryError:
        for root, name, t in swapped:
            set_module(root, name, t.layer)
        model.to(home)  # also after a move that stopped half-way
        for p in frozen:
            p.requires_grad_(True)
        raise RuntimeError("codebook fine-tuning needs the whole model on the device (about 6 bytes per "
                           "quantized weight while it runs) and it does not fit; quantize with "
                           "finetune_epochs=0 (--finetune-epochs 0) or on a device with more memory") from None
    # Adam's step is absolute; layers differ in scale, so each layer's step is ``lr`` times the
    # root-mean-square of its own stored values
    groups = [{"params": list(t.parameters()), "lr": lr * float(t.values.detach().pow(2).mean().sqrt().clamp(min=1e-8))}
              for _, _, t in swapped]
    opt = torch.optim.Adam(groups, fused=True if torch.device(device).type == "cuda" else None)  # one launch a step on a GPU
    train, held = held_out_split(ids.shape[0])
    steps = epochs * train.numel()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    history = []
    params = [p for _, _, t in swapped for p in t.parameters()]
    tunables = [t for _, _, t in swapped]
    held_kl = [_mean_kl(model, ids, teacher, head, device, held, tunables)]
    best, kept, backoffs = [p.detach().clone() for p in params], 0, 0
    pbar = bar(steps, "fine-tune", "step", enabled=log is not None if progress is None else progress)
    try:
        with torch.enable_grad():
            for epoch in range(epochs):
                # the epoch's summed per-token KL stays on the device: reading it every step (and
                # checking it is finite) was a host sync a step, which kept the GPU idle while the
                # next step's first kernels were queued (7B on an H100: 0.33 s a step of wall time
                # against 0.28 s of GPU time). It is read where it is shown: at each quarter-epoch
                # line, at the epoch's end, and every step only while a progress bar shows it.
                running = torch.zeros((), dtype=torch.float32, device=device)
                order = train[torch.randperm(train.numel(), generator=torch.Generator().manual_seed(epoch))]
                for step, i in enumerate(order.tolist(), 1):
                    project(tunables)
                    logits = _student_logits(model, head, ids[i][None].to(device))
                    with torch.no_grad():
                        target = head(teacher[i].to(device=device, dtype=head.weight.dtype))
                    # summed over tokens for the backward pass: a per-token mean makes the gradients
                    # of a half-precision model underflow; Adam does not see the scale
                    loss = _kl(logits, target, "sum")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    running += loss.detach() / logits.shape[0]
                    quarter = log and step < train.numel() and step % max(1, train.numel() // 4) == 0
                    if not pbar.disable or quarter or step == train.numel():
                        total = _finite_total(running, epoch)
                        pbar.set_postfix(epoch=f"{epoch + 1}/{epochs}", kl=f"{total / step:.4f}", refresh=False)
                    pbar.update(1)
                    # a quarter-epoch line: on a 7B model an epoch is minutes, and a run cut off by a
                    # time limit should still show its pace (H100, 2026-12-06: none was logged in 220 s)
                    if quarter:
                        log(f"fine-tune epoch {epoch + 1}/{epochs}: {step}/{train.numel()} windows, "
                            f"mean KL so far {total / step:.4f}")
                history.append(total / train.numel())
                held_kl.append(_mean_kl(model, ids, teacher, head, device, held, tunables))
                if held_kl[-1] < min(held_kl[:-1]):
                    best, kept = [p.detach().clone() for p in params], epoch + 1
                elif epoch + 1 < epochs:  # overshot: back to the best values, a quarter of the step
                    with torch.no_grad():
                        for p, b in zip(params, best):
                            p.copy_(b)
                    opt.state.clear()
                    sched.base_lrs = [v / BACKOFF for v in sched.base_lrs]
                    backoffs += 1
                    if log:
                        log(f"fine-tune epoch {epoch + 1}: held-out KL rose; back to epoch {kept}'s values, "
                            f"step / {BACKOFF:g}")
                if log:
                    log(f"fine-tune epoch {epoch + 1}/{epochs}: KL to full precision {history[-1]:.4f} "
                        f"(held out: {held_kl[-1]:.4f}, before fine-tuning {held_kl[0]:.4f})")
    finally:
        pbar.close()
        with torch.no_grad():  # the best epoch's values (also after an error mid-epoch)
            for p, b in zip(params, best):
                p.copy_(b)
        for root, name, t in swapped:
            t.target = None  # a layer no forward used may hold a stale one
            set_module(root, name, t.write_back())
        place.restore()
        for p in frozen:
            p.requires_grad_(True)
    if log and kept < epochs:
        log(f"fine-tune: kept epoch {kept} of {epochs} (lowest held-out KL; 0 = the model before fine-tuning)")
    return {"kl_first_epoch": history[0] if history else None, "kl_last_epoch": history[-1] if history else None,
            "held_out_kl": [round(k, 6) for k in held_kl], "held_out_windows": held.numel(), "kept_epoch": kept,
            "lr_backoffs": backoffs}


BACKOFF = 4.0  # step divisor after an epoch that raised the held-out KL


def _finite_total(running: torch.Tensor, epoch: int) -> float:
    """The epoch's summed KL so far, read from the device, or the divergence error: a step whose loss
    was not finite has made the values NaN or Inf since, and the caller restores the best epoch's."""
    total = running.item()
    if not math.isfinite(total):
        raise FloatingPointError(f"codebook fine-tuning diverged (summed KL {total}) in epoch {epoch + 1}")
    return total


def held_out_split(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) window indices: an eighth held out, drawn with ``seed``; below eight
    windows there is nothing to spare, so every window is both."""
    if n < 8:
        every = torch.arange(n)
        return every, every
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = n // 8
    return perm[k:].sort().values, perm[:k].sort().values


@torch.no_grad()
def _mean_kl(model: nn.Module, ids: torch.Tensor, teacher: torch.Tensor, head: nn.Module, device: torch.device,
             which: torch.Tensor, tunables: list[TunableLinear]) -> float:
    """KL to the teacher per token over windows ``which``."""
    total, tokens = 0.0, 0
    for i in which.tolist():
        project(tunables)
        logits = _student_logits(model, head, ids[i][None].to(device))
        target = head(teacher[i].to(device=device, dtype=head.weight.dtype))
        total += _kl(logits, target, "sum").item()
        tokens += logits.shape[0]
    return total / max(tokens, 1)
