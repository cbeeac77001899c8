"""Autograd through the remote blocks: forward records what each server was sent, backward asks them.

Gradients reach the input hidden states (so anything local before the blocks trains, e.g. soft
prompt embeddings), the deep prompts and the LoRA weights. The servers' weights stay frozen.
"""

from __future__ import annotations

from typing import Any

import torch

from client.loop import run_sync
from client.remote_sequence import RemoteSequence
from client.tuning import Extras


class RemoteBlocks(torch.autograd.Function):
    """``apply(sequence, extras, hidden, *tuning tensors)``: the tuning tensors are
    :meth:`client.tuning.Tuning.grad_tensors` (deep prompts first if any, then every LoRA A, then every B);
    ``extras`` holds their detached values, which the requests carry."""

    @staticmethod
    def forward(ctx: Any, sequence: RemoteSequence, extras: Extras, hidden: torch.Tensor,
                *tensors: torch.Tensor) -> torch.Tensor:
        records: list = []
        out = run_sync(sequence.forward(hidden.detach(), extras, records=records))
        ctx.sequence, ctx.extras, ctx.records = sequence, extras, records
        ctx.prompt_shape = None if extras.prompts is None else tensors[0].shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_input, grad_prompts, grads_a, grads_b = run_sync(
            ctx.sequence.backward(ctx.records, grad.contiguous(), ctx.extras))
        ctx.records = None  # the inputs kept for backward are no longer needed
        grads: list[torch.Tensor | None] = [None, None, grad_input]
        if grad_prompts is not None:  # sent as [blocks, 1, tokens, hidden] of a [blocks, tokens, hidden] parameter
            grads.append(grad_prompts.reshape(ctx.prompt_shape))
        return (*grads, *grads_a, *grads_b)
