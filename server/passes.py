"""Forward and backward passes (a mixin of :class:`server.handler.SpanHandler`): one request each, checked
(:mod:`server.checks`), counted against the opener's jobs quota, cancelled when the client goes away, and
long forwards run in chunks (:mod:`server.chunked_forward`) so inference steps never wait long.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from swarm.blocks import Span
from swarm.errors import BadRequest
from swarm.lora import AppliedLora, applied
from swarm.wire import BackwardRequest, BackwardResponse, ForwardRequest, ForwardResponse

from server import faults
from server.checks import Padding
from server.chunked_forward import chunk_length, chunked_forward
from server.compute import PRIORITY_BACKWARD, PRIORITY_FORWARD, ComputeExecutor
from server.quotas import Quotas, StreamSlot
from server.streams import until_gone

if TYPE_CHECKING:
    from server.handler import HandlerLimits


class PassHandlers:
    span: Span
    limits: HandlerLimits
    executor: ComputeExecutor
    quotas: Quotas
    device: torch.device
    dtype: torch.dtype

    async def _read_pass(self, slot: StreamSlot, reader, cls: type, max_tokens: int, flag: str,
                         advice: str) -> tuple[Any, torch.Tensor, Padding, torch.Tensor | None, AppliedLora | None]:
        """Reads and checks a forward or backward request: ``(msg, hidden, padding, prompts, lora)``."""
        msg = await self._read(slot, reader)
        if not isinstance(msg, cls):
            raise BadRequest(f"this handler expects {cls.__name__}, got {type(msg).__name__}")
        self._check_blocks(msg.start, msg.end)
        hidden = self._check_hidden(msg.hidden, f"{cls.__name__}.hidden")
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > max_tokens:
            raise BadRequest(f"{cls.__name__} of {tokens} tokens exceeds this server's {flag} {max_tokens}; {advice}")
        prompts = self._check_prompts(msg.prompts, hidden.shape[0], msg.start, msg.end)
        padding = self._check_padding(msg.attention_mask, msg.position_ids, hidden, cls.__name__)
        return msg, hidden, padding, prompts, self._lora(msg, msg.start, msg.end, dropout=msg.lora_dropout)

    @contextlib.contextmanager
    def _job(self, peer: str):
        self.quotas.start_job(peer)
        try:
            yield
        finally:
            self.quotas.end_job(peer)

    async def _handle_forward(self, slot: StreamSlot, reader, writer) -> None:
        msg, hidden, padding, prompts, lora = await self._read_pass(
            slot, reader, ForwardRequest, self.limits.max_forward_tokens, "--max-forward-tokens", "split the batch")
        chunk = chunk_length(hidden.shape[0], hidden.shape[1], self.limits.forward_chunk_tokens)
        with self._job(slot.peer):
            if chunk < hidden.shape[1] and (lora is None or lora.dropout == 0):  # dropout draws per pass: one pass
                faults.check("forward")
                work = chunked_forward(self.executor, self.span, hidden, msg.start, msg.end, prompts, lora, padding,
                                       chunk, self.device, self.dtype)
            else:
                work = self.executor.run(PRIORITY_FORWARD, self._forward, hidden, msg.start, msg.end, prompts, lora,
                                         padding, kind="forward")
            out = await until_gone(reader, work)
        await self._send(writer, ForwardResponse(hidden=out))

    @torch.inference_mode()
    def _forward(self, hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None = None,
                 lora: AppliedLora | None = None, padding: Padding = (None, None)) -> torch.Tensor:
        faults.check("forward")
        hidden = hidden.to(self.device, self.dtype)
        key_mask, position_ids = self._on_device(padding)
        with applied(lora):
            out = self.span(hidden, None, 0, start, end, prompts=prompts, key_mask=key_mask,
                            position_ids=position_ids).cpu()
        return faults.corrupt("forward", out)

    # ---------------------------------------------------------------- backward

    async def _handle_backward(self, slot: StreamSlot, reader, writer) -> None:
        msg, hidden, padding, prompts, lora = await self._read_pass(
            slot, reader, BackwardRequest, self.limits.max_backward_tokens, "--max-backward-tokens",
            "use smaller batches or shorter sequences")
        grad = self._check_hidden(msg.grad_output, "BackwardRequest.grad_output")
        if grad.shape != hidden.shape:
            raise BadRequest(f"grad_output has shape {list(grad.shape)}; it must match hidden {list(hidden.shape)}")
        with self._job(slot.peer):
            reply = await until_gone(reader, self.executor.run(PRIORITY_BACKWARD, self._backward, hidden, grad, msg,
                                                               prompts, lora, padding, kind="backward"))
        await self._send(writer, reply)

    def _backward(self, hidden: torch.Tensor, grad: torch.Tensor, msg: BackwardRequest,
                  prompts: torch.Tensor | None, lora: AppliedLora | None, padding: Padding) -> BackwardResponse:
        """Recomputes the forward of ``msg.start:msg.end`` with grad; the blocks' own weights stay frozen."""
        faults.check("backward")
        with torch.enable_grad():
            hidden = hidden.to(self.device, self.dtype).requires_grad_()
            leaves = [hidden]
            if prompts is not None:
                prompts = prompts.detach().requires_grad_()
                leaves.append(prompts)
            trained = msg.adapter == "" and lora is not None  # sent weights get gradients; preloaded ones do not
            if trained:
                lora = dataclasses.replace(lora, modules=[(m, a.detach().requires_grad_(), b.detach().requires_grad_())
                                                          for m, a, b in lora.modules])
                leaves += lora.tensors()
            key_mask, position_ids = self._on_device(padding)
            with applied(lora):
                out = self.span(hidden, None, 0, msg.start, msg.end, prompts=prompts, key_mask=key_mask,
                                position_ids=position_ids)
            grads = torch.autograd.grad(out, leaves, grad_outputs=grad.to(self.device, out.dtype), allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        grad_input, rest = grads[0].cpu(), grads[1:]
        grad_prompts = rest.pop(0).cpu() if prompts is not None else None
        lora_grads = [g.cpu() for g in rest]
        return BackwardResponse(grad_input=grad_input, grad_prompts=grad_prompts,
                                grad_lora_a=tuple(lora_grads[0::2]), grad_lora_b=tuple(lora_grads[1::2]))
