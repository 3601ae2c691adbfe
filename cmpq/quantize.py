"""``cmpq.quantize``: CMPQ on a whole Hugging Face causal LM, block by block."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from cmpq import __version__
from cmpq.algorithm.layer import quantize_weights
from cmpq.config import CMPQConfig
from cmpq.data.tokens import Windows, calibration_windows
from cmpq.model.calibration import SquaredNorm, walk_blocks
from cmpq.model.blocks import set_module
from cmpq.nn.linear import CMPQLinear, pack_linear


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_calibration(tokenizer, calib, cfg: CMPQConfig) -> Windows:
    """``calib`` may be a data set name, a file path, a ``Windows``, or a token tensor ``[n, seqlen]``."""
    if isinstance(calib, Windows):
        return calib
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2:
            raise ValueError(f"calibration tokens must be [nsamples, seqlen], got {tuple(calib.shape)}")
        return Windows(calib, f"user tokens {tuple(calib.shape)}")
    name = calib or "c4"
    if name in ("c4", "wikitext2", "offline"):
        return calibration_windows(tokenizer, name, cfg.nsamples, cfg.seqlen, cfg.seed)
    return calibration_windows(tokenizer, "file", cfg.nsamples, cfg.seqlen, cfg.seed, path=name)


@torch.no_grad()
def quantize(
    model: nn.Module,
    tokenizer=None,
    config: CMPQConfig | None = None,
    calib=None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
) -> nn.Module:
    """Quantize every linear of every decoder block with CMPQ, in place; returns the model.

    Embeddings, norms and ``lm_head`` are left as they are. The run's settings, calibration
    description and timings end up in ``model.config.quantization_config``.
    """
    cfg = config or CMPQConfig()
    device = torch.device(device) if device is not None else default_device()
    if tokenizer is None and not isinstance(calib, (Windows, torch.Tensor)):
        raise ValueError("pass a tokenizer, or calibration tokens as a tensor [nsamples, seqlen]")
    windows = resolve_calibration(tokenizer, calib, cfg)
    if log:
        log(f"calibration: {windows.description}")

    def quantize_block(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        names = list(linears)
        all_parts = quantize_weights([linears[n].weight.data for n in names], [stats[n].sqsum for n in names], cfg,
                                     [f"block {i} {n}" for n in names])
        for name, parts in zip(names, all_parts):
            lin = linears[name]
            q = pack_linear(parts, lin.bias.data if lin.bias is not None else None)
            q.cache_dense = True  # the rerun of this block reuses the dequantized weight
            set_module(block, name, q)

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = walk_blocks(
        model,
        windows.ids,
        lambda name, lin: SquaredNorm(lin.in_features, lin.weight.device),
        quantize_block,
        device=device,
        batch_size=cfg.calib_batch_size,
        log=log,
    )
    total = time.perf_counter() - start
    qc = {
        "quant_method": "cmpq",
        "format_version": 1,
        "cmpq_version": __version__,
        **{k: v for k, v in cfg.to_dict().items() if k not in ("extra", "calib_batch_size")},
        "calibration": windows.description,
        "quantize_seconds": round(total, 2),
        "time_split_seconds": {"catch": round(times.catch, 2), "forward": round(times.forward, 2),
                               "quantize_linears": round(times.quantize, 2)},
    }
    if device.type == "cuda":
        qc["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    model.config.quantization_config = qc
    model.cmpq_tokenizer = tokenizer  # so cmpq.save(model, dir) can write it
    if log:
        log(f"quantized {sum(isinstance(m, CMPQLinear) for m in model.modules())} linears in {total:.1f}s")
    return model
