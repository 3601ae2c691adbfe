"""Prefill overlap: the next layer's weight is dequantized on a side stream during this layer's GEMM.

Prefill (more than 16 tokens) dequantizes a layer into a scratch FP16 weight and hands it to
cuBLAS (``dequant.prefill``). Serially that caps a layer at ~0.89x FP16 on 4096x11008 and 0.74x on
4096x4096 at 2,048 tokens (H100, 2026-12-07, benchmarks/notes-kernels.md): the dequantization is
~32 us beside a 91-us GEMM. The two want different things (the GEMM tensor cores, the dequantizer
memory and a few registers), so they can share the SMs: while layer i multiplies, layer i+1's weight
is built on a second stream. In a decoder the call order of the linears is fixed, which is what
makes "the next layer" known in advance.

``link(runtimes)`` gives the call order (``cmpq.nn.overlap.overlapped`` links a model's layers in
module order). Then each prefill call ``take``s its weight if the previous call prepared it, and
``issue_next`` prepares the following layer's. One weight waits at most: a call that finds another
layer's weight prepared (the order broke) drops it and dequantizes its own, so a wrong order costs
time, never a wrong result. Nothing happens while a CUDA graph is being captured (a wait on an event
recorded outside the capture is illegal in it) or where no layers are linked.

Off the GPU (the tests) the same bookkeeping runs without streams: the weight is built at issue time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cmpq.kernels.layout import Runtime

Dequantize = Callable[[Runtime, torch.dtype], torch.Tensor]


@dataclass
class _Ready:
    key: tuple
    weight: torch.Tensor
    event: "torch.cuda.Event | None"


_next: dict[tuple, Runtime] = {}  # a layer's key -> the layer called after it
_ready: _Ready | None = None  # the one prepared weight
_streams: dict[torch.device, "torch.cuda.Stream"] = {}
stats = {"taken": 0, "issued": 0, "dropped": 0}  # counters (tests, benchmarks)


def link(runtimes: Sequence[Runtime]) -> None:
    """Declare the call order: each layer's successor is the next one in ``runtimes``."""
    for a, b in zip(runtimes, runtimes[1:]):
        _next[(a.key)] = b


def clear() -> None:
    """Forget every link and the prepared weight."""
    global _ready
    _next.clear()
    _ready = None


def active() -> bool:
    return bool(_next)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _key(rt: Runtime, dtype: torch.dtype) -> tuple:
    return (rt.key, dtype)


def take(rt: Runtime, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of ``rt`` prepared by the previous call (the current stream waits for it), or None."""
    global _ready
    r = _ready
    if r is None or _capturing(rt.device):
        return None
    _ready = None
    if r.key != _key(rt, dtype):
        stats["dropped"] += 1
        return None
    if r.event is not None:
        stream = torch.cuda.current_stream(rt.device)
        stream.wait_event(r.event)
        r.weight.record_stream(stream)  # made on the side stream, read on this one
    stats["taken"] += 1
    return r.weight


def issue_next(rt: Runtime, dtype: torch.dtype, dequantize: Dequantize) -> None:
    """Start preparing the weight of the layer called after ``rt``, on a side stream that first
    waits for the current one: it then runs beside what the current stream does next (this layer's
    GEMM)."""
    global _ready
    nxt = _next.get(rt.key)
    if nxt is None or _capturing(rt.device):
        return
    if _ready is not None:  # never taken: the order broke somewhere
        stats["dropped"] += 1
        _ready = None
    dev = nxt.device
    if dev.type != "cuda":
        _ready = _Ready(_key(nxt, dtype), dequantize(nxt, dtype), None)
    else:
        side = _streams.get(dev)
        if side is None:
            side = _streams[dev] = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            w = dequantize(nxt, dtype)
            event = torch.cuda.Event()
            event.record(side)
        _ready = _Ready(_key(nxt, dtype), w, event)
    stats["issued"] += 1
