"""Find a causal LM's decoder blocks and the linear layers inside them, whatever the family."""

from __future__ import annotations

from torch import nn

# Attribute paths of the decoder block list, most common first.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, SmolLM, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers around a text decoder
    "transformer.blocks",  # MPT
)


class UnsupportedModel(ValueError):
    """The model's decoder blocks could not be found."""


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, block list) of the model's decoder blocks."""
    for path in BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise UnsupportedModel(
        f"cannot find the decoder blocks of {type(model).__name__} "
        f"(model_type={getattr(getattr(model, 'config', None), 'model_type', '?')}); "
        f"looked for {', '.join(BLOCK_PATHS)}"
    )


def _as_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; turn it into an equivalent ``nn.Linear``."""
    w = conv.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.data = w.data.T.contiguous()
    if conv.bias is not None:
        lin.bias.data = conv.bias.data
    return lin


def is_router(block: nn.Module, name: str) -> bool:
    """A mixture-of-experts router (``gate``/``router`` beside an ``experts`` module): it stays in full
    precision, as in every quantizer of the field; it is tiny and picks which weights run at all."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in ("gate", "router", "shared_expert_gate"):
        return False
    owner = block.get_submodule(parent) if parent else block
    return hasattr(owner, "experts")


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in ``block`` by qualified name, routers excepted (GPT-2 ``Conv1D``s are
    converted in place)."""
    for name, mod in list(block.named_modules()):
        if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
            set_module(block, name, _as_linear(mod))
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not is_router(block, n) and not getattr(m, "cmpq_skip", False)}


def mark_skipped(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Mark the block linears whose qualified names match a pattern (``fnmatch``, e.g.
    ``"*.mlp.down_proj"`` or ``"model.layers.0.*"``) to stay dense; returns their names."""
    import fnmatch

    if not patterns:
        return []
    prefix, blocks = find_blocks(model)
    hit = []
    for i, block in enumerate(blocks):
        for n, m in block.named_modules():
            full = f"{prefix}.{i}.{n}"
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(full, p) for p in patterns):
                m.cmpq_skip = True
                hit.append(full)
    return hit


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def move_except(model: nn.Module, skip: nn.Module, device) -> None:
    """Move every parameter and buffer of ``model`` outside ``skip`` to ``device``."""
    for child in model.children():
        if child is skip:
            continue
        if any(m is skip for m in child.modules()):
            move_except(child, skip, device)
        else:
            child.to(device)
    for k, p in model._parameters.items():
        if p is not None:
            model._parameters[k] = nn.Parameter(p.data.to(device), p.requires_grad)
    for k, b in model._buffers.items():
        if b is not None:
            model._buffers[k] = b.to(device)


def coverage(model: nn.Module) -> tuple[float, list[str]]:
    """(fraction of the decoder blocks' matrix weights held by CMPQ layers, names of the parameters
    with two or more dimensions inside the blocks left as they were; routers are left on purpose and
    not counted; linears skipped on purpose count as unquantized but are not named). A matrix cmpq
    does not know how to quantize (an unknown expert layout, say) shows up here, so nothing stays
    in full precision without a word."""
    from cmpq.nn.linear import CMPQLinear

    prefix, blocks = find_blocks(model)
    done = left = 0
    names: list[str] = []
    for i, block in enumerate(blocks):
        inside_q = set()
        for name, mod in block.named_modules():
            if isinstance(mod, CMPQLinear):
                done += mod.in_features * mod.out_features
                inside_q.add(name)
        for name, p in block.named_parameters():
            owner = name.rpartition(".")[0]
            skipped = getattr(block.get_submodule(owner) if owner else block, "cmpq_skip", False)
            if p.dim() >= 2 and owner not in inside_q and not is_router(block, owner):
                left += p.numel()
                if not skipped:  # left dense on purpose (skip_modules): counted, not reported
                    names.append(f"{prefix}.{i}.{name}")
    total = done + left
    return (done / total if total else 1.0), names
