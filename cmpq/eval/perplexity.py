"""Perplexity by the GPTQ protocol: non-overlapping windows, exp of the mean token NLL."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cmpq.progress import bar


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    log: Callable[[str], None] | None = print,
    label: str = "",
) -> float:
    """exp(mean NLL) over all windows ``[n, seqlen]``; each window predicts its tokens 1..seqlen-1.

    Every window has the same number of predicted tokens, so this equals GPTQ's
    ``exp(sum(window_mean_nll * seqlen) / (n * seqlen))``.
    """
    from cmpq.model.device_map import input_device

    device = input_device(model)  # the first block's device also when spread over several (device_map)
    nll_sum, count = 0.0, 0
    n = windows.shape[0]
    t0 = time.perf_counter()
    pbar = bar(n, label or "perplexity", "window", enabled=log is not None)
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError(f"{label}: non-finite loss in window {i}; the model produces NaN/Inf")
        nll_sum += nll.item()
        count += ids[:, 1:].numel()
        done = min(i + batch_size, n)
        pbar.update(done - i)
        if log and (done == n or done % max(1, n // 8) < batch_size):
            log(f"  {label} {done}/{n} windows, ppl so far {math.exp(nll_sum / count):.3f} ({time.perf_counter() - t0:.0f}s)")
    pbar.close()
    return math.exp(nll_sum / count)
