"""The layer layout: which linears are ``CMPQLinear`` and the shape of each, as ``quantization_config["layers"]``.

It is everything needed to build the model skeleton before reading a tensor, so it lives in
``config.json``: a folder holding only the config and the safetensors file (as from the Hub) can be
loaded by ``cmpq.load`` and by ``transformers.AutoModelForCausalLM.from_pretrained``. Folders written
before it was there keep it only in ``cmpq_manifest.json``; ``cmpq.load`` still reads those.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmpq.nn.linear import CMPQLinear
from cmpq.storage.packing import SUPPORTED_BITS

# per layer: {"in_features", "out_features", "bias", "channels": {"<bits>": n}, "outlier_channels", "sparse_outliers"},
# and "row_scale" (format v4; absent = false, as in every v3 folder)
FIELDS = ("in_features", "out_features", "bias", "channels", "outlier_channels", "sparse_outliers")
OPTIONAL = {"row_scale": False}


class LayoutError(ValueError):
    """A layout that cannot describe a model (wrong types, unknown module names)."""


def layer_layout(layer: CMPQLinear) -> dict[str, Any]:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "channels": {str(b): n for b, n in layer.counts().items()},
        "outlier_channels": layer.outlier_channels.numel(),
        "sparse_outliers": layer.sparse_val.numel(),
        **({"row_scale": True} if layer.row_scale is not None else {}),
    }


def model_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Layout of every ``CMPQLinear`` in ``model``, by qualified name."""
    return {n: layer_layout(m) for n, m in model.named_modules() if isinstance(m, CMPQLinear)}


MAX_COUNT = 2**31 - 1  # ids and row pointers must fit int32 (the widest the format uses)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


def check_layout(layers: object, where: str) -> dict[str, dict[str, Any]]:
    """``layers`` as read from JSON (config.json's or the manifest's), checked field by field before
    any of it reaches a constructor, where a string or a huge count would fail (or allocate) with
    an error that names neither the file nor the layer. ``where`` names the file in errors."""
    if not isinstance(layers, dict) or not layers:
        raise LayoutError(f"{where}: 'layers' must map module names to layer shapes, got {type(layers).__name__}")
    widths = {str(b) for b in SUPPORTED_BITS}
    for name, info in layers.items():
        what = f"{where}: layer {name!r}"
        if not isinstance(info, dict) or set(FIELDS) - set(info):
            raise LayoutError(f"{what} must have the fields {', '.join(FIELDS)}")
        for k in ("in_features", "out_features", "outlier_channels", "sparse_outliers"):
            if not _count(info[k]):
                raise LayoutError(f"{what}: {k} must be an integer in [0, 2^31), got {info[k]!r}")
        if not info["in_features"] or not info["out_features"]:
            raise LayoutError(f"{what}: in_features and out_features must be positive")
        if not isinstance(info["bias"], bool):
            raise LayoutError(f"{what}: bias must be true or false, got {info['bias']!r}")
        if not isinstance(info.get("row_scale", False), bool):
            raise LayoutError(f"{what}: row_scale must be true or false, got {info['row_scale']!r}")
        ch = info["channels"]
        if not isinstance(ch, dict) or not all(k in widths and _count(v) for k, v in ch.items()):
            raise LayoutError(f"{what}: channels must map widths {min(SUPPORTED_BITS)}..{max(SUPPORTED_BITS)} to "
                              f"channel counts, got {ch!r}")
        if sum(ch.values()) + info["outlier_channels"] != info["in_features"]:
            raise LayoutError(f"{what}: channel counts {ch} plus {info['outlier_channels']} outlier channels "
                              f"are not in_features {info['in_features']}")
        if info["sparse_outliers"] > info["in_features"] * info["out_features"]:
            raise LayoutError(f"{what}: more sparse outliers ({info['sparse_outliers']}) than weights")
    return layers


def same_layout(a: dict, b: dict) -> bool:
    """Two layouts (or a layout and the manifest's richer per-layer summary) describe the same layers."""
    def fields(info: dict) -> dict:
        return {**{k: info[k] for k in FIELDS}, **{k: info.get(k, d) for k, d in OPTIONAL.items()}}

    return a.keys() == b.keys() and all(fields(a[n]) == fields(b[n]) for n in a)


def build_layer(info: dict[str, Any], device: torch.device | str = "meta") -> CMPQLinear:
    """An empty ``CMPQLinear`` of that shape (on the meta device by default: nothing is allocated
    until the tensors are read and checked)."""
    counts = {int(b): n for b, n in info["channels"].items()}
    return CMPQLinear(info["in_features"], info["out_features"], counts, info["outlier_channels"],
                      info["sparse_outliers"], info["bias"], device=device, row_scale=info.get("row_scale", False))


def expected_tensors(layers: dict[str, dict[str, Any]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the layout's layers store."""
    out = {}
    for name, info in layers.items():
        for k, t in build_layer(info).state_dict().items():
            out[f"{name}.{k}"] = (tuple(t.shape), t.dtype)
    return out


def install(model: nn.Module, layers: dict[str, dict[str, Any]], where: str) -> None:
    """Replace the linears named by ``layers`` with empty ``CMPQLinear`` on the meta device, after
    checking that the model's architecture has a linear of that shape and bias there (a layout from
    another model, or a config edited since, would otherwise load and fail, or compute garbage, at
    the first forward). Fused experts are first expanded to per-expert linears, as cmpq stores them
    (``cmpq.model.experts``). On the meta device a layout that lies about shapes costs nothing
    before the weights' header is checked against it."""
    from cmpq.model.blocks import set_module
    from cmpq.model.experts import expand_fused_experts

    expand_fused_experts(model)
    arch = f"the {type(model).__name__} of config.json"
    for name, info in layers.items():
        try:
            old = model.get_submodule(name) if name else None
        except AttributeError:
            old = None
        w = getattr(old, "weight", None)
        if old is None or isinstance(old, CMPQLinear) or not isinstance(w, torch.Tensor) or w.dim() != 2 \
                or next(old.children(), None) is not None:
            raise LayoutError(f"{where}: layer {name!r} is not a linear layer of {arch}; the folder was quantized "
                              f"from another architecture")
        shape = (info["out_features"], info["in_features"])
        has_bias = getattr(old, "bias", None) is not None
        if sorted(w.shape) != sorted(shape) or has_bias != info["bias"]:  # sorted: GPT-2's Conv1D is [in, out]
            raise LayoutError(f"{where}: layer {name!r} is {shape[0]}x{shape[1]} (bias {info['bias']}) in the "
                              f"layout but {tuple(w.shape)} (bias {has_bias}) in {arch}: they disagree")
        set_module(model, name, build_layer(info))
