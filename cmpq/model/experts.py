"""Mixture-of-experts weights as linears, so every part of cmpq sees each expert's matrices.

transformers 5 stores the experts of Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE and others as two fused 3-D
parameters: ``gate_up_proj [experts, 2 * inter, hidden]`` and ``down_proj [experts, hidden, inter]``,
applied by a loop over the experts that the router picked. ``ExpertLinears`` holds the same weights
as one ``nn.Linear`` pair per expert (``<experts>.<e>.gate_up_proj`` and ``.down_proj``) and runs the
same loop. Then calibration hooks see exactly the tokens routed to each expert (per-expert
statistics for free), each expert matrix is quantized as a matrix in its own right, and storage,
``cmpq info`` and ``cmpq estimate`` count it like any linear. The router stays as it was.

Covered: any module with 3-D ``gate_up_proj``/``down_proj`` parameters in that orientation, no
biases, and an ``act_fn`` (the transformers 5 layout of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3-style experts). Other layouts (e.g. gpt-oss: transposed, with biases) are left alone
and reported by ``cmpq.model.blocks.coverage``.
"""

from __future__ import annotations

import torch
from torch import nn

from cmpq.model.blocks import set_module


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, device, dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)


class ExpertLinears(nn.Module):
    """Drop-in for a fused experts module: same ``forward(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn: nn.Module, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter
        self.act_fn = act_fn
        for e in range(num_experts):
            self.add_module(str(e), _Expert(hidden, inter, device, dtype))

    def expert(self, e: int) -> _Expert:
        return getattr(self, str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[top_k_index < self.num_experts]).tolist()
        for e in hit:
            token_idx, top_k_pos = torch.where(top_k_index == e)
            ex = self.expert(e)
            gate, up = ex.gate_up_proj(hidden_states[token_idx]).chunk(2, dim=-1)
            h = ex.down_proj(self.act_fn(gate) * up)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def _fused_layout(mod: nn.Module) -> tuple[int, int, int] | None:
    """(experts, hidden, inter) if ``mod`` holds fused experts in the covered layout."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gu, nn.Parameter) or not isinstance(down, nn.Parameter) or gu.dim() != 3 or down.dim() != 3:
        return None
    e, two_i, h = gu.shape
    if two_i % 2 or down.shape != (e, h, two_i // 2) or not hasattr(mod, "act_fn"):
        return None
    if any(n.endswith("bias") for n, _ in mod.named_parameters(recurse=False)):
        return None
    return e, h, two_i // 2


@torch.no_grad()
def expand_fused_experts(model: nn.Module) -> int:
    """Replace every fused experts module by ``ExpertLinears`` holding the same weights (meta
    tensors stay meta). Returns how many were replaced; idempotent."""
    n = 0
    for name, mod in list(model.named_modules()):
        layout = _fused_layout(mod)
        if layout is None:
            continue
        e, h, i = layout
        gu, down = mod.gate_up_proj, mod.down_proj
        new = ExpertLinears(e, h, i, mod.act_fn, device=gu.device, dtype=gu.dtype)
        if gu.device.type != "meta":
            for k in range(e):
                new.expert(k).gate_up_proj.weight.copy_(gu[k])
                new.expert(k).down_proj.weight.copy_(down[k])
        set_module(model, name, new)
        n += 1
    return n


def sibling_key(name: str) -> str | None:
    """``mlp.experts.3.down_proj`` -> ``mlp.experts.*.down_proj`` (None for a non-expert linear)."""
    parts = name.split(".")
    for j in range(len(parts) - 2, 0, -1):
        if parts[j].isdigit() and parts[j - 1] == "experts":
            return ".".join(parts[:j] + ["*"] + parts[j + 1 :])
    return None


def fill_unrouted(stats: dict, attr: str, log=None, block: int | None = None) -> None:
    """Experts that no calibration token reached get the mean statistic (``attr``: the tensor that
    holds it) of the same linear in the experts that were reached, with a line in the log. The
    mean over sibling experts is the norms of the tokens entering this MoE layer, as the field's
    fallback does; the default's loss weighting then treats the expert like an average one."""
    groups: dict[str, list[str]] = {}
    for n in stats:
        k = sibling_key(n)
        if k is not None:
            groups.setdefault(k, []).append(n)
    for k, names in groups.items():
        empty = [n for n in names if stats[n].tokens == 0]
        full = [n for n in names if stats[n].tokens > 0]
        if not empty:
            continue
        if not full:
            raise RuntimeError(f"block {block}: no calibration token reached any expert of {k}; "
                               f"use more calibration data")
        mean = torch.stack([getattr(stats[n], attr) / stats[n].tokens for n in full]).mean(0)
        for n in empty:
            setattr(stats[n], attr, mean.clone())
            stats[n].tokens = 1
        if log:
            log(f"block {block}: {len(empty)} of {len(names)} experts ({k}) got no calibration tokens; "
                f"they use the mean statistics of the others")
