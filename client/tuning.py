"""What a client trains: soft prompts and LoRA adapters for the remote blocks.

:class:`Tuning` is a module of the client model (so its parameters are the model's trainable
parameters); every forward, backward and session request carries the slice of it that the
request's blocks need (:class:`Extras`). The servers' own weights never change.

- ``ptune``: ``prompt_embeddings`` [prompt tokens, hidden] are put before the input embeddings.
- ``deep_ptune``: also ``intermediate_prompts`` [blocks, prompt tokens, hidden], added to the hidden
  states at the prompt positions before every block (the servers add them).
- LoRA: ``lora_A``/``lora_B`` of every target module of every block (:mod:`swarm.lora`); saved and
  loaded in PEFT's format, so ``peft`` loads them onto the local transformers model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from typing import Any

import torch
from transformers import PretrainedConfig

from swarm.errors import BadRequest, ConfigError
from swarm.lora import LoraSpec, TargetModule, module_prefix, peft_key, read_peft_adapter, target_modules
from swarm.models import decoder_layer_class

TUNING_MODES = ("ptune", "deep_ptune")


@dataclasses.dataclass
class Extras:
    """What every request of one pass over the whole model carries: the tuning tensors (detached, sliced
    per request by blocks) and the padding of a padded batch."""

    prompts: torch.Tensor | None = None  # [blocks, batch or 1, prompt tokens, hidden]
    lora_names: list[str] = dataclasses.field(default_factory=list)  # wire names, in parameter order
    lora_blocks: list[int] = dataclasses.field(default_factory=list)
    lora_a: list[torch.Tensor] = dataclasses.field(default_factory=list)
    lora_b: list[torch.Tensor] = dataclasses.field(default_factory=list)
    lora_scaling: float = 0.0
    lora_dropout: float = 0.0
    seed: int = 0
    adapter: str = ""  # a server-preloaded adapter's name
    attention_mask: torch.Tensor | None = None  # [batch, seq]: a padded batch's mask (0: padding)
    position_ids: torch.Tensor | None = None  # [batch, seq]: its positions, if not 0..seq-1

    def indices(self, start: int, end: int) -> list[int]:
        return [i for i, block in enumerate(self.lora_blocks) if start <= block < end]

    def fields(self, start: int, end: int) -> dict[str, Any]:
        """ForwardRequest/BackwardRequest keywords for blocks ``start:end``."""
        index = self.indices(start, end)
        return dict(prompts=None if self.prompts is None else self.prompts[start:end],
                    lora_modules=tuple(self.lora_names[i] for i in index),
                    lora_a=tuple(self.lora_a[i] for i in index), lora_b=tuple(self.lora_b[i] for i in index),
                    lora_scaling=self.lora_scaling, lora_dropout=self.lora_dropout, seed=self.seed,
                    adapter=self.adapter, attention_mask=self.attention_mask, position_ids=self.position_ids)

    def session_fields(self, start: int, end: int) -> dict[str, Any]:
        """OpenSession keywords: the adapter and deep prompts (sessions run without dropout)."""
        index = self.indices(start, end)
        return dict(lora_modules=tuple(self.lora_names[i] for i in index),
                    lora_a=tuple(self.lora_a[i] for i in index), lora_b=tuple(self.lora_b[i] for i in index),
                    lora_scaling=self.lora_scaling, adapter=self.adapter,
                    prompts=None if self.prompts is None else self.prompts[start:end])


class RemoteLora(torch.nn.Module):
    """LoRA weights for the target modules of every block, held by the client."""

    def __init__(self, spec: LoraSpec, targets: list[TargetModule], dtype: torch.dtype = torch.float32):
        super().__init__()
        if not targets:
            raise ConfigError(f"LoRA target_modules {spec.target_modules!r} match no Linear module of the blocks")
        self.spec, self.targets = spec, targets
        self.lora_A = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(spec.rank, t.in_features, dtype=dtype)) for t in targets])
        self.lora_B = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(t.out_features, spec.rank, dtype=dtype)) for t in targets])
        for a in self.lora_A:  # PEFT's default: A like a Linear's weight, B zero (the adapter starts as a no-op)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @classmethod
    def for_model(cls, config: PretrainedConfig, family: Any, spec: LoraSpec,
                  dtype: torch.dtype = torch.float32) -> "RemoteLora":
        """Finds the target modules by building each block's layer on the meta device (no memory)."""
        layer_cls = decoder_layer_class(config)
        targets: list[TargetModule] = []
        with torch.device("meta"):
            for i in range(config.num_hidden_layers):
                targets += target_modules(layer_cls(config, layer_idx=i), i, module_prefix(family), spec)
        return cls(spec, targets, dtype)

    def save(self, path: str, family: Any, base_model: str = "") -> None:
        """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        prefix = module_prefix(family)
        tensors = {}
        for target, a, b in zip(self.targets, self.lora_A, self.lora_B):
            tensors[peft_key(prefix, target, "A")] = a.detach().cpu().contiguous()
            tensors[peft_key(prefix, target, "B")] = b.detach().cpu().contiguous()
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        self.spec.to_peft(base_model).save_pretrained(path)

    def load(self, path: str, family: Any) -> None:
        """Copies a saved adapter's weights into these parameters; the adapter must have the same layout."""
        spec, weights = read_peft_adapter(path, family)
        if (spec.rank, spec.alpha, spec.use_rslora) != (self.spec.rank, self.spec.alpha, self.spec.use_rslora):
            raise ConfigError(f"adapter {path!r} has rank {spec.rank}, alpha {spec.alpha}; this model's LoRA has "
                              f"rank {self.spec.rank}, alpha {self.spec.alpha}")
        mine = {(t.block, t.path) for t in self.targets}
        if set(weights) != mine:
            raise ConfigError(f"adapter {path!r} adapts {len(weights)} modules, this model's LoRA "
                              f"{len(mine)}; they target different modules")
        with torch.no_grad():
            for target, a, b in zip(self.targets, self.lora_A, self.lora_B):
                saved_a, saved_b = weights[(target.block, target.path)]
                a.copy_(saved_a)
                b.copy_(saved_b)


