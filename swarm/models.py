"""Model families: one small adapter per family, no family logic anywhere else.

A family is served by its own transformers classes: the server instantiates the decoder-layer
class for each block of its span (:mod:`swarm.blocks`); the client instantiates the
``*ForCausalLM`` class with no layers and puts a remote sequence where the layers were. What
differs between families (where their blocks live in a checkpoint, what their layers take besides
hidden states, how a renamed checkpoint maps onto native classes) is in :data:`FAMILIES`; what
transformers already knows (layer types, attention implementation, rotary class) is read from
transformers itself. ``docs/families.md`` says how to add a family.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from swarm import gguf, position_bias, translate
from swarm.devices import bf16_supported
from swarm.errors import ConfigError, ModelError
from swarm.first_contact import check_model_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """How one family's checkpoints and modules are laid out. The defaults are the Llama layout."""

    label: str  # what `swarm models` and the README call the family
    block_prefix: str = "model.layers.{}."  # checkpoint name prefix of block i
    base_model_attr: str = "model"  # *ForCausalLM attribute that holds the base model
    layers_attr: str = "layers"  # base model attribute that holds the decoder layers
    rotary_attr: str | None = "rotary_emb"  # base model attribute of the rotary embedding (None: none)
    rotary_by_layer_type: bool = False  # the rotary embedding takes the block's layer type (Gemma3)
    # builds extra keyword inputs of every block (alibi) and may rewrite its mask; see swarm.position_bias
    block_inputs: position_bias.BlockInputs | None = None
    materialize_mask: bool = False  # never let the mask be None (a position bias is folded into it)
    layer_returns_tuple: bool = False  # the base model reads ``outputs[0]`` of each layer (Falcon, Bloom)
    attn_implementation: str | None = None  # None: what transformers picks for the class (eager for Gemma2, Bloom)
    kv_heads: Callable[[PretrainedConfig], int] | None = None  # heads a block caches, if not num_key_value_heads
    translation: translate.Translation | None = None  # a renamed checkpoint served by another family's classes


def _falcon_kv_heads(config: PretrainedConfig) -> int:
    """What FalconAttention caches: every head for the 40B/180B layout (it broadcasts its kv heads
    first), one for multi-query 7B, else ``num_kv_heads``."""
    if config.new_decoder_architecture:
        return config.num_attention_heads
    return 1 if config.multi_query else config.num_kv_heads


def _all_heads(config: PretrainedConfig) -> int:
    return config.num_attention_heads


LLAMA_LAYOUT = FamilyAdapter(label="Llama 2, Llama 3.x and other Llama-layout models")

FAMILIES: dict[str, FamilyAdapter] = {
    "llama": LLAMA_LAYOUT,
    "mistral": FamilyAdapter(label="Mistral (sliding window)"),
    "mixtral": FamilyAdapter(label="Mixtral 8x7B, 8x22B (mixture of experts)"),
    "qwen2": FamilyAdapter(label="Qwen2, Qwen2.5 (full and sliding-window blocks)"),
    "qwen2_moe": FamilyAdapter(label="Qwen1.5-MoE, Qwen2-MoE (experts + shared expert)"),
    "qwen3": FamilyAdapter(label="Qwen3 (q/k norms)"),
    "qwen3_moe": FamilyAdapter(label="Qwen3-MoE (30B-A3B, 235B-A22B)"),
    "gemma": FamilyAdapter(label="Gemma (scaled embeddings, tied head)"),
    "gemma2": FamilyAdapter(label="Gemma 2 (soft-capping, eager attention, sliding-window blocks)"),
    "gemma3_text": FamilyAdapter(label="Gemma 3 text-only checkpoints (rotary per layer type)",
                                 rotary_by_layer_type=True),
    "phi3": FamilyAdapter(label="Phi-3, Phi-3.5-mini, Phi-4 (fused qkv and gate/up)"),
    "glm": FamilyAdapter(label="GLM-4-9B, the -hf checkpoints (transformers' own class)"),
    "glm4": FamilyAdapter(label="GLM-4-0414, GLM-Z1 (transformers' own class)"),
    "falcon": FamilyAdapter(label="Falcon 7B/40B/180B layouts (rotary or alibi)", block_prefix="transformer.h.{}.",
                            base_model_attr="transformer", layers_attr="h", block_inputs=position_bias.falcon_inputs,
                            materialize_mask=True, layer_returns_tuple=True, kv_heads=_falcon_kv_heads),
    "bloom": FamilyAdapter(label="Bloom, BloomZ (alibi)", block_prefix="transformer.h.{}.",
                           base_model_attr="transformer", layers_attr="h", block_inputs=position_bias.bloom_inputs,
                           layer_returns_tuple=True, kv_heads=_all_heads),
    "baichuan": FamilyAdapter(label="Baichuan 7B, Baichuan2 7B (W_pack checkpoints on the Llama block)",
                              translation=translate.BAICHUAN),
}

