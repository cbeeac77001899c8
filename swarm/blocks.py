"""The generic block runtime: a span of a model's own decoder layers that runs like a local model.

:class:`Span` holds blocks ``start..end-1`` (global indices), rebuilds rotary embeddings from the
config, and builds the masks each block needs. Masks are sized against the span's *first* block of
each attention type (``layer_idx``): the session cache holds only this span's layers, and sizing
against layer 0 (transformers' default) makes multi-token steps after prefill wrong.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.errors import ModelError
from swarm.models import decoder_layer_class, layer_types, rotary_class

_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class Span(torch.nn.Module):
    """Blocks ``start:end`` of a model; ``forward`` maps hidden states to hidden states."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, blocks: list[torch.nn.Module]):
        super().__init__()
        if len(blocks) != end - start:
            raise ModelError(f"span {start}:{end} needs {end - start} blocks, got {len(blocks)}")
        self.config = config
        self.start, self.end = start, end
        self.blocks = torch.nn.ModuleList(blocks)
        rotary = rotary_class(config)
        self.rotary_emb = rotary(config=config) if rotary is not None else None
        types_ = layer_types(config)
        self.block_types = types_[start:end]
        for i, kind in enumerate(self.block_types):
            if kind not in _MASK_FUNCTIONS:
                raise ModelError(f"block {start + i} has attention type {kind!r}, which Swarm cannot run yet")
        params = inspect.signature(type(blocks[0]).forward).parameters if blocks else {}
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def empty(cls, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype) -> "Span":
        """A span with parameters on the meta device; fill it with ``load_state_dict(..., assign=True)``."""
        layer_cls = decoder_layer_class(config)
        with torch.device("meta"):
            blocks = [layer_cls(config, layer_idx=i) for i in range(start, end)]
        for block in blocks:
            block.to(dtype=dtype)
        return cls(config, start, end, blocks)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, hidden: torch.Tensor, cache: DynamicCache | None = None, position: int = 0,
                start: int | None = None, end: int | None = None) -> torch.Tensor:
        """``hidden``: [batch, seq, hidden] at positions ``position..position+seq-1``; same shape out.

        Runs blocks ``start:end`` (default: the whole span). With ``cache``, keys/values are appended
        to it (an inference step); without, the blocks run over the sequence alone (a forward pass).
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        lo, hi = start - self.start, end - self.start
        seq = hidden.shape[1]
        position_ids = torch.arange(position, position + seq, device=hidden.device).unsqueeze(0)
        # the first block of each attention type in the run sizes that type's mask
        mask_layer_idx: dict[str, int] = {}
        for i in range(lo, hi):
            mask_layer_idx.setdefault(self.block_types[i], self.start + i)
        masks = {}
        for kind, layer_idx in mask_layer_idx.items():
            masks[kind] = _MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
        position_embeddings = self.rotary_emb(hidden, position_ids) if self.rotary_emb is not None else None
        for block, kind in zip(self.blocks[lo:hi], self.block_types[lo:hi]):
            out = block(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=cache is not None,
                **{self._cache_kwarg: cache},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
