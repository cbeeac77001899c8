"""Checkpoint names -> the names and layouts the native classes hold.

Two kinds of conversion happen at load time, on exactly the tensors a role reads:

- transformers' own conversions (:func:`to_native`): checkpoints of MoE families store one
  matrix per expert (``experts.3.w1.weight``) while the classes hold the experts stacked
  (``experts.gate_up_proj``); transformers registers how to convert, and we apply its rules.
- renamed families (:class:`Translation`): checkpoints whose blocks are another family's blocks
  under other names.

Baichuan and Baichuan2 7B ship custom modeling code, yet their blocks are Llama blocks with the
query/key/value projections fused into one ``W_pack`` matrix, and Baichuan2 normalizes its LM head
rows at run time (``NormHead``). A :class:`Translation` turns such a checkpoint's ``config.json``
into the native config that serves it (a ``LlamaConfig``) and renames/reshapes its tensors at load
time, so no remote code runs. ``docs/families.md`` is the recipe for adding one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from swarm.errors import ModelError

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Translation:
    # the checkpoint's config.json (a dict) and its name -> the native config the blocks are built from
    config: Callable[[dict[str, Any], str], PretrainedConfig]
    # one block's tensors, named relative to the block prefix -> the native block's state dict
    block: Callable[[Tensors, PretrainedConfig], Tensors]
    # the client's tensors (embeddings, final norm, LM head) -> the native model's names and values
    top: Callable[[Tensors, PretrainedConfig], Tensors]


# -- Baichuan / Baichuan2 7B ----------------------------------------------------------------------

NORM_HEAD_ATTR = "swarm_norm_head"  # set on the translated config: LM head rows are L2-normalized
BAICHUAN2_VOCAB = 125696  # every Baichuan2 checkpoint has this vocabulary; Baichuan (v1) 7B has 64000
_BAICHUAN_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _baichuan_config(raw: dict[str, Any], name: str) -> PretrainedConfig:
    from transformers import LlamaConfig

    missing = [key for key in _BAICHUAN_REQUIRED if key not in raw]
    if missing:
        raise ModelError(f"the Baichuan config of {name!r} lacks {missing}; is it a Baichuan checkpoint?")
    if "max_position_embeddings" not in raw:
        raise ModelError(f"{name!r} looks like a Baichuan 13B checkpoint (alibi attention: its config has no "
                         "max_position_embeddings); Swarm serves the 7B layout (rotary, Llama-shaped blocks) only")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{name!r} uses hidden_act={raw['hidden_act']!r}; Baichuan 7B blocks use silu")
    config = LlamaConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_attention_heads"], hidden_act="silu",
        max_position_embeddings=raw["max_position_embeddings"], initializer_range=raw.get("initializer_range", 0.02),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id", 1), eos_token_id=raw.get("eos_token_id", 2),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # Baichuan's rotary base
        dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )
    config._name_or_path = name
    # Baichuan (v1) 7B spells its class "BaiChuanForCausalLM" and has a plain head; Baichuan2 has NormHead
    setattr(config, NORM_HEAD_ATTR, raw["vocab_size"] == BAICHUAN2_VOCAB
            or "BaichuanForCausalLM" in (raw.get("architectures") or []))
    return config


def _baichuan_block(tensors: Tensors, config: PretrainedConfig) -> Tensors:
    out: Tensors = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved; the Llama block computes it
        if name == "self_attn.W_pack.weight":
            if tensor.shape != (3 * config.hidden_size, config.hidden_size):
                raise ModelError(f"W_pack has shape {list(tensor.shape)}; expected "
                                 f"[{3 * config.hidden_size}, {config.hidden_size}] (query, key, value stacked)")
            for part, weight in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"self_attn.{part}.weight"] = weight
        else:
            out[name] = tensor
    if "self_attn.q_proj.weight" not in out:
        raise ModelError(f"a Baichuan block has no self_attn.W_pack.weight (tensors: {sorted(tensors)[:6]})")
    return out


def _baichuan_top(tensors: Tensors, config: PretrainedConfig) -> Tensors:
    head = tensors.get("lm_head.weight")
    if head is None or not getattr(config, NORM_HEAD_ATTR, False):
        return tensors
    # NormHead divides every row (one token's output embedding) by its L2 norm
    normalized = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    return {**tensors, "lm_head.weight": normalized}


BAICHUAN = Translation(config=_baichuan_config, block=_baichuan_block, top=_baichuan_top)


# -- transformers' own checkpoint conversions --------------------------------------------------------


def _natural_key(name: str) -> list[int | str]:
    """``experts.10`` sorts after ``experts.9``: stacked experts must be in index order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def to_native(lm_class: type, config: PretrainedConfig, tensors: Tensors) -> Tensors:
    """Applies the conversions transformers registers for ``lm_class`` (full checkpoint names in and out).

    Tensors no rule matches pass unchanged, so checkpoints already in the native layout load too.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    if not lm_class.__module__.startswith("transformers."):
        return tensors  # a model's own code: transformers' rules for a same-named native model do not apply
    transforms = (get_checkpoint_conversion_mapping(lm_class.__name__)
                  or get_checkpoint_conversion_mapping(config.model_type) or [])
    if not transforms:
        return tensors
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    out: Tensors = {}
    pending: dict[str, Any] = {}  # first target name -> a converter collecting its source tensors
    for name in sorted(tensors, key=_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            out[renamed] = tensors[name]
            continue
        converter = pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(renamed, name, pattern, tensors[name])
    for first_name, converter in pending.items():
        for name, value in converter.convert(first_name, config=config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out
