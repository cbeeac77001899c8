"""The checks every request gets before it touches the model (a mixin of :class:`server.handler.SpanHandler`).

Each raises :class:`~swarm.errors.BadRequest` naming the field and the limit it broke.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from swarm.blocks import Span
from swarm.errors import BadRequest
from swarm.lora import AppliedLora, check_lora, parse_wire_name
from swarm.wire import BackwardRequest, ForwardRequest, OpenSession

from server.adapters import Adapter

if TYPE_CHECKING:
    from server.handler import HandlerLimits

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# a padded batch: (key mask [batch, seq] bool, False for padding; position ids [batch, seq]), each None if absent
Padding = tuple[torch.Tensor | None, torch.Tensor | None]


class RequestChecks:
    span: Span
    limits: HandlerLimits
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    adapters: dict[str, Adapter]
    _modules: dict[int, dict[str, torch.nn.Module]]

    def _lora(self, msg: ForwardRequest | BackwardRequest | OpenSession, start: int, end: int,
              dropout: float) -> AppliedLora | None:
        """The request's adapter for blocks ``start:end``: preloaded by name, or sent weights (validated)."""
        if msg.adapter:
            if msg.lora_modules:
                raise BadRequest("a request may name a preloaded adapter or send LoRA weights, not both")
            adapter = self.adapters.get(msg.adapter)
            if adapter is None:
                raise BadRequest(f"adapter {msg.adapter[:100]!r} is not loaded on this server; it has "
                                 f"{sorted(self.adapters) or 'none'} (swarm serve --adapters PATH...)")
            modules = [(self._modules[block][path], a, b) for (block, path), (a, b) in adapter.weights.items()
                       if start <= block < end]
            return AppliedLora(modules, adapter.spec.scaling)
        if not msg.lora_modules:
            return None
        check_lora(msg.lora_modules, msg.lora_a, msg.lora_b, start, end, self._modules, self.limits.max_lora_rank,
                   self.limits.max_adapter_bytes)
        if not (0.0 <= dropout < 1.0 and msg.lora_scaling == msg.lora_scaling):
            raise BadRequest(f"lora_dropout must be in [0, 1) and lora_scaling a number, got {dropout} and "
                             f"{msg.lora_scaling}")
        modules = []
        for name, a, b in zip(msg.lora_modules, msg.lora_a, msg.lora_b):
            block, path = parse_wire_name(name)
            modules.append((self._modules[block][path], a.to(self.device), b.to(self.device)))
        return AppliedLora(modules, msg.lora_scaling, dropout, getattr(msg, "seed", 0), list(msg.lora_modules))

    def _check_prompts(self, prompts: torch.Tensor | None, batch: int, start: int,
                       end: int) -> torch.Tensor | None:
        if prompts is None:
            return None
        shape = list(prompts.shape)
        if (not prompts.is_floating_point() or prompts.ndim != 4 or shape[0] != end - start
                or shape[1] not in (1, batch) or shape[3] != self.hidden_size or shape[2] == 0
                or shape[2] > self.limits.max_session_length):
            raise BadRequest(f"prompts have {prompts.dtype} shape {shape}; expected floating point "
                             f"[{end - start} blocks, 1 or {batch} (batch), prompt tokens, {self.hidden_size}]")
        return prompts.to(self.device, self.dtype)

    def _check_padding(self, mask: torch.Tensor | None, positions: torch.Tensor | None, hidden: torch.Tensor,
                       what: str) -> Padding:
        """A request's ``attention_mask`` and ``position_ids`` ([batch, seq] each): the mask as bool, or None
        where it has no padding."""
        shape = tuple(hidden.shape[:2])
        if mask is not None:
            if mask.dtype not in (torch.int64, torch.int32) or tuple(mask.shape) != shape or not bool(
                    ((mask == 0) | (mask == 1)).all()):
                raise BadRequest(f"{what}.attention_mask must be int64 or int32 of shape {list(shape)} holding 0 "
                                 f"(padding) and 1 (token), got {mask.dtype} {list(mask.shape)}")
            mask = mask.bool()
            if bool(mask.all()):
                mask = None
        if positions is not None:
            limit = max(self.limits.max_session_length, self.limits.max_forward_tokens)
            if positions.dtype != torch.int64 or tuple(positions.shape) != shape or (positions.numel() and not (
                    0 <= int(positions.min()) and int(positions.max()) < limit)):
                raise BadRequest(f"{what}.position_ids must be int64 of shape {list(shape)} with values in "
                                 f"0..{limit - 1}, got {positions.dtype} {list(positions.shape)}")
        return mask, positions

    def _on_device(self, padding: Padding) -> Padding:
        return tuple(None if t is None else t.to(self.device) for t in padding)  # type: ignore[return-value]

    def _check_blocks(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise BadRequest(f"blocks {start}:{end} are not all served here; this server holds "
                             f"{self.span.start}:{self.span.end}")

    def _check_hidden(self, hidden: torch.Tensor, what: str) -> torch.Tensor:
        if hidden.dtype not in FLOAT_DTYPES:
            raise BadRequest(f"{what} has dtype {hidden.dtype}; send float32, float16 or bfloat16")
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise BadRequest(f"{what} has shape {list(hidden.shape)}; expected [batch, seq, {self.hidden_size}] "
                             f"(this model's hidden size)")
        if hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise BadRequest(f"{what} is empty: shape {list(hidden.shape)}")
        if hidden.shape[0] > self.limits.max_batch_size:
            raise BadRequest(f"{what} batch {hidden.shape[0]} exceeds --max-batch-size {self.limits.max_batch_size}")
        return hidden
