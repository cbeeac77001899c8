"""Model families: one small adapter per family, no family logic anywhere else.

A family is served by its own transformers classes: the server instantiates the decoder-layer
class for each block of its span; the client instantiates the ``*ForCausalLM`` class with no
layers and puts a remote sequence where the layers were. What differs between families (where
their blocks live in a checkpoint, which layers use a sliding window) is in :data:`FAMILIES`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from swarm.errors import ConfigError, ModelError


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """How one family's checkpoints and modules are laid out."""

    block_prefix: str = "model.layers.{}."  # checkpoint name prefix of block i
    base_model_attr: str = "model"  # *ForCausalLM attribute that holds the base model
    layers_attr: str = "layers"  # base model attribute that holds the decoder layers
    attn_implementation: str = "sdpa"  # what transformers picks by default for this family


LLAMA_LIKE = FamilyAdapter()

FAMILIES: dict[str, FamilyAdapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_of(config: PretrainedConfig) -> FamilyAdapter:
    adapter = FAMILIES.get(config.model_type)
    if adapter is None:
        raise ModelError(
            f"model type {config.model_type!r} is not supported; supported families: "
            f"{', '.join(supported_families())} (see `swarm models`)"
        )
    return adapter


def load_config(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None,
                token: str | bool | None = None) -> PretrainedConfig:
    """The model's transformers config, from a local directory or a hub id; checks the family."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of {name_or_path!r}: {e}") from None
    if getattr(config, "auto_map", None) and config.model_type not in FAMILIES:
        raise ModelError(f"{name_or_path!r} needs its own remote code ({config.model_type!r}), which Swarm does not "
                         f"run; supported families: {', '.join(supported_families())}")
    if getattr(config, "_attn_implementation", None) is None:
        # a bare config has no attention implementation until a model class sets one; blocks built
        # from it must use the same one the full model would (else they silently drop the causal mask)
        config._attn_implementation = family_of(config).attn_implementation
    return config


def resolve_dtype(name: str, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype on accelerators, float32 on CPU (bf16 matmuls are slow there)."""
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if saved in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def causal_lm_class(config: PretrainedConfig) -> type:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelError(f"transformers has no causal LM class for {config.model_type!r}") from None


def _modeling_module(config: PretrainedConfig) -> Any:
    return importlib.import_module(causal_lm_class(config).__module__)


def decoder_layer_class(config: PretrainedConfig) -> type[torch.nn.Module]:
    lm_class = causal_lm_class(config)
    module = importlib.import_module(lm_class.__module__)
    for name in getattr(lm_class, "_no_split_modules", None) or []:
        if hasattr(module, name):
            return getattr(module, name)
    raise ModelError(f"cannot find the decoder layer class of {config.model_type!r}")


def rotary_class(config: PretrainedConfig) -> type[torch.nn.Module] | None:
    module = _modeling_module(config)
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and name.endswith("RotaryEmbedding") and obj.__module__ == module.__name__:
            return obj
    return None


def layer_types(config: PretrainedConfig) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` for every block, as the family's model decides."""
    types_ = getattr(config, "layer_types", None)
    if types_:
        return list(types_)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def config_without_layers(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` whose model class builds no decoder layers (the client's local part)."""
    empty = copy.deepcopy(config)
    empty.num_hidden_layers = 0
    return empty


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of key+value cache one token takes in one block."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()
