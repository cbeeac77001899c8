"""Writing tiny GGUF files the way llama.cpp's converter does, with the ``gguf`` package.

:func:`write_gguf` turns a transformers Llama or Qwen2 model into a GGUF: llama.cpp tensor names
(``gguf.get_tensor_name_map``), ggml dimension order (the writer reverses torch's), Llama's q/k
rows permuted for llama.cpp's rotary layout (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``;
Qwen2 is written unpermuted), the architecture's metadata keys, and each tensor stored in the ggml
type ``types`` picks for it (F32, F16, or blocks quantized by ``gguf.quants``).
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
Q = gguf.GGMLQuantizationType

# a mix like llama.cpp's Q4_0 files: blocks for the big matrices, f16/f32 elsewhere
MIXED_TYPES = ((r"mlp\.", Q.Q4_0), (r"self_attn\.[qkvo]_proj\.weight", Q.Q8_0), (r"embed_tokens", Q.Q8_0),
               (r"lm_head", Q.F16), (r"", Q.F32))


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _type_for(name: str, types) -> gguf.GGMLQuantizationType:
    for pattern, qtype in types:
        if re.search(pattern, name):
            return qtype
    return Q.F32


def write_gguf(model: torch.nn.Module, path: str, types=MIXED_TYPES, *, file_type: int | None = None,
               name: str = "tiny") -> str:
    """Writes ``model`` (a transformers ``*ForCausalLM``) to ``path`` as a GGUF; returns ``path``."""
    config = model.config
    arch = ARCHS[config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if file_type is not None:
        writer.add_file_type(file_type)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = tensor.detach().float().numpy()
        if config.model_type == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif config.model_type == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = _type_for(hf_name, types) if data.ndim == 2 else Q.F32  # norms and biases stay f32
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
