import os

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before Triton is
# first imported by any test module.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=256)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 64), generator=g)


@pytest.fixture
def folder4(tmp_path):
    """A 4-block tiny Llama with a character tokenizer, saved as a local folder."""
    from tiny_models import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"
