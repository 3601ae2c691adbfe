"""Baseline quantizers (RTN, GPTQ, AWQ, LLM-MQ) as pure weight-level functions returning fake-quantized weights."""

from .awq import awq_quantize, awq_quantize_layers, awq_search_clip, awq_search_scale
from .gptq import HessianAccumulator, gptq_quantize
from .llmmq import allocate_layer_bits, first_order_sensitivity, proxy_sensitivity
from .rtn import fake_quant, group_params, minmax_params, quantize_groupwise, rtn_bits_per_weight, rtn_quantize

__all__ = [
    "rtn_quantize",
    "rtn_bits_per_weight",
    "quantize_groupwise",
    "group_params",
    "minmax_params",
    "fake_quant",
    "gptq_quantize",
    "HessianAccumulator",
    "awq_search_scale",
    "awq_search_clip",
    "awq_quantize",
    "awq_quantize_layers",
    "allocate_layer_bits",
    "first_order_sensitivity",
    "proxy_sensitivity",
]
