import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm():
    """The real packaged SmolLM2-135M (converted from GGUF once, then cached)."""
    from arcquant.modeling import load_model
    return load_model("smollm2-135m")


@pytest.fixture
def fresh_smollm():
    from arcquant.modeling import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return smollm[1]


def tiny_llama(hidden=48, inter=80, layers=2, vocab=49152, seed=0, **kw):
    """A small random Llama with the real tokenizer's vocabulary (shape tests, odd widths)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                      vocab_size=vocab, max_position_embeddings=512, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_folder(tokenizer, path, **kw):
    """A tiny Llama with one strong activation-outlier channel, saved as an HF folder."""
    model = tiny_llama(hidden=64, inter=128, **kw)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
