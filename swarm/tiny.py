"""Tiny random-weight models built from transformers configs: the demo's default model and the
test suite's fixtures. Nothing is downloaded."""

from __future__ import annotations

import os

import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_tiny_model(path: str, model_type: str = "llama", seed: int = 0, **overrides) -> str:
    """Saves a random-weight ``model_type`` model (safetensors + config) under ``path``; returns ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = AutoConfig.for_model(model_type, **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path
