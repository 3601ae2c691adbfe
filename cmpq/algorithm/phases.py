"""Seconds spent in each phase of linear quantization (allocation, k-means, outlier search, packing),
summed over a run, for ``quantization_config["time_split_seconds"]`` and the scale benchmark.

On CUDA each phase starts and ends with a synchronize, so GPU work is counted in the phase that
queued it; that is a handful of syncs per decoder block, negligible next to its seconds of k-means.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

_SECONDS: dict[str, float] = defaultdict(float)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def phase(name: str, device: torch.device) -> Iterator[None]:
    _sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        _SECONDS[name] += time.perf_counter() - t0


def add(name: str, seconds: float) -> None:
    _SECONDS[name] += seconds


def reset() -> None:
    _SECONDS.clear()


def totals() -> dict[str, float]:
    return dict(_SECONDS)