# families served with their own code (``trust_remote_code``): assumed to follow the Llama layout
REMOTE_CODE_LAYOUT = FamilyAdapter(label="custom code")

FAMILY_ATTR = "swarm_family"  # config attribute naming the family when it is not config.model_type
REMOTE_CODE_ATTR = "swarm_remote_code"  # config attribute set on configs loaded with trust_remote_code
DIGEST_ATTR = "swarm_config_digest"  # config attribute holding config_digest of the config.json it came from
# config.json entries that say nothing about which model it is (written by whatever saved it)
_NOT_IDENTITY = {"transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions",
                 "output_hidden_states", "return_dict"}


def config_digest(raw: dict[str, Any]) -> str:
    """A short hash of a model's config.json (``raw``), the same for every copy of the model wherever it
    lives: a client finds the swarm's model by it when its folder has another name. Models that share
    an architecture and differ only in weights (a base model and its fine-tune) may share it too."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_REMOTE_LM_CLASSES: dict[type, type] = {}  # remote-code config class -> its *ForCausalLM class


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _supported() -> str:
    return f"supported families: {', '.join(supported_families())} (see `swarm models`)"


def family_of(config: PretrainedConfig) -> FamilyAdapter:
    name = getattr(config, FAMILY_ATTR, None) or config.model_type
    adapter = FAMILIES.get(name)
    if adapter is None and getattr(config, REMOTE_CODE_ATTR, False):
        return REMOTE_CODE_LAYOUT
    if adapter is None:
        raise ModelError(f"model type {name!r} is not supported; {_supported()}")
    return adapter


def load_config(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None,
                token: str | bool | None = None, trust_remote_code: bool = False,
                gguf_file: str | None = None) -> PretrainedConfig:
    """The model's transformers config, from a local directory or a hub id; checks the family.

    A renamed family (Baichuan) gets the native config it is served with. A model that needs its
    own code is refused unless ``trust_remote_code`` (then its own classes run the generic block path).
    A GGUF file (``name_or_path`` ending in ``.gguf``, or ``gguf_file`` in a directory or repository)
    gets the config transformers reads from its metadata (:mod:`swarm.gguf`).
    """
    check_model_source(name_or_path, "model", gguf_file=gguf_file)
    hub: dict[str, Any] = dict(revision=revision, cache_dir=cache_dir, token=token)
    location = gguf.gguf_location(name_or_path, gguf_file)
    if location is not None:
        config = gguf.load_config(*location, hub)
        if config.model_type not in FAMILIES or FAMILIES[config.model_type].translation is not None:
            raise ModelError(f"GGUF file {location[1]!r} holds a {config.model_type!r} model, which Swarm does not "
                             f"serve from GGUF; {_supported()}")
        _set_implementations(config, family_of(config))
        return config
    try:
        raw, _ = PretrainedConfig.get_config_dict(name_or_path, **hub)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of {name_or_path!r}: {_first_line(e)}") from None
    model_type = raw.get("model_type")
    adapter = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if adapter is not None and adapter.translation is not None:
        config = adapter.translation.config(raw, name_or_path)
        setattr(config, FAMILY_ATTR, model_type)
    elif adapter is not None:
        config = _auto_config(name_or_path, hub, trust_remote_code=False)
    elif raw.get("auto_map") and "AutoModelForCausalLM" in raw["auto_map"]:
        if not trust_remote_code:
            raise ModelError(
                f"{name_or_path!r} ({model_type!r}) needs its own code from the model repository, which Swarm does "
                "not run by default. If you trust that code, pass --trust-remote-code to `swarm serve` and "
                f"trust_remote_code=True to from_pretrained; otherwise use a model of the {_supported()}")
        config = _auto_config(name_or_path, hub, trust_remote_code=True)
        _register_remote_class(config, raw["auto_map"]["AutoModelForCausalLM"], name_or_path, hub)
        setattr(config, REMOTE_CODE_ATTR, True)
    else:
        raise ModelError(f"{name_or_path!r} has model type {model_type!r}, which Swarm does not support; "
                         f"{_supported()}")
    _set_implementations(config, family_of(config))
    setattr(config, DIGEST_ATTR, config_digest(raw))
    return config


def _first_line(error: BaseException) -> str:
    """The first line of an error from transformers or the hub (their messages run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _auto_config(name_or_path: str, hub: dict[str, Any], trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of {name_or_path!r}: {_first_line(e)}") from None


def _register_remote_class(config: PretrainedConfig, reference: str, name_or_path: str,
                           hub: dict[str, Any]) -> None:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        _REMOTE_LM_CLASSES[type(config)] = get_class_from_dynamic_module(reference, name_or_path, **hub)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise ModelError(f"cannot load the model code {reference!r} of {name_or_path!r}: {e}") from None


def _set_implementations(config: PretrainedConfig, family: FamilyAdapter) -> None:
    """Blocks built from a bare config must use the attention (and MoE experts) implementation the full
    model would pick; else they silently differ from it (no causal mask, no soft-capping)."""
    if family.attn_implementation is not None:
        config._attn_implementation = family.attn_implementation
    chosen = skeleton(config).config
    for name in ("_attn_implementation", "_experts_implementation"):
        if getattr(config, name, None) is None and getattr(chosen, name, None) is not None:
            setattr(config, name, getattr(chosen, name))


def resolve_dtype(name: str, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype on accelerators (float16 where the device has no bfloat16: Volta
    and older NVIDIA, Vega-based AMD/Hygon DCU, Ascend 910A/310), float32 on CPU (bf16 matmuls are slow there)."""
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        if DTYPES[name] == torch.bfloat16 and not bf16_supported(device):
            raise ConfigError(f"--dtype bfloat16: {device} has no native bfloat16; use --dtype float16 "
                              "(or float32, exact but twice the memory)")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    dtype = saved if saved in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    if dtype == torch.bfloat16 and not bf16_supported(device):
        logger.warning("%s has no native bfloat16: serving in float16 (a model trained in bfloat16 may overflow "
                       "in float16; --dtype float32 is exact)", device)
        return torch.float16
    return dtype


def causal_lm_class(config: PretrainedConfig) -> type:
    from transformers import AutoModelForCausalLM

    if type(config) in _REMOTE_LM_CLASSES:
        return _REMOTE_LM_CLASSES[type(config)]
    try:
        lm_class: type = AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[assignment]
    except KeyError:
        raise ModelError(f"transformers has no causal LM class for {config.model_type!r}; {_supported()}") from None
    return lm_class


def decoder_layer_class(config: PretrainedConfig) -> type[torch.nn.Module]:
    """The class named in ``_no_split_modules``, found in the modules of the LM class and its bases."""
    lm_class = causal_lm_class(config)
    for name in getattr(lm_class, "_no_split_modules", None) or []:
        for cls in lm_class.__mro__:
            module = importlib.import_module(cls.__module__)
            if isinstance(getattr(module, name, None), type):
                return getattr(module, name)
    raise ModelError(f"cannot find the decoder layer class of {config.model_type!r}")


def config_without_layers(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` whose model class builds no decoder layers (the client's local part)."""
    empty = copy.deepcopy(config)
    empty.num_hidden_layers = 0
    return empty


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The family's ``*ForCausalLM`` with no decoder layers, on the meta device (allocates nothing)."""
    with torch.device("meta"):
        return causal_lm_class(config)(config_without_layers(config))


def rotary_embedding(config: PretrainedConfig) -> torch.nn.Module | None:
    """A fresh rotary embedding of the class the family's base model uses (None if it has none)."""
    family = family_of(config)
    if family.rotary_attr is None:
        return None
    base = getattr(skeleton(config), family.base_model_attr)
    rotary = getattr(base, family.rotary_attr, None)
    return None if rotary is None else type(rotary)(config=config)


def layer_types(config: PretrainedConfig) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` for every block, as the family's model decides."""
    types_ = getattr(config, "layer_types", None)
    if types_:
        return list(types_)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of key+value cache one token takes in one block."""
    kv_heads = family_of(config).kv_heads
    heads = kv_heads(config) if kv_heads is not None else (
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def describe_families() -> list[tuple[str, str]]:
    """(model_type, label) of every supported family, for `swarm models` and the docs."""
    return [(name, FAMILIES[name].label) for name in supported_families()]
