"""A long forward pass in pieces, so inference steps never wait long behind it.

The compute executor never interrupts a job, so one forward request of 65,536 tokens run as one
job stalls every inference step on the server for as long as it takes. Past ``chunk_tokens``
tokens, :func:`chunked_forward` runs the request block by block, each block over the sequence in
chunks of tokens that attend to that block's earlier keys and values (a cache of that block alone,
dropped before the next block). Each chunk of each block is its own job, so an inference step
waits for at most one chunk of one block, the memory held besides the activations is one block's
keys and values, and a request whose client went away stops at the next chunk (its awaiting
coroutine is cancelled, and so is its next job). The result equals the single pass up to float
rounding (``tests/test_chunked_forward.py`` states the tolerance).
"""

from __future__ import annotations

import torch

from swarm.blocks import Span
from swarm.lora import AppliedLora, applied

from server.compute import PRIORITY_FORWARD, ComputeExecutor

Padding = tuple[torch.Tensor | None, torch.Tensor | None]  # (key mask [batch, seq] bool, position ids)


def chunk_length(batch: int, seq: int, chunk_tokens: int) -> int:
    """Tokens of the sequence per chunk (``seq``: one chunk, the request runs as one job)."""
    return max(1, min(seq, chunk_tokens // batch))


async def chunked_forward(executor: ComputeExecutor, span: Span, hidden: torch.Tensor, start: int, end: int,
                          prompts: torch.Tensor | None, lora: AppliedLora | None, padding: Padding,
                          chunk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Blocks ``start:end`` over ``hidden`` [batch, seq, hidden] in chunks of ``chunk`` tokens; CPU out."""
    key_mask, position_ids = padding
    seq = hidden.shape[1]
    for block in range(start, end):
        cache = span.new_cache()
        pieces = []
        for position in range(0, seq, chunk):
            pieces.append(await executor.run(
                PRIORITY_FORWARD, _piece, span, hidden[:, position:position + chunk], cache, position, block,
                None if prompts is None else prompts[block - start:block - start + 1], lora,
                None if key_mask is None else key_mask[:, :position + chunk],
                None if position_ids is None else position_ids[:, position:position + chunk], device, dtype,
                kind="forward-chunk"))
        del cache
        hidden = torch.cat(pieces, dim=1)
    return hidden.cpu()


@torch.inference_mode()
def _piece(span: Span, hidden: torch.Tensor, cache, position: int, block: int, prompts: torch.Tensor | None,
           lora: AppliedLora | None, key_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with applied(lora):
        return span(hidden.to(device, dtype), cache, position, block, block + 1, prompts=prompts,
                    key_mask=None if key_mask is None else key_mask.to(device),
                    position_ids=None if position_ids is None else position_ids.to(device))
