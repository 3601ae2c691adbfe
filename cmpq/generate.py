"""Text generation with a KV cache: ``cmpq generate MODEL_DIR "prompt"``.

``generate`` runs prefill once, then one token per step with Hugging Face's ``StaticCache``. On
CUDA the one-token step is captured once as a CUDA graph and replayed (every CMPQ decode kernel
launch and all of the model's small ops become one graph launch per token); if capture fails
(an op that cannot be captured, an older transformers) it says so and runs eagerly. Greedy by
default, sampling with ``temperature`` / ``top_p``.

``compile=True`` also runs the step through ``torch.compile`` (before capture). A graph replays
every kernel it holds, and an eager Hugging Face decoder layer is some fifty small kernels (norms,
rotary, residuals), each ~2 us even inside a graph: for a 135M model that is most of a token's
time. Compiled, they fuse into a few kernels; each ``CMPQLinear`` stays one operator,
``torch.ops.cmpq.linear`` (``cmpq/nn/ops.py``), fed the layer's own tensors. With ``fuse`` the
linears that share an input become one ``cmpq::linear_group`` node (a graph pass, ``cmpq.nn.fuse``),
so the compiled step launches q/k/v and gate/up once each, as the eager fusion does. Compiling costs
tens of seconds once per process.

We keep our own loop rather than ``model.generate`` because the loop is what gets captured as a
graph. It talks to transformers through the cache object only: the forward's cache argument is
``cache`` from transformers 5.24 on (``past_key_values`` is removed in 5.40) and
``past_key_values`` before; ``cache_kwarg`` picks the one the model takes. Tokens go to a
``streamer`` (transformers' ``TextStreamer`` protocol: ``put``/``end``) as they are made.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable
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
    chat: bool = False  # the prompt went through the tokenizer's chat template

    @property
    def decode_tokens(self) -> int:
        """Tokens made by the decode loop: the first new token comes from prefill."""
        return max(self.new_tokens - 1, 0)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode-phase speed; None (shown "n/a") below 2 new tokens, where there is no decode phase."""
        if self.decode_tokens < 1 or self.decode_s <= 0:
            return None
        return self.decode_tokens / self.decode_s

    def speed(self) -> str:
        v = self.tokens_per_s
        return "n/a" if v is None else f"{v:.1f} tokens/s"


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


