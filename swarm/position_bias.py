"""Extra block inputs of families whose layers take more than hidden states, a mask and rotary.

Falcon and Bloom layers take an ``alibi`` tensor that their base model builds once per forward
pass. A :class:`BlockInputs` function rebuilds it for a span exactly as the base model would for
the same positions, using transformers' own builders; a :class:`~swarm.models.FamilyAdapter`
names the function, and :class:`~swarm.blocks.Span` calls it once per step.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from transformers import PretrainedConfig


class BlockInputs(Protocol):
    def __call__(self, config: PretrainedConfig, hidden: torch.Tensor, key_mask: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """``hidden``: [batch, seq, hidden], the last ``seq`` of the keys; ``key_mask``: [batch, keys], 1 for a
        token and 0 for padding (the base model's 2-D attention mask); ``mask``: the block's attention
        mask. Returns the mask the blocks get (the same, or one with a bias folded in) and extra keyword
        inputs for every block."""
        ...


def falcon_inputs(config: PretrainedConfig, hidden: torch.Tensor, key_mask: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Falcon: rotary checkpoints pass ``alibi=None``; alibi checkpoints fold the bias into the mask
    (as ``FalconModel.forward`` does) and pass it too."""
    if not config.alibi:
        return mask, {"alibi": None}
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    batch = hidden.shape[0]
    alibi = build_alibi_tensor(key_mask, config.num_attention_heads, dtype=hidden.dtype)
    # alibi: [batch * heads, 1, keys]
    if mask is not None and mask.ndim == 4:  # [batch, 1, seq, keys]
        lowest = torch.finfo(hidden.dtype).min
        if mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=hidden.dtype, device=mask.device), lowest)
        head_dim = config.hidden_size // config.num_attention_heads
        bias = alibi.reshape(batch, -1, *alibi.shape[1:]) / math.sqrt(head_dim)  # [batch, heads, 1, keys]
        mask = torch.masked_fill(bias, mask < -1, lowest)  # [batch, heads, seq, keys]
    return mask, {"alibi": alibi}


def bloom_inputs(config: PretrainedConfig, hidden: torch.Tensor, key_mask: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Bloom: the alibi bias over every key, added to the attention scores by the layers themselves."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(key_mask, config.n_head, dtype=hidden.dtype)
    return mask, {"alibi": alibi}  # alibi: [batch * heads, 1, keys]
