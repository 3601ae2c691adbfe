"""GPTQ-style block walk: run calibration data through the model one decoder block at a time.

Only the current block sits on the accelerator. Its linears are hooked to collect statistics of
their inputs, the caller quantizes them, and the block runs again so the next block sees the
quantized block's outputs. Every quantizer in cmpq (CMPQ and the baselines) uses this one walk.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from cmpq.model.blocks import find_blocks, find_linears, move_except
from cmpq.progress import bar

if TYPE_CHECKING:
    from cmpq.model.distributed import Dist

CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class InputStats(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class SquaredNorm:
    """Per-input-channel sum of squares of a linear's inputs (float32): ``a_i^2 = ||X[:, i]||^2``.

    ``parts`` (a list, set by the walk when several processes share the calibration) also keeps
    each call's sum, so the processes can add them up in the global batch order.
    """

    def __init__(self, in_features: int, device) -> None:
        self.sqsum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.parts: list[torch.Tensor] | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.pow(2).sum(dim=0)
        self.sqsum += s
        self.tokens += x.shape[0]
        if self.parts is not None:
            self.parts.append(s)


class WeightedHessian:
    """``H = sum_t w_t x_t x_t^T`` over a linear's calibration inputs (float32), ``w_t`` the token's
    weight in calibration order (``cmpq.model.sensitivity``; None: every token 1). Inputs arrive in
    the order of the windows, so a running offset finds each token's weight."""

    def __init__(self, in_features: int, device, token_weight: torch.Tensor | None = None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.token_weight = None
        if token_weight is not None:  # relative weights: the scale of H does not matter to GPTQ
            self.token_weight = (token_weight / token_weight.mean().clamp(min=1e-30)).float()
        self.tokens = 0
        self.start = 0  # token_weight index of the first token seen (a process's share starts later)
        self.half = True  # half-precision products (``add_half_gram``) until one is turned down

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        w = None
        if self.token_weight is not None:
            at = self.start + self.tokens
            if at + n > self.token_weight.numel():
                raise ValueError("more calibration tokens reached a linear than the sensitivity pass saw")
            w = self.token_weight[at : at + n].to(x.device, non_blocking=True)
        if not (self.half and add_half_gram(self.sum, x, w)):
            if self.half and half_gram_applies(self.sum, x):
                self.half = False
                warnings.warn("this torch has no half-precision product with a float32 output (torch.mm's "
                              "out_dtype); the Hessians are summed in TF32, about twice as slow")
            x = x.float()
            xw = x if w is None else x * w[:, None]
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True  # ~1e-3 per product; GPTQ dampens H by 1% anyway
            try:
                self.sum.addmm_(xw.T, x)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        self.tokens += n

    @property
    def H(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration inputs reached this linear")
        return self.sum / self.tokens


def half_gram_applies(total: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``add_half_gram`` has a product for these operands (a False from it then means this
    torch turned the product down)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and total.dtype == torch.float32


def add_half_gram(total: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None = None) -> bool:
    """``total += (w * x)^T x`` (``w``: one weight per row of ``x``, None: all 1) as one
    half-precision GEMM with a float32 output: tensor cores at twice TF32's rate. For the walk's
    Hessians, ~9 s of a 7B-shaped run in TF32 by FLOP count.

    Same precision as the TF32 form it replaces. ``x`` is already half precision, so only ``w * x``
    is rounded, to the 10-bit mantissa TF32 would round it to as well. For bf16 models ``w * x``
    gets 7 bits, and their ``x`` is exact.

    ``w * x`` is first scaled by a power of two, computed on the device with no sync, so that its
    largest entry sits at most at 2^14. A token weight thousands of times the mean cannot overflow
    float16 that way, and the scale comes off the product exactly.

    Returns False, and changes nothing, where it does not apply: not CUDA, not a half-precision
    ``x``, or a torch without ``torch.mm``'s ``out_dtype``. The caller then takes its float32 form."""
    if not half_gram_applies(total, x):
        return False
    try:
        if w is None:
            part = torch.mm(x.T, x, out_dtype=torch.float32)
        else:
            # the floor keeps ``w * scale`` finite when ``x`` is (nearly) all zeros
            peak = (torch.linalg.vector_norm(x, float("inf"), dim=1).float() * w).amax().clamp(min=2.0**-40)
            scale = torch.exp2(torch.floor(torch.log2(16384.0 / peak)))
            xw = torch.empty_like(x)
            torch.mul(x, (w * scale)[:, None], out=xw)  # computed in float32, rounded once on the write
            part = torch.mm(xw.T, x, out_dtype=torch.float32).div_(scale)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    total.add_(part)
    return True


@dataclass
class WalkTimes:
    """Seconds spent in each phase, for reports."""

    catch: float = 0.0
    forward: float = 0.0
    quantize: float = 0.0
    blocks: int = 0
    extra: dict = field(default_factory=dict)


class _Caught(Exception):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def catch_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, device, batch_size: int):
    """Hidden states entering block 0 and the keyword arguments it gets, one entry per batch."""
    first = blocks[0]
    caught: list[tuple[torch.Tensor, dict]] = []

    class Catcher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = first
            for attr in ("attention_type", "layer_idx"):  # some models read these off the block
                if hasattr(first, attr):
                    setattr(self, attr, getattr(first, attr))

        def forward(self, *args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kw = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            if "use_cache" in kw:
                kw["use_cache"] = False
            caught.append((hidden, kw))
            raise _Caught

    blocks[0] = Catcher()
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        blocks[0] = first
    return caught


def _block_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Checkpoint(Protocol):
    """Where ``walk_blocks`` saves finished blocks and resumes from (``cmpq.storage.checkpoint.BlockCheckpoint``)."""

    blocks_done: int

    def restore(self, i: int, block: nn.Module) -> None: ...
    def load_hidden(self) -> list[torch.Tensor]: ...
    def save(self, i: int, block: nn.Module, hidden: list[torch.Tensor]) -> None: ...


def _host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU copy of ``t``, pinned when the walk runs on CUDA so batches move asynchronously."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=device.type == "cuda")
    return out.copy_(t)


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    ids: torch.Tensor,
    make_stats: Callable[[str, nn.Linear], InputStats],
    quantize_block: Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, InputStats]], None],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    log: Callable[[str], None] | None = print,
    offload_activations: bool = False,
    checkpoint: Checkpoint | None = None,
    dist: "Dist | None" = None,
    progress: bool | None = None,
) -> WalkTimes:
    """Walk all decoder blocks: hook, run, quantize (``quantize_block``), rerun for the next block.

    The model may live on the CPU; each block is moved to ``device`` for its turn and back after.
    ``offload_activations`` keeps the hidden states on the CPU and moves one batch at a time, so
    the device holds a block and a batch instead of a block and all of calibration. Each block's
    outputs overwrite its inputs in place, so the hidden states are never held twice.
    With ``checkpoint``, finished blocks and the hidden states after them are saved after each
    block, and a walk whose checkpoint has ``blocks_done > 0`` restores those and goes on from there.

    ``dist`` (``cmpq.model.distributed.Dist``): this process is one of several walking together
    (see that module). Each takes a contiguous range of the calibration batches; statistics are
    combined across processes; ``quantize_block`` gets only the linears this process owns, and the
    finished layers are then shared, so every process holds the same quantized block. Only rank 0
    writes the checkpoint (the hidden states are gathered to it).

    ``progress``: a bar over the blocks on a terminal (None: when ``log`` is set).
    """
    device = torch.device(device)
    times = WalkTimes()
    _, blocks = find_blocks(model)
    n_batches = -(-ids.shape[0] // batch_size)
    lo, hi = 0, n_batches
    if dist is not None:
        from cmpq.model import distributed

        if n_batches < dist.world_size:
            raise ValueError(f"{n_batches} calibration batch(es) for {dist.world_size} processes: lower the "
                             f"calibration batch size or start fewer processes")
        lo, hi = dist.bounds(n_batches)
        ids = ids[lo * batch_size : hi * batch_size]
    home = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    start = checkpoint.blocks_done if checkpoint is not None else 0
    try:
        t0 = time.perf_counter()
        move_except(model, blocks, device)
        caught = catch_block_inputs(model, blocks, ids, device, batch_size)
        move_except(model, blocks, home)
        if start:  # the catch step only rebuilt the keyword arguments; the hidden states come from disk
            hidden = checkpoint.load_hidden() if dist is None else distributed.load_hidden_shard(checkpoint, lo, hi)
            if [h.shape for h in hidden] != [h.shape for h, _ in caught]:
                raise ValueError("checkpointed hidden states do not match the calibration batches")
            caught = [(h, kw) for h, (_, kw) in zip(hidden, caught)]
            for i in range(start):
                checkpoint.restore(i, blocks[i])
            if log:
                log(f"resumed after block {start}/{len(blocks)}")
        caught = [(_host(h, device) if offload_activations else h.to(device), kw) for h, kw in caught]
        times.catch = time.perf_counter() - t0
        pbar = bar(len(blocks), "blocks", "block", enabled=log is not None if progress is None else progress)
        pbar.update(start)
        for i in range(start, len(blocks)):
            block = blocks[i]
            block.to(device)
            linears = find_linears(block)
            stats = {name: make_stats(name, lin) for name, lin in linears.items()}
            if dist is not None:
                for s in stats.values():
                    if isinstance(s, SquaredNorm):
                        s.parts = []
                    elif isinstance(s, WeightedHessian):  # this process's tokens start after the others'
                        s.start = lo * batch_size * ids.shape[1]
            hooks = [
                lin.register_forward_pre_hook(lambda m, args, s=stats[name]: s.add(args[0]))
                for name, lin in linears.items()
            ]
            t0 = time.perf_counter()
            try:
                for hidden, kw in caught:
                    block(hidden.to(device, non_blocking=True), **kw)
            finally:
                for h in hooks:
                    h.remove()
            if dist is None:
                _sync(device)
                t1 = time.perf_counter()
                quantize_block(i, block, linears, stats)
            else:
                distributed.reduce_stats(stats, dist)
                _sync(device)
                t1 = time.perf_counter()
                owners = distributed.assign({n: lin.weight.numel() for n, lin in linears.items()}, dist.world_size)
                mine = [n for n in linears if owners[n] == dist.rank]
                if mine:
                    quantize_block(i, block, {n: linears[n] for n in mine}, {n: stats[n] for n in mine})
                distributed.sync_modules(block, owners, dist, device)
            del linears, stats  # replaced layers' dense weights can go before the rerun
            _sync(device)
            t2 = time.perf_counter()
            for hidden, kw in caught:
                hidden.copy_(_block_out(block(hidden.to(device, non_blocking=True), **kw)), non_blocking=True)
            for m in block.modules():  # drop dense weights cached for the rerun
                if hasattr(m, "release_cache"):
                    m.release_cache()
            _sync(device)
            times.forward += (t1 - t0) + (time.perf_counter() - t2)
            times.quantize += t2 - t1
            times.blocks += 1
            block.to(home)
            if checkpoint is not None:
                t3 = time.perf_counter()
                hidden = [h for h, _ in caught]
                if dist is not None:
                    hidden = distributed.gather_batches(hidden, dist)
                if dist is None or dist.main:
                    checkpoint.save(i, block, hidden)
                del hidden
                times.extra["checkpoint"] = times.extra.get("checkpoint", 0.0) + time.perf_counter() - t3
            pbar.update(1)
            if log:
                log(f"block {i + 1}/{len(blocks)} done ({time.perf_counter() - t0:.1f}s)")
        pbar.close()
    finally:
        model.config.use_cache = use_cache
    return times