class Tuning(torch.nn.Module):
    """The client's trainable additions (any of: LoRA, prompts) and a server-preloaded adapter's name."""

    def __init__(self, config: PretrainedConfig, family: Any, *, lora: RemoteLora | None = None,
                 tuning_mode: str | None = None, pre_seq_len: int = 0, active_adapter: str = "",
                 embedding_std: float = 0.02, dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuning_mode is not None and tuning_mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode must be one of {TUNING_MODES} or None, got {tuning_mode!r}")
        if (tuning_mode is None) != (pre_seq_len == 0) or pre_seq_len < 0:
            raise ConfigError(f"tuning_mode={tuning_mode!r} needs pre_seq_len > 0 (the number of soft prompt "
                              f"tokens), and pre_seq_len needs a tuning_mode; got pre_seq_len={pre_seq_len}")
        if lora is not None and active_adapter:
            raise ConfigError("give either a LoRA adapter for the client to send (lora= or adapter=) or the name "
                              "of one the servers preloaded (active_adapter=), not both")
        self.family, self.mode, self.pre_seq_len, self.active_adapter = family, tuning_mode, pre_seq_len, active_adapter
        self.lora = lora
        hidden = config.hidden_size
        self.prompt_embeddings = None if tuning_mode is None else torch.nn.Parameter(
            torch.randn(pre_seq_len, hidden, dtype=dtype) * embedding_std)
        self.intermediate_prompts = None if tuning_mode != "deep_ptune" else torch.nn.Parameter(
            torch.zeros(config.num_hidden_layers, pre_seq_len, hidden, dtype=dtype))

    def grad_tensors(self) -> list[torch.Tensor]:
        """The tensors the remote blocks depend on, in the order :class:`RemoteBlocks` takes them."""
        tensors = [] if self.intermediate_prompts is None else [self.intermediate_prompts]
        if self.lora is not None:
            tensors += [*self.lora.lora_A, *self.lora.lora_B]
        return tensors

    def extras(self, training: bool) -> Extras:
        extras = Extras(adapter=self.active_adapter, seed=random.getrandbits(31))
        if self.intermediate_prompts is not None:
            extras.prompts = self.intermediate_prompts.detach().unsqueeze(1)  # [blocks, 1, tokens, hidden]
        if self.lora is not None:
            targets = self.lora.targets
            extras.lora_names = [t.wire_name for t in targets]
            extras.lora_blocks = [t.block for t in targets]
            extras.lora_a = [a.detach() for a in self.lora.lora_A]
            extras.lora_b = [b.detach() for b in self.lora.lora_B]
            extras.lora_scaling = self.lora.spec.scaling
            extras.lora_dropout = self.lora.spec.dropout if training else 0.0
        return extras


def adapter_spec(path: str) -> LoraSpec:
    """The spec of a saved PEFT adapter (for building a model around it)."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{path!r} has no adapter_config.json; pass the directory model.save_adapter() wrote")
    with open(config_path) as f:
        raw = json.load(f)
    from peft import LoraConfig

    return LoraSpec.from_peft(LoraConfig(**{k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__}))
