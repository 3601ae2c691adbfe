"""Size of a CMPQ model before quantizing it: effective bits and bytes from shapes and settings alone.

How many channels get each width, how many columns stay FP16 and how many sparse outliers are
kept depend only on a layer's shape and the ``CMPQConfig`` (Algorithm 1 ranks channels, so the
counts do not depend on the activation values). So the exact storage of every quantized linear
can be counted without calibration or k-means, on the meta device, by the same ``CMPQLinear`` that
a real run fills. This answers "which budget fits my device" in a second.

The compensated algorithm's allocator (``distortion``) meets the budget itself: its ``bits`` are
the effective bits of the quantized linears, every stored byte counted, so the estimate is the
budget (to within one channel) and the per-width split is known only after calibration.
"""

from __future__ import annotations

import torch
from torch import nn

from cmpq.algorithm.allocation import get_allocator
from cmpq.config import CMPQConfig
from cmpq.model.blocks import find_blocks, find_linears
from cmpq.nn.linear import CMPQLinear
from cmpq.storage.io import bits_summary, layer_summary


def layer_counts(out_f: int, in_f: int, cfg: CMPQConfig) -> tuple[dict[int, int], int, int]:
    """(channels per bit width, FP16 outlier channels, sparse outliers) of an ``out_f x in_f`` layer,
    exactly as ``cmpq.algorithm.layer`` chooses them."""
    n_act = min(int(round(cfg.act_outlier_frac * in_f)), in_f - 1)
    norms = torch.arange(in_f - n_act, dtype=torch.float32)  # any distinct values: only ranks matter
    bits = get_allocator(cfg.allocator)(norms, cfg.bits, edge_frac=cfg.edge_frac)
    counts = {b: int((bits == b).sum()) for b in (2, 3, 4)}
    return counts, n_act, int(round(cfg.weight_outlier_frac * out_f * in_f))


def empty_layer(out_f: int, in_f: int, cfg: CMPQConfig, bias: bool = False) -> CMPQLinear:
    """A ``CMPQLinear`` on the meta device with the tensors a real run would store."""
    counts, n_act, n_sparse = layer_counts(out_f, in_f, cfg)
    return CMPQLinear(in_f, out_f, counts, n_act, n_sparse, bias, device="meta", row_scale=cfg.row_scale)


def estimate(model: nn.Module, cfg: CMPQConfig) -> dict:
    """``bits_summary`` of ``model`` (any device, meta included) as CMPQ with ``cfg`` would store it,
    plus the bytes of everything left in 16 bits (embeddings, norms, ``lm_head``)."""
    from cmpq.model.experts import expand_fused_experts

    expand_fused_experts(model)  # experts count as the linears cmpq makes of them
    prefix, blocks = find_blocks(model)
    layers, quantized = [], set()
    numel = 0
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            quantized.add(f"{prefix}.{i}.{name}.weight")
            numel += lin.out_features * lin.in_features
            if cfg.allocator != "distortion":
                layers.append(layer_summary(empty_layer(lin.out_features, lin.in_features, cfg, lin.bias is not None)))
    if cfg.allocator == "distortion":
        nbytes = int(cfg.bits * numel / 8)
        summary = {"nominal_bits": None, "effective_bits": 8 * nbytes / max(numel, 1), "quantized_weights": numel,
                   "quantized_bytes": nbytes, "fp16_bytes": 2 * numel}
    else:
        summary = bits_summary(layers)
    seen: set[int] = set()
    other = 0
    for name, p in model.named_parameters():
        if name not in quantized and id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            other += p.numel() * 2
    summary.update(other_fp16_bytes=other, total_bytes=summary["quantized_bytes"] + other)
    return summary