def _static_cache(model, max_len: int, device, dtype, batch: int = 1):
    from transformers import StaticCache

    try:  # 5.x: sized from the first keys it stores (batch included)
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older signature
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device,
                           dtype=dtype)


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` (transformers >= 5.24,
    where ``past_key_values`` is deprecated) or ``past_key_values`` (older)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_set(eos_token_id: int | Iterable[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 cuda_graph: bool | None = None, seed: int = 0, eos_token_id: int | Iterable[int] | None = None,
                 compile: bool = False, fuse: bool = False, streamer=None, progress: bool = False) -> tuple:
    """Token ids ``[B, n0]`` -> (all ids ``[B, n]``, prefill seconds, decode seconds, graph used).

    ``B`` prompts of one length run as one batch (every step decodes ``B`` tokens; the CMPQ layers
    then run their several-token kernels). With ``eos_token_id`` the loop stops once every row has
    made one; a row that finished earlier keeps going (its tokens after the end are not meaningful).
    ``streamer`` takes one row only.

    Decode seconds cover the token loop only: the one-time compile and graph capture before it are
    not counted (a server pays them once, not per request). ``fuse``: for this call, the CMPQ
    linears that share an input run as one launch per token (``cmpq.nn.fuse``). ``streamer``
    (``put(ids)``/``end()``, e.g. transformers' ``TextStreamer``) gets each new token as it is
    made. ``progress``: a tqdm bar over the new tokens on stderr (``cmpq.progress``)."""
    from cmpq.nn.fuse import fused

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with both at least 1, got {tuple(input_ids.shape)}")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"a streamer takes one sequence; got a batch of {input_ids.shape[0]}")
    with fused(model) if fuse else contextlib.nullcontext():
        return _generate_ids(model, input_ids, max_new_tokens, temperature, top_p, cuda_graph, seed,
                             _eos_set(eos_token_id), compile, fuse, streamer, progress)


def _generate_ids(model, input_ids, max_new_tokens, temperature, top_p, cuda_graph, seed, eos, compile, fuse,
                  streamer, progress):
    from cmpq.nn.fuse import compile_backend
    from cmpq.progress import bar

    dev = input_ids.device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    n0 = input_ids.shape[1]
    cache = _static_cache(model, n0 + max_new_tokens + 1, dev, dtype, input_ids.shape[0])
    name = cache_kwarg(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # 5.x static caches write where their own counter (a tensor, advanced in place, so also inside a
        # CUDA graph) says; 4.x ones where cache_position says. Only the old argument name takes it.
        kw = {"cache_position": pos} if name == "past_key_values" else {}
        return model(input_ids=ids, position_ids=pos[None], use_cache=True, **{name: cache}, **kw).logits[:, -1]

    def prefill() -> torch.Tensor:
        return forward(input_ids, torch.arange(n0, device=dev))

    sync()
    t0 = time.perf_counter()
    nxt = _sample(prefill(), temperature, top_p, gen)
    sync()
    t1 = time.perf_counter()

    out = [nxt]
    ids_buf = nxt.clone()
    pos_buf = torch.tensor([n0], device=dev)

    def eager_step():
        return forward(ids_buf, pos_buf)

    step = eager_step
    warmed = False  # a warm-up step wrote position n0 and moved the cache's counter on: reset, prefill again
    if compile:
        # fused: the compiled step's shared-input linears become one operator each (cmpq.nn.fuse)
        compiled = torch.compile(eager_step, dynamic=False, **({"backend": compile_backend()} if fuse else {}))
        try:
            warmed = True
            compiled()  # compiles now
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
            with torch.cuda.stream(s):  # warm-up (kernel builds, layouts)
                warmed = True
                step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_logits = step()
        except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly
            print(f"[cmpq generate] CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            graph = None
            cache = _static_cache(model, n0 + max_new_tokens + 1, dev, dtype, input_ids.shape[0])  # capture may have left it dirty
            warmed = True
    if warmed:
        cache.reset()  # in place: a captured graph keeps pointing at the same tensors
        prefill()
    if streamer is not None:
        streamer.put(nxt.cpu())
    pbar = bar(max_new_tokens, "generate", "tok", enabled=progress)
    pbar.update(1)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=dev)
    eos_t = torch.tensor(sorted(eos), device=dev) if eos else None
    sync()
    t_loop = time.perf_counter()
    for k in range(steps):
        if eos_t is not None:
            done |= torch.isin(out[-1][:, 0], eos_t)
            if bool(done.all()):  # one host sync per step, as the single-row check had
                break
        ids_buf.copy_(out[-1])
        pos_buf.fill_(n0 + k)
        if graph is not None:
            graph.replay()
            logits = g_logits
        else:
            logits = step()
        out.append(_sample(logits, temperature, top_p, gen))
        if streamer is not None:
            streamer.put(out[-1].cpu())
        pbar.update(1)
    sync()
    t2 = time.perf_counter()
    pbar.close()
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids] + out, dim=1), t1 - t0, t2 - t_loop, graph is not None


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> tuple[torch.Tensor, bool]:
    """([1, n] ids, whether the chat template was used). An instruct model answers a bare question
    with its end-of-turn token at once; through its chat template it answers it. Tokenizers without
    a template get the prompt as it is."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # the template writes any special tokens itself (e.g. <|im_start|>); do not add BOS twice
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, True
    return tokenizer(prompt, return_tensors="pt").input_ids, False


def stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (often a list,
    e.g. <|im_end|> and <|endoftext|>)."""
    ids = _eos_set(tokenizer.eos_token_id)
    gc = getattr(model, "generation_config", None)
    ids |= _eos_set(getattr(gc, "eos_token_id", None))
    return ids


def check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a request longer than the model's context (it would run past its position table)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) fills the model's context of {limit} tokens")
    raise ValueError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                     f"context of {limit} tokens; use --max-new-tokens {limit - prompt_tokens} or less")


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, streamer=None,
             **kw) -> Generation:
    """Generate from a text prompt (through the chat template when the tokenizer has one and
    ``chat``); ``streamer`` gets the new tokens as they are made."""
    from cmpq.model.device_map import input_device

    ids, used_chat = prompt_ids(tokenizer, prompt, chat)
    ids = ids.to(input_device(model))
    check_length(model, ids.shape[1], max_new_tokens)
    all_ids, pre, dec, g = generate_ids(model, ids, max_new_tokens, eos_token_id=stop_ids(model, tokenizer),
                                        streamer=streamer, **kw)
    new = all_ids[0, ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, ids.shape[1], len(new), pre, dec, g,
                      used_chat)


def uses_fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``CMPQLinear`` runs fused kernels here (``cmpq.kernels.dispatch``): CUDA with fp16/bf16,
    unless ``cmpq.kernels.force("reference")`` is in effect.
    Elsewhere every token would dequantize every layer again, so generation keeps dense weights."""
    from cmpq.kernels import forced

    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and forced() != "reference"


def load_for_generation(name: str, device: torch.device, dtype: torch.dtype | None = None, verify: bool = True):
    """(model, tokenizer) ready to generate: a cmpq folder keeps its packed layers where fused
    kernels run and dequantizes each layer once elsewhere (``cache_dense_weights``: fp32/fp16
    memory; SmolLM2-135M at 3.4 bits decodes 8.9 vs 0.41 tokens/s on one CPU thread, measured
    2026-12-02); anything else loads as a plain model."""
    from transformers import AutoTokenizer

    from cmpq.model.loading import load_model
    from cmpq.storage.io import is_cmpq_folder, load

    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if is_cmpq_folder(name):  # cmpq.save's folders and save_pretrained's
        from cmpq.nn.linear import cache_dense_weights

        model = load(name, device=device, dtype=dtype, verify=verify)
        if not uses_fused_kernels(device, dtype):
            cache_dense_weights(model)
        return model.eval(), AutoTokenizer.from_pretrained(name)
    model, tok = load_model(name, dtype=dtype, device=device)
    return model.eval(), tok
