"""Tiny random Llama shared by the baseline and quality-benchmark tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up dominates, and a busy 2-core box makes it 1000x worse.
    Import it into a test module to make it apply there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def clone(m: LlamaForCausalLM) -> LlamaForCausalLM:
    c = LlamaForCausalLM(m.config).eval()
    c.load_state_dict(m.state_dict())
    return c


def char_tokenizer(eos: bool = False):
    """One token per printable ASCII character (ids 32..126, ``[UNK]`` 0), built offline; with
    ``eos``, ``</s>`` as id 1 (lm-eval and chat-free generation need an end token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"[UNK]": 0} | ({"</s>": 1} if eos else {})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", **({"eos_token": "</s>"} if eos else {}))
