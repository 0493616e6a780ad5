"""Tiny random HF checkpoints built in the tests themselves (no downloads)."""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

COMMON = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def make_hf_model(kind: str, seed: int = 0):
    """kind: 'llama', 'llama3' (rope scaling), 'qwen2' (biases, tied embeddings)."""
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    elif kind == "llama3":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # Non-trivial norms and biases, so that a swapped name shows.
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def save_hf_model(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()
