"""cmpq as a transformers quantization method: ``from_pretrained``, ``save_pretrained``, ``dequantize``.

Registered under ``quant_method: "cmpq"`` by ``import cmpq`` (:func:`register`), through the
out-of-tree hooks ``register_quantization_config`` and ``register_quantizer``. Then

    import cmpq
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=torch.float16)

builds the model, swaps the linears named in ``quantization_config["layers"]`` for empty
``CMPQLinear`` on the meta device (:mod:`cmpq.storage.layout`), and lets transformers' own loader
fill their buffers from the safetensors file. A cmpq file is the model's state dict as it is, so no
weight conversion applies; packed buffers keep their stored dtypes, the rest takes ``dtype``.

The checks ``cmpq.load`` makes are made here too: the file header against the layout before any
tensor is read (missing, unexpected, wrong shape or dtype), the packed data after (channel
partition, CSR pointers, NaN/Inf), and, when the folder holds the ``cmpq_manifest.json`` that
``cmpq.save`` writes, every tensor of the files against its SHA-256 (``io.verify_files``; a
``save_pretrained`` folder or a hub repo of config and weights has no manifest, so no checksums).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from cmpq.nn.linear import CMPQLinear, prepare_runtime
from cmpq.storage.io import (
    FORMAT_VERSION,
    CorruptModelError,
    _check_layer,
    check_format_version,
    tensors_to_save,
    verify_files,
)
from cmpq.storage.layout import LayoutError, check_layout, expected_tensors, install, model_layout, same_layout

METHOD = "cmpq"
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.int16: "I16",
              torch.uint8: "U8"}


class CMPQHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a cmpq folder, every field kept as read, so ``save_pretrained``
    writes back what ``from_pretrained`` found (``CMPQConfig`` settings, calibration, timings, layout)."""

    def __init__(self, **fields: Any) -> None:
        fields.pop("quant_method", None)
        self.quant_method = METHOD
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, **{k: v for k, v in super().to_dict().items() if k != "quant_method"}}


class CMPQHfQuantizer(HfQuantizer):
    """Loads pre-quantized cmpq folders; quantizing on the fly is ``cmpq.quantize``'s job (it needs
    calibration data), so a ``CMPQHfConfig`` passed for a plain model is refused."""

    requires_calibration = True
    quantization_config: CMPQHfConfig
    _checkpoint_files: list[str] | None = None  # this load's weight files, for the checksum pass

    def validate_environment(self, device_map=None, **kwargs) -> None:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise ImportError(f"loading a cmpq folder with from_pretrained needs transformers >= 5 (this is "
                              f"{transformers.__version__}); use cmpq.load(folder)")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("cmpq layers cannot be offloaded to disk; map them to a GPU or the CPU")

    def _layers(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """The layout, named relative to ``model`` (a base model such as ``AutoModel`` gets the
        names without the ``model.`` prefix the causal LM's checkpoint has)."""
        qc = self.quantization_config
        check_format_version("config.json: quantization_config", getattr(qc, "format_version", None))
        layers = getattr(qc, "layers", None)
        if layers is None:
            raise CorruptModelError("config.json: quantization_config has no 'layers': the folder was written by an "
                                    "older cmpq, which kept them in cmpq_manifest.json only. Load it with "
                                    "cmpq.load(folder), or save it again with cmpq.save to make it loadable here")
        layers = check_layout(layers, "config.json: quantization_config")
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and not hasattr(model, prefix):
            layers = {n.removeprefix(prefix + "."): info for n, info in layers.items()}
        return layers

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        layers = self._layers(model)
        try:
            install(model, layers, "config.json: quantization_config")
        except LayoutError as e:
            raise CorruptModelError(str(e)) from None
        if checkpoint_files:
            check_header(checkpoint_files, self.quantization_config.layers)
            self._checkpoint_files = list(checkpoint_files)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, layer in model.named_modules():
            if isinstance(layer, CMPQLinear):
                tensors = {f"{name}.{k}": v for k, v in layer.state_dict().items()}
                _check_layer(name, tensors, {"in_features": layer.in_features, "out_features": layer.out_features,
                                             "channels": {str(b): n for b, n in layer.counts().items()}})
        if self._checkpoint_files:  # after the structural checks, which name the part that is wrong
            verify_files(self._checkpoint_files)
        prepare_runtime(model, dtype=getattr(model, "dtype", None))  # the kernels' layout of every layer on a GPU, now
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """None: the file holds the model's state dict as cmpq built it (experts already per-expert
        linears), never the original checkpoint layout those conversions translate."""
        return []

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # pre-quantized only: a tensor of the wrong shape is a mismatch, reported as such

    def get_state_dict_and_metadata(self, model):
        """What ``cmpq.save`` writes: 32-bit floats back in the storage dtype, tied tensors once."""
        recorded = self.quantization_config.layers
        if not same_layout(recorded, model_layout(model)):
            raise ValueError("the model's CMPQ layers no longer match quantization_config.layers; save it with "
                             "cmpq.save, which records the layers it finds")
        tensors, _ = tensors_to_save(model)
        return tensors, {"cmpq_format_version": str(FORMAT_VERSION)}

    def _dequantize(self, model, dtype=None):
        """Every ``CMPQLinear`` becomes the ``nn.Linear`` holding the weight it stands for."""
        from cmpq.model.blocks import set_module

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        for name, layer in list(model.named_modules()):
            if not isinstance(layer, CMPQLinear):
                continue
            dt = dtype or torch.float32
            dev = layer.outlier_weight.device
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(layer.dequantize(dt))
                if layer.bias is not None:
                    lin.bias.copy_(layer.bias.to(dt))
            set_module(model, name, lin)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # each layer is one operator, torch.ops.cmpq.linear, under torch.compile (cmpq/nn/ops.py)


def check_header(files: list[str], layers: dict) -> None:
    """Names, shapes and dtypes of the CMPQ tensors in the checkpoint headers, before anything is
    read: a lying layout or a damaged file is refused here, not met as random memory later."""
    from safetensors import safe_open

    expected = expected_tensors(layers)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                found[k] = (tuple(sl.get_shape()), sl.get_dtype())
    prefixes = tuple(f"{n}." for n in layers)
    for k in found:
        if k.startswith(prefixes) and k not in expected:
            raise CorruptModelError(f"{files[0]}: unexpected tensor {k}")
    for k, (shape, dtype) in expected.items():
        if k not in found:
            raise CorruptModelError(f"{files[0]}: missing tensor {k}")
        if found[k][0] != shape:
            raise CorruptModelError(f"{files[0]}: tensor {k} has shape {found[k][0]}, expected {shape} "
                                    f"(the layout and the weights disagree)")
        if found[k][1] != _ST_DTYPES[dtype]:
            raise CorruptModelError(f"{files[0]}: tensor {k} has dtype {found[k][1]}, expected {_ST_DTYPES[dtype]}")


def register() -> None:
    """Make ``quant_method: "cmpq"`` known to transformers; idempotent."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not CMPQHfConfig:
        register_quantization_config(METHOD)(CMPQHfConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not CMPQHfQuantizer:
        register_quantizer(METHOD)(CMPQHfQuantizer)
