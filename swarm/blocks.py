"""The generic block runtime: a span of a model's own decoder layers that runs like a local model.

:class:`Span` holds blocks ``start..end-1`` (global indices), rebuilds the rotary embedding the
family's base model uses, builds the masks each block needs, and adds what the family's adapter
says its layers take besides (alibi). Masks are sized against the span's *first* block of each
attention type (``layer_idx``): the session cache holds only this span's layers, and sizing
against layer 0 (transformers' default) makes multi-token steps after prefill wrong.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_causal_mask_function,
)

from swarm.errors import ModelError
from swarm.models import decoder_layer_class, family_of, layer_types, rotary_embedding

_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}
# what decoder layers call their cache argument: transformers >= 5, older classes, Falcon/Bloom
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


class Span(torch.nn.Module):
    """Blocks ``start:end`` of a model; ``forward`` maps hidden states to hidden states."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, blocks: list[torch.nn.Module]):
        super().__init__()
        if len(blocks) != end - start:
            raise ModelError(f"span {start}:{end} needs {end - start} blocks, got {len(blocks)}")
        self.config = config
        self.family = family_of(config)
        self.start, self.end = start, end
        self.blocks = torch.nn.ModuleList(blocks)
        self.rotary_emb = rotary_embedding(config)
        self.block_types = layer_types(config)[start:end]
        for i, kind in enumerate(self.block_types):
            if kind not in _MASK_FUNCTIONS:
                raise ModelError(f"block {start + i} has attention type {kind!r}, which Swarm cannot run yet")
        params = inspect.signature(type(blocks[0]).forward).parameters if blocks else {}
        self._cache_kwarg = next((name for name in _CACHE_KWARGS if name in params), "cache")

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
                start: int | None = None, end: int | None = None, prompts: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``: [batch, seq, hidden] at positions ``position..position+seq-1``; same shape out.

        Runs blocks ``start:end`` (default: the whole span). With ``cache``, keys/values are appended
        to it (an inference step); without, the blocks run over the sequence alone (a forward pass).
        ``prompts`` ([end - start, batch or 1, prompt tokens, hidden], deep prompt tuning) are added to
        the hidden states at positions ``0..prompt tokens-1`` before each block. A padded batch gives
        ``key_mask`` ([batch, position + seq], 1 for a token, 0 for padding no one attends to) and
        the rows' own ``position_ids`` ([batch, seq]; default ``position..position+seq-1``), as the
        base model's ``attention_mask`` and ``position_ids`` would be.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        lo, hi = start - self.start, end - self.start
        seq = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(position, position + seq, device=hidden.device).unsqueeze(0)  # [1, seq]
        inputs = {kind: self._inputs_for(kind, layer_idx, hidden, cache, position, position_ids, key_mask)
                  for kind, layer_idx in self._first_block_of_each_type(lo, hi).items()}
        for i, kind in enumerate(self.block_types[lo:hi]):
            block = self.blocks[lo + i]  # by index: slicing a ModuleList builds a new module (~0.15 ms a step)
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[i], position)
            out = block(hidden, position_ids=position_ids, use_cache=cache is not None,
                        **{self._cache_kwarg: cache}, **inputs[kind])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def step(self, hidden: torch.Tensor, cache: Any, position_ids: torch.Tensor, key_mask: torch.Tensor,
             start: int | None = None, end: int | None = None,
             prompts: list[RowPrompts] | None = None) -> torch.Tensor:
        """One step of many rows at different lengths (sessions batched together); same shape out.

        ``hidden``: [rows, new, hidden], the last ``new`` tokens of each row; ``position_ids``: [rows, new];
        ``key_mask``: [rows, keys] bool, each row's keys left-padded to a common length (False for
        padding), the new tokens last. ``cache.update`` stores the new keys and values and returns
        every row's keys and values in that layout (:class:`server.kv_cache.BatchView`). A left-padded
        batch is what transformers' masks, alibi and attention already handle, so each row computes
        what it would alone. ``prompts``: deep prompts of some rows.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        lo, hi = start - self.start, end - self.start
        inputs = {kind: self._step_inputs(kind, hidden, position_ids, key_mask)
                  for kind in dict.fromkeys(self.block_types[lo:hi])}
        for i, kind in enumerate(self.block_types[lo:hi]):
            block = self.blocks[lo + i]
            for rows in prompts or ():
                hidden[rows.rows] = add_prompt(hidden[rows.rows], rows.prompts[i], rows.position)
            out = block(hidden, position_ids=position_ids, use_cache=True, **{self._cache_kwarg: cache},
                        **inputs[kind])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _step_inputs(self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor,
                     key_mask: torch.Tensor) -> dict[str, Any]:
        rows, new = hidden.shape[:2]
        keys = key_mask.shape[1]
        mask_interface = ALL_MASK_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)
        window = getattr(self.config, "sliding_window", None) if kind == "sliding_attention" else None
        if (new == 1 and window is None and not self.family.materialize_mask and self.family.block_inputs is None
                and bool(key_mask.all())):
            mask_interface = None  # as in forward: one new token, no padding, so no mask (sdpa: None; eager: zeros)
        mask = None if mask_interface is None else mask_interface(
            batch_size=rows, q_length=new, kv_length=keys, q_offset=keys - new, kv_offset=0,
            mask_function=causal_mask_function if window is None else sliding_window_causal_mask_function(window),
            attention_mask=key_mask, allow_is_causal_skip=not self.family.materialize_mask, local_size=window,
            dtype=hidden.dtype, config=self.config, use_vmap=False, device=hidden.device)
        return self._block_inputs(kind, hidden, position_ids, key_mask, mask)

    def _first_block_of_each_type(self, lo: int, hi: int) -> dict[str, int]:
        """{attention type: global index of its first block in the run}: that block sizes the type's mask."""
        first: dict[str, int] = {}
        for i in range(lo, hi):
            first.setdefault(self.block_types[i], self.start + i)
        return first

    def _inputs_for(self, kind: str, layer_idx: int, hidden: torch.Tensor, cache: DynamicCache | None,
                    position: int, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> dict[str, Any]:
        """The keyword inputs every block of attention type ``kind`` gets in this step."""
        if (kind == "full_attention" and hidden.shape[1] == 1 and key_mask is None
                and not self.family.materialize_mask and self.family.block_inputs is None):
            # one new token attends to every cached one: transformers' mask is None (sdpa) or all zeros
            # (eager); building it costs ~0.1 ms per step, a seventh of a small span's step
            mask = None
        else:
            extra_mask_args = {"allow_is_causal_skip": False} if self.family.materialize_mask else {}
            mask = _MASK_FUNCTIONS[kind](config=self.config, inputs_embeds=hidden, attention_mask=key_mask,
                                         cache=cache, position_ids=position_ids, layer_idx=layer_idx,
                                         **extra_mask_args)
        if key_mask is None and self.family.block_inputs is not None:
            key_mask = torch.ones((hidden.shape[0], position + hidden.shape[1]), dtype=torch.long, device=hidden.device)
        return self._block_inputs(kind, hidden, position_ids, key_mask, mask)

    def _block_inputs(self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                      mask: Any) -> dict[str, Any]:
        """The keyword inputs of every block of type ``kind``: its mask, rotary embeddings and family extras."""
        extra: dict[str, Any] = {}
        if self.family.block_inputs is not None:
            mask, extra = self.family.block_inputs(self.config, hidden, key_mask, mask)
        if self.rotary_emb is None:
            position_embeddings = None
        elif self.family.rotary_by_layer_type:
            position_embeddings = self.rotary_emb(hidden, position_ids, kind)
        else:
            position_embeddings = self.rotary_emb(hidden, position_ids)
        return {"attention_mask": mask, "position_embeddings": position_embeddings, **extra}


@dataclasses.dataclass(frozen=True)
class RowPrompts:
    """Deep prompts of the rows ``rows`` of a batched step, whose new tokens start at ``position``:
    ``prompts`` [blocks of the step, rows or 1, prompt tokens, hidden]."""

    rows: slice
    prompts: torch.Tensor
    position: int


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """``hidden`` [batch, seq, hidden] at positions ``position..``, plus ``prompt`` [batch or 1, tokens,
    hidden] where the positions are below ``tokens`` (out of place, so autograd sees it)."""
    overlap = min(prompt.shape[1] - position, hidden.shape[1])
    if overlap <= 0:
        return hidden
    head = hidden[:, :overlap] + prompt[:, position:position + overlap].to(hidden.dtype)
    return torch.cat([head, hidden[:, overlap:]], dim=1)
