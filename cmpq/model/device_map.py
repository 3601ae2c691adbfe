"""One model spread over several GPUs (or GPUs and the CPU) for evaluation, through accelerate.

``accelerate.infer_auto_device_map`` places whole decoder blocks (the block class is the
``no_split_module_classes``) within each device's ``max_memory``; ``accelerate.dispatch_model`` moves
them there and hooks every placed module so its inputs follow it to its device. ``CMPQLinear``
keeps its packed weights in buffers: accelerate counts buffers in the sizes and moves them with
their block, so a packed layer always sits whole on its block's device. With cmpq's fused CUDA
kernels, the current CUDA device must be the layer's (Triton and the CUDA kernel launch on the
current device), so each ``CMPQLinear`` gets a pre-hook that switches to its input's GPU.

    model = cmpq.load("out/m", device_map="auto")                          # all visible GPUs, balanced
    model = cmpq.load("out/m", device_map="auto", max_memory={0: "20GiB", 1: "20GiB"})
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from cmpq.model.blocks import find_blocks
from cmpq.model.memory import parse_bytes

STRATEGIES = ("auto", "balanced", "sequential")


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: bytes, 1: bytes, "cpu": bytes}`` (dicts pass through, sizes parsed)."""
    if text is None:
        return None
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, None) for part in str(text).split(",") if part.strip())
    out: dict = {}
    for key, size in items:
        if size is None:
            raise ValueError(f"cannot read max memory {text!r}; write e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        key = str(key).strip()
        dev: int | str = int(key) if key.isdigit() else key
        if isinstance(dev, str) and dev not in ("cpu", "disk") and not dev.startswith("cuda:"):
            raise ValueError(f"max memory: unknown device {key!r}; use GPU indices (0, 1, ...), cpu or disk")
        if isinstance(dev, str) and dev.startswith("cuda:"):
            dev = int(dev.split(":", 1)[1])
        out[dev] = size if isinstance(size, int) else parse_bytes(str(size))
    return out


def block_classes(model: nn.Module) -> list[str]:
    """Class names of the decoder blocks: accelerate never splits one of these across devices."""
    _, blocks = find_blocks(model)
    return sorted({type(b).__name__ for b in blocks})


def plan(model: nn.Module, device_map: str | dict = "auto", max_memory: str | dict | None = None) -> dict:
    """The device map: ``"auto"``/``"balanced"`` (even over the GPUs), ``"sequential"`` (fill GPU 0
    first), a dict ``{module name: device}``, or a JSON file / string holding such a dict."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in STRATEGIES:
        text = Path(device_map).read_text() if Path(device_map).is_file() else device_map
        try:
            dm = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--device-map: {device_map!r} is none of {', '.join(STRATEGIES)}, nor a JSON file or "
                             f"object mapping module names to devices") from None
        return {k: (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in dm.items()}
    mem = parse_max_memory(max_memory)
    no_split = block_classes(model)
    if device_map in ("auto", "balanced"):
        mem = get_balanced_memory(model, max_memory=mem, no_split_module_classes=no_split, low_zero=False)
    return dict(infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split))


def _set_cuda_device(module: nn.Module, args) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_cuda and x.device.index != torch.cuda.current_device():
        torch.cuda.set_device(x.device)


def dispatch(model: nn.Module, device_map: str | dict = "auto", max_memory: str | dict | None = None) -> nn.Module:
    """Place ``model`` (on the CPU) by ``device_map`` with accelerate and hook it; returns it (eval mode).

    Hooks are attached even when everything lands on one device, so one path is tested everywhere.
    Modules placed on ``"cpu"`` next to GPUs are offloaded (their weights, buffers too, move to the
    GPU for each forward). ``"disk"`` is refused.
    """
    from accelerate import dispatch_model

    from cmpq.nn.linear import CMPQLinear

    dm = plan(model, device_map, max_memory)
    devices = set(dm.values())
    if "disk" in devices:
        raise ValueError("the device map puts modules on disk; give more --max-memory (GPUs or cpu)")
    offload = "cpu" in devices and any(d != "cpu" for d in devices)
    dispatch_model(model, dm, force_hooks=True, offload_buffers=offload)
    if any(d != "cpu" for d in devices):
        for m in model.modules():
            if isinstance(m, CMPQLinear):
                m.register_forward_pre_hook(_set_cuda_device)
    return model.eval()


def describe(dm: dict) -> str:
    """``"0: model.embed_tokens, layers 0-15; 1: layers 16-31, model.norm, lm_head"``-style summary."""
    by_dev: OrderedDict = OrderedDict()
    for name, dev in dm.items():
        by_dev.setdefault(str(dev), []).append(name)
    parts = []
    for dev, names in by_dev.items():
        idx = [int(n.rsplit(".", 1)[1]) for n in names if n.rsplit(".", 1)[-1].isdigit()]
        rest = [n for n in names if not n.rsplit(".", 1)[-1].isdigit()]
        blocks = "" if not idx else f"block {idx[0]}" if len(idx) == 1 else f"blocks {min(idx)}-{max(idx)}"
        rest = ["whole model" if n == "" else n for n in rest]
        parts.append(f"{dev}: " + ", ".join(x for x in [*rest, blocks] if x))
    return "; ".join(parts)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids should go: its embedding's device (the main device once dispatched)."""
    hook = getattr(model, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if w is None or w.is_meta:
        w = next(model.parameters())
    return w.device
