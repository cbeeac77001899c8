"""The model families under test: a tiny random config per family, and how its checkpoint is written.

Every case is small (hidden 64, 4 blocks, vocab 512) and, where the family has a sliding window,
its window (5) is shorter than the test sequences, with full and sliding blocks mixed inside spans
where the family mixes them. Most checkpoints are ``save_pretrained`` of a random transformers
model. Two are written by hand: Baichuan2 (its own tensor names and config.json; served by Swarm's
translation onto the Llama block) and a model that ships its own code (``trust_remote_code``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING = dict(sliding_window=5)
QWEN_SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    name: str  # test id and DHT prefix
    model_type: str  # the transformers model_type the checkpoint is built from
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields over BASE
    writer: str = "native"  # "native", "baichuan" or "remote_code": how the checkpoint is written
    server_args: tuple[str, ...] = ()  # extra `swarm serve` flags
    spans: tuple[str, ...] = ("0:1", "1:3", "3:4")  # float32 servers in test_families.py
    bf16: bool = True  # test_families.py also checks a bfloat16 server
    client_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra from_pretrained keywords


CASES: list[FamilyCase] = [
    FamilyCase("llama", "llama"),
    FamilyCase("mistral", "mistral", SLIDING),
    FamilyCase("mixtral", "mixtral", {**SLIDING, "num_local_experts": 4, "num_experts_per_tok": 2}),
    FamilyCase("qwen2", "qwen2", QWEN_SLIDING),  # blocks: full, full, sliding, sliding
    # one dense block among the MoE ones; blocks: sliding, full, full, full
    FamilyCase("qwen2_moe", "qwen2_moe", {**QWEN_SLIDING, **MOE, "shared_expert_intermediate_size": 64,
                                          "mlp_only_layers": [1]}),
    FamilyCase("qwen3", "qwen3", {**QWEN_SLIDING, "head_dim": 16}),
    FamilyCase("qwen3_moe", "qwen3_moe", {**QWEN_SLIDING, **MOE, "head_dim": 16}),
    FamilyCase("gemma", "gemma", {"head_dim": 16}),
    FamilyCase("gemma2", "gemma2", {**SLIDING, "head_dim": 16}),  # blocks: sliding, full, sliding, full
    FamilyCase("gemma3", "gemma3_text", {**SLIDING, "head_dim": 16, "layer_types": [
        "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]}),
    FamilyCase("phi3", "phi3", SLIDING),
    FamilyCase("falcon", "falcon"),  # the 7B layout: multi-query, parallel attention, rotary
    FamilyCase("bloom", "bloom", {"n_head": 4}),
    FamilyCase("glm", "glm", {"head_dim": 16}),
    FamilyCase("glm4", "glm4", {"head_dim": 16}),
    FamilyCase("baichuan2", "llama", {"num_key_value_heads": 4}, writer="baichuan"),
    # the Llama block again: one server is enough to show that --trust-remote-code runs the model's own classes
    FamilyCase("custom_code", "llama", writer="remote_code", server_args=("--trust-remote-code",),
               client_args={"trust_remote_code": True}, spans=("0:4",), bf16=False),
]

# layouts checked in-process only (no servers): other Falcon generations
EXTRA_CASES: list[FamilyCase] = [
    FamilyCase("falcon_40b", "falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    FamilyCase("falcon_alibi", "falcon", {"alibi": True, "multi_query": False, "parallel_attn": False}),
]


def build(case: FamilyCase, root: str, seed: int = 0) -> tuple[str, str]:
    """Writes ``case``'s checkpoint under ``root``; returns (served path, path of the local reference)."""
    path = os.path.join(root, case.name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        _WRITERS[case.writer](case, path, seed)
    reference = os.path.join(path, "reference")
    return path, reference if os.path.isdir(reference) else path


def load_reference(case: FamilyCase, reference: str, dtype: torch.dtype = torch.float32) -> Any:
    """The local transformers model the swarm must reproduce (a ``*ForCausalLM``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype, **case.client_args).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def _random_model(case: FamilyCase, seed: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(case.model_type, **{**BASE, **case.overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _write_native(case: FamilyCase, path: str, seed: int) -> None:
    _random_model(case, seed).save_pretrained(path)


def _write_baichuan(case: FamilyCase, path: str, seed: int) -> None:
    """Baichuan2-7B's layout: ``W_pack`` (q, k, v stacked), a NormHead LM head, its config.json fields.
    The reference is the Llama model the translation must reproduce (its head rows normalized)."""
    model = _random_model(case, seed)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            packed = [state[prefix + part + ".weight"] for part in ("q_proj", "k_proj", "v_proj")]
            tensors[prefix + "W_pack.weight"] = torch.cat(packed, dim=0)
        else:
            tensors[name] = tensor
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({
            "_from_model_config": True, "architectures": ["BaichuanForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                         "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
            "tokenizer_class": "BaichuanTokenizer", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "hidden_act": "silu", "hidden_size": config.hidden_size, "initializer_range": 0.02,
            "intermediate_size": config.intermediate_size, "max_position_embeddings": 4096,
            "model_max_length": 4096, "model_type": "baichuan", "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": config.num_hidden_layers, "rms_norm_eps": config.rms_norm_eps,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.29.2",
            "use_cache": True, "vocab_size": config.vocab_size, "z_loss_weight": 0,
        }, f, indent=2)
    with torch.no_grad():  # what Baichuan2's NormHead computes from the stored head
        model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight.float(), dim=-1))
    model.save_pretrained(os.path.join(path, "reference"))


CUSTOM_CONFIG_CODE = '''from transformers import LlamaConfig


class SwarmCustomConfig(LlamaConfig):
    model_type = "swarm_custom_llama"
'''

CUSTOM_MODELING_CODE = '''from transformers import LlamaForCausalLM

from .configuration_swarm_custom import SwarmCustomConfig


class SwarmCustomForCausalLM(LlamaForCausalLM):
    config_class = SwarmCustomConfig
'''


def _write_remote_code(case: FamilyCase, path: str, seed: int) -> None:
    """A Llama saved under a model type transformers does not know, with its code in the directory."""
    _random_model(case, seed).save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(model_type="swarm_custom_llama", architectures=["SwarmCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_swarm_custom.SwarmCustomConfig",
                            "AutoModelForCausalLM": "modeling_swarm_custom.SwarmCustomForCausalLM"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name, code in (("configuration_swarm_custom.py", CUSTOM_CONFIG_CODE),
                       ("modeling_swarm_custom.py", CUSTOM_MODELING_CODE)):
        with open(os.path.join(path, name), "w") as f:
            f.write(code)


_WRITERS: dict[str, Callable[[FamilyCase, str, int], None]] = {
    "native": _write_native, "baichuan": _write_baichuan, "remote_code": _write_remote_code,
}
