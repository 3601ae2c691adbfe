"""Text generation with a KV cache: ``cmpq generate MODEL_DIR "prompt"``.

``generate`` runs prefill once, then one token per step with Hugging Face's ``StaticCache``. On
CUDA the one-token step is captured once as a CUDA graph and replayed (every CMPQ decode kernel
launch and all of the model's small ops become one graph launch per token); if capture fails
(an op that cannot be captured, an older transformers) it says so and runs eagerly. Greedy by
default, sampling with ``temperature`` / ``top_p``.

``compile=True`` also runs the step through ``torch.compile`` (before capture). A graph replays
every kernel it holds, and an eager Hugging Face decoder layer is some fifty small kernels (norms,
rotary, residuals), each ~2 us even inside a graph: for a 135M model that is most of a token's
time. Compiled, they fuse into a few kernels; each ``CMPQLinear`` stays one opaque op
(``cmpq/nn/opaque.py``). Compiling costs tens of seconds once per process.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    cuda_graph: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B, 1] token ids."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        p, i = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p
        probs = torch.zeros_like(probs).scatter_(-1, i, p * keep)
    return torch.multinomial(probs, 1, generator=gen)


def _static_cache(model, max_len: int, device, dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older signature
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=device, dtype=dtype)


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 cuda_graph: bool | None = None, seed: int = 0, eos_token_id: int | None = None,
                 compile: bool = False, fuse: bool = False) -> tuple:
    """Token ids -> (all ids [1, n], prefill seconds, decode seconds, graph used).

    Decode seconds cover the token loop only: the one-time compile and graph capture before it are
    not counted (a server pays them once, not per request). ``fuse``: for this call, the CMPQ
    linears that share an input run as one launch per token (``cmpq.nn.fuse``)."""
    from cmpq.nn.fuse import fused

    with fused(model) if fuse else contextlib.nullcontext():
        return _generate_ids(model, input_ids, max_new_tokens, temperature, top_p, cuda_graph, seed, eos_token_id,
                             compile)


def _generate_ids(model, input_ids, max_new_tokens, temperature, top_p, cuda_graph, seed, eos_token_id, compile):
    dev = input_ids.device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    n0 = input_ids.shape[1]
    cache = _static_cache(model, n0 + max_new_tokens + 1, dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    sync()
    t0 = time.perf_counter()
    pos = torch.arange(n0, device=dev)
    logits = model(input_ids=input_ids, cache_position=pos, position_ids=pos[None], past_key_values=cache,
                   use_cache=True).logits[:, -1]
    nxt = _sample(logits, temperature, top_p, gen)
    sync()
    t1 = time.perf_counter()

    out = [nxt]
    ids_buf = nxt.clone()
    pos_buf = torch.tensor([n0], device=dev)

    def eager_step():
        return model(input_ids=ids_buf, cache_position=pos_buf, position_ids=pos_buf[None], past_key_values=cache,
                     use_cache=True).logits[:, -1]

    step = eager_step
    if compile:
        compiled = torch.compile(eager_step, dynamic=False)
        try:
            compiled()  # compiles now (at the first decode position, rewritten by the first real step)
            step = compiled
        except Exception as e:  # noqa: BLE001 - any compile problem: run uncompiled
            print(f"[cmpq generate] torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running uncompiled")

    use_graph = dev.type == "cuda" if cuda_graph is None else (cuda_graph and dev.type == "cuda")
    graph = None
    steps = max_new_tokens - 1
    if use_graph and steps > 2:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up (kernel builds, layouts) at the first decode position
                step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_logits = step()
        except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly
            print(f"[cmpq generate] CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            graph = None
            cache = _static_cache(model, n0 + max_new_tokens + 1, dev, dtype)  # capture may have left it dirty
            model(input_ids=input_ids, cache_position=pos, position_ids=pos[None], past_key_values=cache, use_cache=True)
    sync()
    t_loop = time.perf_counter()
    for k in range(steps):
        if eos_token_id is not None and int(out[-1]) == eos_token_id:
            break
        ids_buf.copy_(out[-1])
        pos_buf.fill_(n0 + k)
        if graph is not None:
            graph.replay()
            logits = g_logits
        else:
            logits = step()
        out.append(_sample(logits, temperature, top_p, gen))
    sync()
    t2 = time.perf_counter()
    return torch.cat([input_ids] + out, dim=1), t1 - t0, t2 - t_loop, graph is not None


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, **kw) -> Generation:
    dev = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    all_ids, pre, dec, g = generate_ids(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, **kw)
    new = all_ids[0, ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, ids.shape[1], len(new), pre, dec, g)
