"""How much each token and each input channel of each linear matters to the model's loss.

One pass of the full-precision model over the calibration windows, forward and backward, with the
language-model loss (summed over tokens). For every linear of every decoder block it records:

* ``token_weight[t] = ||dL/dy_t||^2``, the squared gradient of the loss at the layer's output for
  token ``t``. Weighting the layer objective by it (GuidedQuant, Kim et al. 2025, with one weight
  per token instead of per group of outputs) turns ``||X dW^T||^2`` into a second-order estimate of
  the loss change: ``dL ~ 1/2 sum_t sum_i g_ti^2 dy_ti^2``, with ``g_ti^2 ~ token_weight[t] / out``.
  It is why a causal LM's first token (its attention sink) stops being one token in 2,048: every
  later token's loss flows back through it, and its weight says so, measured, not set by hand.
* ``hdiag[j] = sum_t token_weight[t] * x_tj^2``, the weighted Hessian diagonal: quantizing channel
  ``j`` with squared error ``SSE_j`` costs about ``hdiag[j] * SSE_j / (2 * out)`` of loss. These
  numbers are in the units of the loss for every layer, so one price per bit can be shared by the
  whole model (``cmpq.algorithm.budget``).
* ``row_weight[r] = sum_t g_tr^2``, the same gradient energy per output row. A codebook is shared
  by all rows of its channel; SqueezeLLM (Kim et al. 2023) fits it with each weight's Fisher
  information as its k-means weight. With the Fisher term ``sum_t g_tr^2 x_tj^2`` approximated as
  separable, one channel's weights differ only by ``row_weight[r]``, which is what the
  compensated algorithm's ``row_weighting="gradient"`` uses.

The whole model runs on ``device`` for the pass (one window at a time, parameters frozen); a
model that does not fit there gets a clear error naming the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cmpq.model.blocks import find_blocks, find_linears


@dataclass
class LinearSensitivity:
    hdiag: torch.Tensor  # float64 [in]: sum_t w_t x_tj^2
    token_weight: torch.Tensor  # float32 [tokens], in calibration order (CPU)
    out_features: int
    row_weight: torch.Tensor | None = None  # float64 [out]: sum_t g_tr^2, how much each output row matters


def measure(
    model: nn.Module,
    ids: torch.Tensor,
    device: torch.device | str,
    log: Callable[[str], None] | None = None,
    rows: bool = False,
    progress: bool | None = None,
) -> dict[tuple[int, str], LinearSensitivity]:
    """Sensitivity of every block linear, keyed by (block index, linear name), from windows ``ids``
    (``rows``: also each output row's gradient energy, for ``row_weighting="gradient"``).
    ``progress``: a bar over the windows (None: when ``log`` is set)."""
    device = torch.device(device)
    _, blocks = find_blocks(model)
    linears = {(i, n): lin for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}
    n_tokens = ids.numel()
    from cmpq.model.experts import sibling_key

    # experts see a routed subset of the tokens: no per-token weights for them (and none of the
    # memory: a model with thousands of expert matrices would need gigabytes)
    out: dict[tuple[int, str], LinearSensitivity] = {
        k: LinearSensitivity(torch.zeros(lin.in_features, dtype=torch.float64, device=device),
                             torch.zeros(0 if sibling_key(k[1]) else n_tokens, dtype=torch.float32, device=device),
                             lin.out_features,
                             torch.zeros(lin.out_features, dtype=torch.float64, device=device) if rows else None)
        for k, lin in linears.items()
    }
    home = next(model.parameters()).device
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    use_cache = getattr(model.config, "use_cache", None)
    pending: dict[tuple[int, str], torch.Tensor] = {}
    offset = [0]

    def on_forward(key):
        def hook(mod, args, output):
            pending[key] = args[0].detach()

            def on_grad(g, key=key):
                x = pending.pop(key)
                g = g.detach().reshape(-1, g.shape[-1])
                # norms accumulate in float32 straight from the half-precision gradient: no float32
                # copy and square of it (18 bytes per element moved, by count, against 2 now)
                w = torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32).square_()  # per token
                s = out[key]
                if s.row_weight is not None:
                    s.row_weight += torch.linalg.vector_norm(g, dim=0, dtype=torch.float32).square_().double()
                # one float32 matrix-vector product per window, summed across windows in float64:
                # the float64 square and einsum it replaces moved ~2.7x the bytes by count (224 of them per
                # window on a 7B model); 2,048 float32 terms carry ~1e-6 relative error
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float32, copy=True).square_()
                s.hdiag += torch.mv(x2.T, w.float()).double()
                if s.token_weight.numel():
                    s.token_weight[offset[0] : offset[0] + w.numel()] = w  # on the device: no sync per hook

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def embed_hook(mod, args, output):
        return output.requires_grad_(True)

    hooks = [lin.register_forward_hook(on_forward(k)) for k, lin in linears.items()]
    hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.config.use_cache = False
        try:
            model.to(device)
        except torch.OutOfMemoryError:
            model.to(home)
            raise RuntimeError(
                "the sensitivity pass needs the whole model on the device and it does not fit; "
                "use token_weighting='none' with algorithm='paper', a device with more memory, or a higher "
                "--max-gpu-memory (the cap holds from the start of the run)") from None
        from cmpq.progress import bar

        pbar = bar(ids.shape[0], "calibration (sensitivity)", "window", enabled=log is not None if progress is None else progress)
        for i in range(ids.shape[0]):
            x = ids[i : i + 1].to(device)
            with torch.enable_grad():
                logits = model(input_ids=x, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[0, :-1], x[0, 1:], reduction="sum")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss on calibration window {i} is {loss.item()}; the "
                                             f"model overflows in {next(model.parameters()).dtype}")
                loss.backward()
            offset[0] += x.numel()
            pending.clear()
            pbar.update(1)
            if log and (i + 1) % max(1, ids.shape[0] // 4) == 0:
                log(f"sensitivity: {i + 1}/{ids.shape[0]} windows")
        pbar.close()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        model.config.use_cache = use_cache
        model.to(home)
    for k, s in out.items():
        if not torch.isfinite(s.hdiag).all() or not torch.isfinite(s.token_weight).all() \
                or (s.row_weight is not None and not torch.isfinite(s.row_weight).all()):
            raise FloatingPointError(f"block {k[0]} {k[1]}: gradients overflowed in the sensitivity pass")
        s.hdiag, s.token_weight = s.hdiag.cpu(), s.token_weight.cpu()  # one copy each, at the end
        if s.row_weight is not None:
            s.row_weight = s.row_weight.cpu()
    return out
